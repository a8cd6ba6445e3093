"""ELECTRA's replaced-token detection (Clark et al. 2020): `--objective electra` in stage 1.

A small generator does masked-language modelling; its samples replace the masked tokens, and the
discriminator (the encoder that stage 2 fine-tunes) classifies every token as original or replaced. The
discriminator thus learns from all positions, not only the 15% that MLM scores.

Layout choices:
- The generator is the discriminator's architecture at the same width with a fraction of its layers
  (`--generator_size_fraction`). The same width lets the two share one token-embedding matrix, which the
  generator's output layer is tied to, as in the paper, with stock transformers classes on both sides.
- The generator's head runs only at masked positions (`--sparse_mlm_head`, as in MLM).
- The saved model is the discriminator's encoder as a stock `AutoModel` (what stage 2 loads); the
  generator is saved in `generator/`, marked so that stage 2 refuses it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForMaskedLM, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from tlnlp.models.modeling import MODEL_ROLE, MaskedLMLoss, model_inputs, per_example_sums, sub_state_dict

GENERATOR_FOLDER = "generator"


def generator_config(discriminator: PretrainedConfig, fraction: float) -> PretrainedConfig:
    """The discriminator's architecture and width with `fraction` of its layers (at least one)."""
    config = copy.deepcopy(discriminator)
    config.num_hidden_layers = max(1, round(discriminator.num_hidden_layers * fraction))
    if getattr(config, "layer_types", None):  # ModernBERT lists each layer's attention kind: keep the first ones
        config.layer_types = list(config.layer_types[: config.num_hidden_layers])
    setattr(config, MODEL_ROLE, "generator")
    return config


def sample_tokens(logits: torch.Tensor, sampler: torch.Generator | None = None) -> torch.Tensor:
    """One token per row, drawn from softmax(logits): one uniform number per row against the cumulative
    distribution. torch.multinomial draws an exponential variate for every vocabulary entry instead, which
    made it 16% of an ELECTRA step on the CPU (an 8,000-token vocabulary, 600 masked positions)."""
    probabilities = F.softmax(logits.float(), dim=-1)
    cumulative = probabilities.cumsum(dim=-1)
    uniform = torch.rand(logits.size(0), 1, generator=sampler, device=logits.device) * cumulative[:, -1:]
    return torch.searchsorted(cumulative, uniform).squeeze(-1).clamp(max=logits.size(-1) - 1)


@dataclass
class ReplacedTokenDetectionOutput(ModelOutput):
    """The training loss, and per-example sums that evaluation gathers across processes."""

    loss: torch.Tensor | None = None
    generator_loss_sum: torch.Tensor | None = None
    masked: torch.Tensor | None = None
    discriminator_loss_sum: torch.Tensor | None = None
    discriminator_correct: torch.Tensor | None = None
    replaced_correct: torch.Tensor | None = None
    replaced: torch.Tensor | None = None
    tokens: torch.Tensor | None = None


class ReplacedTokenDetection(nn.Module):
    """Generator + discriminator; forward takes an MLM-masked batch and returns the ELECTRA loss.

    loss = generator MLM loss + `discriminator_weight` x discriminator loss (binary cross-entropy over every
    non-padding token). The replacements are sampled from the generator without gradient, from the global
    RNG (checkpoints restore it), or from `sampler` when evaluation passes one.
    """

    def __init__(self, discriminator_config: PretrainedConfig, generator_fraction: float,
                 discriminator_weight: float, sparse: bool = True):
        super().__init__()
        discriminator_config = copy.deepcopy(discriminator_config)
        setattr(discriminator_config, MODEL_ROLE, "discriminator")
        # The encoder of a stock *ForMaskedLM (BERT's without its pooler, which RTD would leave unused).
        self.discriminator: PreTrainedModel = AutoModelForMaskedLM.from_config(discriminator_config).base_model
        hidden = discriminator_config.hidden_size
        self.discriminator_head = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))
        generator = AutoModelForMaskedLM.from_config(generator_config(discriminator_config, generator_fraction))
        generator.set_input_embeddings(self.discriminator.get_input_embeddings())
        generator.tie_weights()  # the output layer follows the shared embeddings
        self.generator = MaskedLMLoss(generator, sparse=sparse)
        self.discriminator_weight = discriminator_weight

    def forward(self, input_ids, labels, attention_mask=None, token_type_ids=None, sampler=None,
                **_unused) -> ReplacedTokenDetectionOutput:
        selected = labels.view(-1) != -100
        masked_labels = labels.view(-1)[selected]
        logits = self.generator.masked_logits(model_inputs(input_ids, attention_mask, token_type_ids), selected)
        token_loss = F.cross_entropy(logits.float(), masked_labels, reduction="none")
        generator_loss_sum, masked = per_example_sums(token_loss, selected, labels.shape)

        with torch.no_grad():
            corrupted = torch.where(labels == -100, input_ids, labels).view(-1)  # the original text
            if masked_labels.numel():
                corrupted[selected] = sample_tokens(logits.detach(), sampler)
            corrupted = corrupted.view_as(input_ids)
            # A sample that equals the original token counts as original, as in the paper.
            replaced = (corrupted != torch.where(labels == -100, input_ids, labels)).float()
        hidden = self.discriminator(**model_inputs(corrupted, attention_mask, token_type_ids)).last_hidden_state
        token_logits = self.discriminator_head(hidden).squeeze(-1).float()
        counted = (attention_mask.bool() if attention_mask is not None else torch.ones_like(replaced, dtype=torch.bool))
        flat = counted.view(-1)
        is_replaced = replaced.view(-1)[flat]
        bce = F.binary_cross_entropy_with_logits(token_logits.view(-1)[flat], is_replaced, reduction="none")
        correct = ((token_logits.view(-1)[flat] > 0).float() == is_replaced).float()
        sums, tokens = per_example_sums(torch.stack([bce.detach(), correct, correct * is_replaced, is_replaced], 1),
                                        flat, labels.shape)
        discriminator_loss_sum, discriminator_correct, replaced_correct, replaced_count = sums.unbind(1)

        # A batch with no masked token still touches every generator parameter, so gradient sync agrees.
        generator_loss = token_loss.mean() if token_loss.numel() else logits.sum() * 0.0
        loss = generator_loss + self.discriminator_weight * bce.mean()
        return ReplacedTokenDetectionOutput(
            loss=loss, generator_loss_sum=generator_loss_sum, masked=masked,
            discriminator_loss_sum=discriminator_loss_sum, discriminator_correct=discriminator_correct,
            replaced_correct=replaced_correct, replaced=replaced_count, tokens=tokens,
        )

    def save(self, folder: Path, state_dict: dict[str, torch.Tensor], tokenizer) -> None:
        """The discriminator's encoder in `folder` (stock AutoModel), the generator in `folder/generator`."""
        self.discriminator.save_pretrained(folder, state_dict=sub_state_dict(state_dict, "discriminator."),
                                           safe_serialization=True)
        tokenizer.save_pretrained(folder)
        generator_folder = folder / GENERATOR_FOLDER
        self.generator.mlm.save_pretrained(generator_folder, state_dict=sub_state_dict(state_dict, "generator.mlm."),
                                           safe_serialization=True)
        tokenizer.save_pretrained(generator_folder)


def evaluate_electra(accelerator, model, dataloader, *, discriminator_weight: float, seed: int) -> dict[str, float]:
    """Generator MLM loss and discriminator loss and accuracy, token-weighted over the validation set.

    The replacements are sampled from a generator seeded here, so every evaluation of the same weights gives
    the same numbers, and evaluation leaves the training RNG untouched.
    """
    model.eval()
    sampler = torch.Generator(device=accelerator.device).manual_seed(seed + accelerator.process_index)
    keys = ("generator_loss_sum", "masked", "discriminator_loss_sum", "discriminator_correct", "replaced_correct",
            "replaced", "tokens")
    totals = torch.zeros(len(keys), dtype=torch.float64, device=accelerator.device)
    with torch.no_grad():
        for batch in dataloader:
            out = model(**batch, sampler=sampler)
            gathered = accelerator.gather_for_metrics(tuple(getattr(out, key) for key in keys))
            totals += torch.stack([values.double().sum() for values in gathered])
    sums = dict(zip(keys, totals.tolist()))
    generator_loss = sums["generator_loss_sum"] / max(sums["masked"], 1)
    discriminator_loss = sums["discriminator_loss_sum"] / max(sums["tokens"], 1)
    return {
        "loss": generator_loss + discriminator_weight * discriminator_loss,
        "generator_loss": generator_loss,
        "generator_perplexity": math.exp(min(generator_loss, 50.0)),
        "discriminator_loss": discriminator_loss,
        "discriminator_accuracy": sums["discriminator_correct"] / max(sums["tokens"], 1),
        # Of the replaced tokens, the share the discriminator caught (the hard part: most tokens are original).
        "replaced_recall": sums["replaced_correct"] / max(sums["replaced"], 1),
        "replaced_fraction": sums["replaced"] / max(sums["tokens"], 1),
        "masked_tokens": sums["masked"],
    }
