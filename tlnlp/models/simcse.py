"""Unsupervised SimCSE (Gao et al. 2021, "SimCSE: Simple Contrastive Learning of Sentence Embeddings"): each
text is encoded twice, and the two passes differ only by dropout; the encoder learns to find a text's second
embedding among the batch's, every other text in the batch being a negative.

The loss trains the mean-pooled sentence vector directly, as a sentence-embedding checkpoint (minilm-l6) was
trained and stage 2's mean pooling reads it, with no head and no decoder: only the encoder learns, so a
checkpoint without an MLM head needs no warm-up. Negatives are the other texts of the process's own batch.

Validation is deterministic: dropout is off, and the second view of each text is its copy with the tokens of
stage 1's fixed validation masks replaced (the same draw every run), so the loss and the retrieval accuracy
(the share of texts whose masked copy is the nearest in their batch) compare run to run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

TEMPERATURE = 0.05  # the paper's


@dataclass
class ContrastiveLossOutput(ModelOutput):
    """The batch's loss, and per example its loss and whether its second view was the nearest (typed, as
    torch.compile rebuilds outputs by their class)."""

    loss: torch.Tensor | None = None
    example_loss: torch.Tensor | None = None
    example_found: torch.Tensor | None = None


class ContrastiveSentenceLoss(nn.Module):
    """forward(masked batch) -> the in-batch contrastive loss; `encoder` is what is saved."""

    def __init__(self, mlm: PreTrainedModel):
        super().__init__()
        # The encoder alone: the MLM head would get no gradient, and data parallelism refuses unused parameters.
        self.encoder = mlm.base_model

    def sentence_vectors(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)

    def forward(self, input_ids, labels, attention_mask=None, **_unused) -> ContrastiveLossOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        original = torch.where(labels != -100, labels, input_ids)
        # Training: two dropout passes over the original text. Validation (no dropout): the original and its
        # masked copy, so the two views differ.
        second = original if self.training else input_ids
        first_view = F.normalize(self.sentence_vectors(original, attention_mask).float(), dim=-1)
        second_view = F.normalize(self.sentence_vectors(second, attention_mask).float(), dim=-1)
        similarities = first_view @ second_view.T / TEMPERATURE
        targets = torch.arange(len(similarities), device=similarities.device)
        example_loss = F.cross_entropy(similarities, targets, reduction="none")
        found = (similarities.argmax(dim=1) == targets).float()
        return ContrastiveLossOutput(loss=example_loss.mean(), example_loss=example_loss, example_found=found)


def evaluate_contrastive(accelerator, model, dataloader) -> dict[str, float]:
    """The mean contrastive loss and retrieval accuracy over the validation texts, gathered per example so no
    tail example counts twice."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    hits = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    with torch.no_grad():
        for batch in dataloader:
            out = model(**batch)
            losses, found = accelerator.gather_for_metrics((out.example_loss, out.example_found))
            loss_sum += losses.double().sum()
            hits += found.double().sum()
            count += len(losses)
    examples = count.clamp(min=1)
    return {"loss": (loss_sum / examples).item(), "retrieval_accuracy": (hits / examples).item(),
            "examples": count.item()}
