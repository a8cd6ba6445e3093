"""MLM as an auxiliary loss during fine-tuning (`--auxiliary_mlm`; Chronopoulou et al. 2019, "An Embarrassingly
Simple Approach for Transfer Learning from Pretrained Language Models").

Each training batch of labeled examples is joined by a batch of unlabeled texts of the task's kind, BERT-masked;
the loss is the task's plus `--auxiliary_mlm_weight` x the MLM loss at the masked positions. The encoder keeps
predicting the words of the domain while it learns the labels, which guards it against forgetting what it knew
and adapts it to the domain in the same run: no separate stage 1, nothing cached.

The MLM head is the checkpoint's own when it has one; otherwise (minilm-l6) a new head, at the task head's
learning rate. Its vocabulary projection is tied to the classifier's word embeddings, as in pretraining. Only
the classifier is saved: the head is a training aid, and the saved model loads with the stock Auto classes.

The unlabeled batches are drawn in the training loop (`Task.on_batch`): a seeded order over the corpus, each
process its own share, the masks from the global RNG like stage 1's. A resumed run continues the labeled
batches exactly, but starts the unlabeled order again.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForMaskedLM, DataCollatorForLanguageModeling

from tlnlp.core.errors import UserInputError
from tlnlp.data import builtin
from tlnlp.data.corpus import Corpus
from tlnlp.data.prepare import mask_batch, pad_for_masking
from tlnlp.models.classifier import encoder_config
from tlnlp.models.modeling import (
    apply_lm_head,
    lm_head_names,
    load_mlm_model,
    quiet_transformers,
    require_masked_lm_class,
)

logger = logging.getLogger(__name__)

MASKING_RATE = 0.15  # BERT's


def check_mlm_class(config, model_name: str) -> None:
    """Before any work: the encoder's architecture needs a masked-LM class (for its MLM head)."""
    require_masked_lm_class(config, model_name, "--auxiliary_mlm", "it has no MLM head to predict with")


def check_mask_token(tokenizer, model_name: str) -> None:
    if tokenizer.mask_token is None:
        raise UserInputError(f"--auxiliary_mlm: the tokenizer of {model_name} has no mask token, so its texts cannot "
                             "be masked. Use the checkpoint's own tokenizer, or fine-tune without --auxiliary_mlm.")


class ClassifierWithAuxiliaryMLM(nn.Module):
    """forward(labeled batch, plus `mlm_*` fields while training) -> the classifier's output, its loss with
    the weighted MLM loss added. Without the `mlm_*` fields (evaluation) it is the classifier alone."""

    def __init__(self, classifier: nn.Module, mlm_model: nn.Module, weight: float):
        super().__init__()
        self.classifier = classifier
        names = lm_head_names(mlm_model)
        if names is None:
            raise UserInputError(f"--auxiliary_mlm: tlnlp does not know where the MLM head of a "
                                 f"{type(mlm_model).__name__} is. Fine-tune without --auxiliary_mlm.")
        # Only the head modules are kept (the MLM model's own encoder is dropped); their vocabulary projection
        # is the classifier's word embeddings, tied as in pretraining.
        self.head = nn.ModuleDict({name: getattr(mlm_model, name) for name in names})
        output, embeddings = mlm_model.get_output_embeddings(), classifier.base_model.get_input_embeddings()
        if getattr(encoder_config(classifier), "tie_word_embeddings", True) and output is not None:
            output.weight = embeddings.weight
        self.head_names, self.weight = names, weight
        # A running mean of the MLM loss, on the device (no host sync per step), for the results.
        self.register_buffer("mlm_loss_sum", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("mlm_batches", torch.zeros((), dtype=torch.float64), persistent=False)

    def mlm_loss(self, input_ids, attention_mask, labels) -> torch.Tensor:
        hidden = self.classifier.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        selected = labels.reshape(-1) != -100
        logits = apply_lm_head(self.head, self.head_names, hidden.reshape(-1, hidden.size(-1))[selected])
        if not logits.numel():  # no masked token: touch every parameter, so data-parallel gradient sync agrees
            return logits.sum() * 0.0
        return F.cross_entropy(logits.float(), labels.reshape(-1)[selected])

    def forward(self, mlm_input_ids=None, mlm_attention_mask=None, mlm_labels=None, **batch):
        output = self.classifier(**batch)
        if mlm_input_ids is None or output.loss is None:
            return output
        mlm = self.mlm_loss(mlm_input_ids, mlm_attention_mask, mlm_labels)
        self.mlm_loss_sum += mlm.detach().double()
        self.mlm_batches += 1
        output.loss = output.loss + self.weight * mlm
        return output

    def mean_mlm_loss(self) -> float | None:
        return (self.mlm_loss_sum / self.mlm_batches).item() if self.mlm_batches.item() else None


class UnlabeledBatches:
    """`Task.on_batch`: adds a masked batch of unlabeled texts (`mlm_input_ids`, `mlm_attention_mask`,
    `mlm_labels`) to each labeled training batch, as many texts as the labeled batch has examples."""

    def __init__(self, rows: list[dict], tokenizer, seed: int, process_index: int, num_processes: int):
        self.rows, self.pad = rows, pad_for_masking(tokenizer)
        self.masker = DataCollatorForLanguageModeling(tokenizer, mlm_probability=MASKING_RATE)
        self.order_generator = torch.Generator().manual_seed(seed)
        self.share, self.processes = process_index, num_processes
        self.order: list[int] = []
        self.position = 0

    def next_rows(self, count: int) -> list[dict]:
        chosen = []
        while len(chosen) < count:
            if self.position == len(self.order):  # a new pass: a new seeded order, this process's share of it
                order = torch.randperm(len(self.rows), generator=self.order_generator).tolist()
                self.order = order[self.share::self.processes] or order  # a tiny corpus: every process reads it all
                self.position = 0
            chosen.append(self.rows[self.order[self.position]])
            self.position += 1
        return chosen

    def __call__(self, batch: dict) -> dict:
        unlabeled = mask_batch(self.pad([dict(row) for row in self.next_rows(len(batch["input_ids"]))]), self.masker)
        return {**batch, "mlm_input_ids": unlabeled["input_ids"], "mlm_attention_mask": unlabeled["attention_mask"],
                "mlm_labels": unlabeled["labels"]}


def with_auxiliary_mlm(cfg, model: nn.Module, tokenizer, corpus: Corpus, max_seq_length: int, accelerator,
                       lr_scales: dict[int, float]) -> tuple[ClassifierWithAuxiliaryMLM, UnlabeledBatches, dict[str, Any]]:
    """The classifier with the MLM head joined, the loop's `on_batch`, and the record for the results. The
    head's own parameters are added to `lr_scales` (in place): the task head's rate for a new head."""
    check_mlm_class(encoder_config(model), cfg.model_name_or_path)
    check_mask_token(tokenizer, cfg.model_name_or_path)
    if cfg.from_scratch:
        with quiet_transformers():
            mlm_model = AutoModelForMaskedLM.from_config(encoder_config(model), trust_remote_code=cfg.trust_remote_code)
        new_head = True
    else:
        mlm_model, report = load_mlm_model(builtin.resolve_model(cfg.model_name_or_path), cfg.trust_remote_code)
        new_head = bool(report.new)
    wrapped = ClassifierWithAuxiliaryMLM(model, mlm_model, cfg.auxiliary_mlm_weight).to(next(model.parameters()).device)
    del mlm_model
    head_scale = cfg.head_lr / cfg.learning_rate if new_head else 1.0
    classifier_params = {id(param) for param in model.parameters()}  # the tied embeddings keep their own rate
    lr_scales.update({id(param): head_scale for param in wrapped.head.parameters() if id(param) not in classifier_params})
    encoded = tokenizer(corpus.texts, truncation=True, max_length=max_seq_length, return_special_tokens_mask=True,
                        return_token_type_ids=False)
    rows = [{"input_ids": ids, "special_tokens_mask": special}
            for ids, special in zip(encoded["input_ids"], encoded["special_tokens_mask"])]
    batches = UnlabeledBatches(rows, tokenizer, cfg.seed, accelerator.process_index, accelerator.num_processes)
    record = {"corpus": corpus.source, "corpus_texts": len(rows), "weight": cfg.auxiliary_mlm_weight,
              "masking_rate": MASKING_RATE, "head": "new" if new_head else "checkpoint",
              "head_learning_rate": head_scale * cfg.learning_rate}
    logger.info("Auxiliary MLM loss (weight %g) on %s: %d texts; %s MLM head at learning rate %g.",
                cfg.auxiliary_mlm_weight, corpus.source, len(rows), "a new" if new_head else "the checkpoint's",
                record["head_learning_rate"])
    return wrapped, batches, record
