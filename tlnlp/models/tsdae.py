"""TSDAE (Wang et al. 2021, "TSDAE: Using Transformer-based Sequential Denoising Auto-Encoder for Unsupervised
Sentence Embedding Learning"): the encoder reads a text with most of its tokens deleted and pools it into one
sentence vector; a decoder must rebuild the whole text from that vector alone, through cross-attention.

Only the vector passes from encoder to decoder, so the encoder learns to put the text's content into its
pooled embedding: the representation a sentence-embedding checkpoint (minilm-l6) was trained to give and
stage 2's mean pooling reads. The paper finds it well ahead of MLM as a domain-adaptation step for such
models. The decoder is the checkpoint's own architecture as a causal LM with cross-attention, its weights
tied to the encoder's and its head to the MLM head (only the cross-attention is new), as the paper and
sentence-transformers' `DenoisingAutoEncoderLoss` do.

The deletion reuses stage 1's masking: the masker chooses --mlm_probability of the tokens (never the special
ones) and writes the originals into `labels`; the chosen tokens are then dropped from the encoder's input.
So the masks come from the same RNG, the same checkpointed state and the same fixed validation draw as MLM.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from tlnlp.core.errors import UserInputError
from tlnlp.models.modeling import MaskedLMLossOutput, apply_lm_head, lm_head_names, per_example_sums


def tied_decoder(mlm: PreTrainedModel) -> tuple[PreTrainedModel, list[nn.Parameter]]:
    """The checkpoint's architecture as a causal LM with cross-attention, every parameter the MLM model also
    has (same name and shape: the encoder's layers, the embeddings, the LM head) being the MLM model's own.
    Returns it and its new parameters (the cross-attention)."""
    config = copy.deepcopy(mlm.config)
    config.is_decoder, config.add_cross_attention = True, True
    decoder = AutoModelForCausalLM.from_config(config)  # the objective's check refused architectures without one
    shared = dict(mlm.named_parameters(remove_duplicate=False))
    new = []
    for name, param in list(decoder.named_parameters(remove_duplicate=False)):
        owner_name, _, attribute = name.rpartition(".")
        owner = decoder.get_submodule(owner_name)
        if name in shared and shared[name].shape == param.shape:
            setattr(owner, attribute, shared[name])
        else:
            new.append(param)
    if not any("crossattention" in n or "cross_attn" in n for n, _ in decoder.named_parameters()):
        raise UserInputError(f"The {config.model_type} decoder has no cross-attention layers: --objective tsdae "
                             "cannot pass the sentence vector to it. Use --objective mlm.")
    return decoder, new


class DenoisingAutoEncoderLoss(nn.Module):
    """forward(masked batch) -> the reconstruction loss; `mlm.base_model` is the encoder that is saved."""

    def __init__(self, mlm: PreTrainedModel):
        super().__init__()
        self.mlm = mlm  # its base model is the encoder; its head is shared with the decoder's
        self.decoder, self.new_parameters = tied_decoder(mlm)
        self.head_names = lm_head_names(self.decoder)

    def sentence_vectors(self, input_ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Mean-pooled encoder states of each text with only its `keep` tokens, packed to the left."""
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept tokens first, in order
        width = max(1, int(keep.sum(dim=1).max()))
        noisy_ids = input_ids.gather(1, order)[:, :width]
        noisy_mask = keep.gather(1, order)[:, :width].long()
        hidden = self.mlm.base_model(input_ids=noisy_ids, attention_mask=noisy_mask).last_hidden_state
        weights = noisy_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)

    def counted_logits(self, original, attention_mask, sentence, selected) -> torch.Tensor:
        """The decoder's vocabulary logits at the `selected` positions (of the first length - 1, flattened).
        The head runs on those rows only, as MLM's sparse head does: its vocabulary projection is about half
        a small decoder's work, and padding rows and the last position would be computed only to be dropped."""
        inputs = {"input_ids": original, "attention_mask": attention_mask,
                  "encoder_hidden_states": sentence.unsqueeze(1)}
        if self.head_names is None:
            logits = self.decoder(**inputs).logits
            return logits[:, :-1].reshape(-1, logits.size(-1))[selected]
        hidden = self.decoder.base_model(**inputs).last_hidden_state
        return apply_lm_head(self.decoder, self.head_names, hidden[:, :-1].reshape(-1, hidden.size(-1))[selected])

    def forward(self, input_ids, labels, attention_mask=None, **_unused) -> MaskedLMLossOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        deleted = labels != -100
        original = torch.where(deleted, labels, input_ids)
        sentence = self.sentence_vectors(input_ids, attention_mask.bool() & ~deleted)
        # Teacher forcing: position t predicts token t + 1 of the original text, padding excluded.
        selected = attention_mask[:, 1:].bool().reshape(-1)
        targets = original[:, 1:].reshape(-1)[selected]
        logits = self.counted_logits(original, attention_mask, sentence, selected)
        token_loss = F.cross_entropy(logits.float(), targets, reduction="none")
        loss_sum, counted = per_example_sums(token_loss, selected, original[:, 1:].shape)
        return MaskedLMLossOutput(loss=token_loss.mean(), example_loss_sum=loss_sum, example_masked=counted)
