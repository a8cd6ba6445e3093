"""All configuration, in one place.

Each stage has one dataclass. The command line and YAML files fill the same dataclasses
(`parse_config`); `__post_init__` validates every field before any work starts. Flag names
follow Hugging Face's `run_mlm_no_trainer.py` / `run_glue_no_trainer.py` where they overlap.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from transformers import HfArgumentParser

from tlnlp.core.errors import UserInputError


def cache_root() -> Path:
    """Where built-ins, trained tokenizers and tokenized data are cached: $TLNLP_HOME or ~/.cache/tlnlp."""
    return Path(os.environ.get("TLNLP_HOME", Path.home() / ".cache" / "tlnlp"))


def _help(text: str, default: Any = None, aliases: list[str] | None = None, **kwargs: Any) -> Any:
    metadata = {"help": text, **({"aliases": aliases} if aliases else {})}
    return field(default=default, metadata=metadata, **kwargs)


# The task head's default learning rate: a multiple of the encoder's, at most HEAD_LR_CAP, where Adam on a freshly
# initialised head stops being stable (a tiny encoder's head at 6e-2 ended as a constant classifier). Measured in
# BENCHMARKS.md, "The head's learning rate".
HEAD_LR_MULTIPLIER = 20
HEAD_LR_CAP = 1e-2


# Stage 2's least number of optimizer steps (--min_train_steps): 100 gained 2.4 points on average over the six
# built-in sets at 200 labels, 3 seeds, no set below its seed spread (measured at batch 8; it changes nothing at
# 1,000 labels: 180 steps at batch 16). BENCHMARKS.md, "A floor under the training length on small sets".
MIN_TRAIN_STEPS = 100


def new_head_lr(learning_rate: float, given: float | None) -> float:
    """A new (random) head's learning rate: `given`, else HEAD_LR_MULTIPLIER x the encoder's capped at
    HEAD_LR_CAP (never below the encoder's own rate). Stage 2's task head and stage 1's new MLM head."""
    if given:
        return given
    return max(learning_rate, min(HEAD_LR_MULTIPLIER * learning_rate, HEAD_LR_CAP))


SchedulerName = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
]


@dataclass
class TrainingConfig:
    """Options shared by both stages: data files, the training loop, checkpoints, output."""

    config: str | None = _help("A YAML file with any of these options; the command line overrides it.")
    output_dir: str | None = _help("Where the model, tokenizer, results and checkpoints are written (required).")
    overwrite_output_dir: bool = _help("Allow writing into an output_dir that holds an earlier run.", False)
    seed: int = _help("Random seed for initialisation, data order, masking and sampling.", 42)

    # Inputs
    train_file: str | None = _help("Training data: .txt (one document per line), .csv, .json or .jsonl.")
    validation_file: str | None = _help("Validation data, same formats as --train_file.")
    dataset_name: str | None = _help(
        "A built-in data set (see `python -m tlnlp.builtin list`) or a Hugging Face Hub dataset id."
    )
    dataset_config_name: str | None = _help("The Hub dataset's configuration name.")
    csv_delimiter: str | None = _help("Field separator of .csv files (default ','); write a tab as '\\t'.")
    text_column: str | None = _help("Column holding the text (default: 'text', or the first string column).")
    validation_split_percentage: float = _help(
        "Percent of the training data held out for validation when no validation data is given. Stage 2 "
        "takes 0: train on every label, evaluate nothing during training (the sanity baseline and the "
        "underfitting check then read the test split, if one is given); options that choose by a validation "
        "score (--restore_best_model true, --early_stopping_patience, self-training) then need a "
        "--validation_file.", 5.0
    )
    max_seq_length: int | None = _help(
        "Tokens per sequence; longer texts are truncated or packed. Default: fine-tuning 128 (at most the model's "
        "position embeddings), the length the stage-2 defaults were chosen at; pretraining from a checkpoint "
        "min(512, its position embeddings), from scratch 128. Also --max_length, as Hugging Face's no_trainer "
        "scripts spell it.", aliases=["--max_length"]
    )
    preprocessing_num_workers: int | None = _help(
        "Processes used for tokenization (default: every core for a corpus of 20,000 documents or more, else 1)."
    )
    dataloader_num_workers: int | None = _help(
        "Data-loader worker processes per training process (default: 0 on a CPU, where they would take cores from "
        "training; 2 on a GPU). With --streaming the workers also tokenize: each document once, by one worker."
    )
    cache_dir: str | None = _help("Where tokenized data sets are cached (default: ~/.cache/tlnlp).")

    # Model and tokenizer
    model_name_or_path: str | None = _help("A local model folder, a built-in model name, or a Hub model id.")
    tokenizer_name: str | None = _help("A tokenizer folder or Hub id, if not the model's own.")
    trust_remote_code: bool = _help("Allow code shipped with a Hub model or dataset to run. Off by default.", False)

    # The training loop
    per_device_train_batch_size: int = _help("Batch size per process for training.", 8)
    per_device_eval_batch_size: int = _help("Batch size per process for evaluation.", 16)
    learning_rate: float = _help("Peak learning rate (after warm-up).", 5e-5)
    weight_decay: float = _help("AdamW weight decay (never applied to biases and LayerNorm weights).", 0.0)
    num_train_epochs: float = _help("Epochs to train (ignored when --max_train_steps is set).", 3.0)
    max_train_steps: int | None = _help("Total optimizer steps; overrides --num_train_epochs.")
    gradient_accumulation_steps: int = _help("Micro-batches summed before each optimizer step.", 1)
    lr_scheduler_type: SchedulerName = _help("Learning-rate schedule after warm-up.", "linear")
    num_warmup_steps: int = _help("Optimizer steps of linear warm-up.", 0)
    max_grad_norm: float = _help("Clip the global gradient norm to this (0 turns clipping off).", 1.0)
    layerwise_lr_decay: float = _help(
        "Multiply the learning rate by this factor for each layer further below the head (1.0: no decay).", 1.0
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = _help(
        "Autocast precision. auto: what `accelerate launch`/its config says, else bf16 where the hardware computes "
        "it natively (GPUs that support it; CPUs with AVX512-BF16 or AMX), else fp32 ('no'). The test split is "
        "always evaluated in fp32.", "auto"
    )
    group_by_length: bool = _help(
        "Batch examples of similar length together (batches still come in random order), so less padding is "
        "computed. Used for fine-tuning and --line_by_line pretraining; packed pretraining has no padding.", True
    )
    torch_compile: bool = _help(
        "Compile the model with torch.compile (inductor). Pays a one-off compile time for faster steps; best on GPUs.",
        False,
    )
    logging_steps: int = _help("Log loss, learning rate and throughput every N optimizer steps.", 10)
    eval_steps: int | None = _help("Evaluate every N optimizer steps (default: at the end of every epoch).")
    checkpointing_steps: str | None = _help(
        "Save a resumable checkpoint every N optimizer steps, or 'epoch' at each epoch's end."
    )
    save_total_limit: int | None = _help("Keep at most this many checkpoints (oldest removed first).")
    resume_from_checkpoint: str | None = _help("A checkpoint folder, or 'latest' to continue the newest one.")
    ddp_timeout: int = _help(
        "Seconds a process waits for the others (e.g. while the main process tokenizes) before the run fails. "
        "For very long preprocessing, run once with --preprocess_only first.", 7200
    )
    preprocess_only: bool = _help(
        "Tokenize the data into the cache (or --preprocessed_dataset_dir) and exit. Run it as one process before "
        "a multi-GPU job, which then loads the result instead of tokenizing.", False
    )
    preprocessed_dataset_dir: str | None = _help(
        "Keep the tokenized data in this folder (default: a folder under --cache_dir named by a hash of the data "
        "and settings). Reused when it matches the data and settings; a mismatch is an error."
    )
    on_nonfinite_loss: Literal["stop", "skip"] = _help(
        "What a NaN/inf loss does: stop the run (default) or skip that batch.", "stop"
    )
    push_to_hub: bool = _help("Push the final model (with a model card) to the Hugging Face Hub.", False)
    hub_model_id: str | None = _help("Hub repo id 'user/name' (default: the output folder's name, in your namespace).")
    hub_token: str | None = _help("Hub token with write access (default: HF_TOKEN or the saved login).")
    hub_private_repo: bool = _help("Create the Hub repo as private.", False)
    model_license: str = _help("Licence declared in the model card (an SPDX-like id, e.g. apache-2.0).", "other")
    with_tracking: bool = _help("Write metrics to an experiment tracker.", False)
    report_to: str = _help("Tracker for --with_tracking: tensorboard, wandb, ... or 'all'.", "tensorboard")

    def __post_init__(self) -> None:
        if not self.output_dir and not self.preprocess_only:
            raise UserInputError("--output_dir is required: the folder where the trained model and results go.")
        positive = {
            "per_device_train_batch_size": self.per_device_train_batch_size,
            "per_device_eval_batch_size": self.per_device_eval_batch_size,
            "learning_rate": self.learning_rate,
            "num_train_epochs": self.num_train_epochs,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "logging_steps": self.logging_steps,
        }
        optional_positive = {
            "max_train_steps": self.max_train_steps,
            "eval_steps": self.eval_steps,
            "save_total_limit": self.save_total_limit,
            "max_seq_length": self.max_seq_length,
            "preprocessing_num_workers": self.preprocessing_num_workers,
            "ddp_timeout": self.ddp_timeout,
        }
        positive.update({k: v for k, v in optional_positive.items() if v is not None})
        for name, value in positive.items():
            if not value > 0:
                raise UserInputError(f"--{name} must be greater than 0, got {value}.")
        if self.dataloader_num_workers is not None and self.dataloader_num_workers < 0:
            raise UserInputError(f"--dataloader_num_workers must be 0 or more, got {self.dataloader_num_workers}.")
        if not 0 < self.layerwise_lr_decay <= 1:
            raise UserInputError(f"--layerwise_lr_decay must be in (0, 1], got {self.layerwise_lr_decay}.")
        for name in ("weight_decay", "num_warmup_steps", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise UserInputError(f"--{name} must be 0 or more, got {getattr(self, name)}.")
        if not 0 <= self.validation_split_percentage < 100:
            raise UserInputError(
                f"--validation_split_percentage must be from 0 up to 100, got {self.validation_split_percentage}."
            )
        if self.checkpointing_steps is not None and self.checkpointing_steps != "epoch":
            if not self.checkpointing_steps.isdigit() or int(self.checkpointing_steps) <= 0:
                raise UserInputError(
                    f"--checkpointing_steps must be a positive integer or 'epoch', got {self.checkpointing_steps!r}."
                )
        if self.preprocess_only and getattr(self, "streaming", False):
            raise UserInputError("--preprocess_only does not apply to --streaming, which tokenizes as it trains.")
        if self.csv_delimiter in ("\\t", "tab"):
            self.csv_delimiter = "\t"
        if self.csv_delimiter is not None and len(self.csv_delimiter) != 1:
            raise UserInputError(f"--csv_delimiter must be one character, got {self.csv_delimiter!r}.")
        if self.train_file and self.dataset_name:
            raise UserInputError("Give either --train_file or --dataset_name, not both.")

    @property
    def cache_path(self) -> Path:
        """--cache_dir, or the package's cache root."""
        return Path(self.cache_dir) if self.cache_dir else cache_root()

    @property
    def checkpoint_every(self) -> int | None:
        """Optimizer steps between checkpoints, or None (no step checkpoints)."""
        if self.checkpointing_steps and self.checkpointing_steps != "epoch":
            return int(self.checkpointing_steps)
        return None


ModelSize = Literal["tiny", "mini", "small", "medium", "base"]


@dataclass
class PretrainConfig(TrainingConfig):
    """Stage 1: masked-language-model pretraining, from scratch or continued from a checkpoint."""

    streaming: bool = _help(
        "Stream the corpus instead of preparing it up front (for corpora larger than memory); needs --max_train_steps.",
        False,
    )
    line_by_line: bool = _help(
        "One sequence per line/document, padded per batch, instead of packing texts into full blocks.", False
    )
    objective: Literal["mlm", "electra", "tsdae", "simcse"] = _help(  # the names in tlnlp.models.objectives.OBJECTIVES
        "mlm: masked-language modelling (BERT). electra: replaced-token detection (ELECTRA, Clark et al. 2020): a "
        "small generator fills the masked positions with its samples and the encoder learns to tell, at every "
        "token, original from replaced; the encoder is saved, the generator in generator/. From scratch only. "
        "tsdae: a denoising auto-encoder over sentences (TSDAE, Wang et al. 2021): the encoder reads each text with "
        "--mlm_probability of its tokens deleted, and a decoder sharing its weights must rebuild the whole text "
        "from the encoder's mean-pooled sentence vector alone; the encoder is saved. simcse: unsupervised SimCSE "
        "(Gao et al. 2021): each text is embedded twice (mean-pooled), the passes differing by dropout, and the "
        "encoder learns to find a text's second embedding among the batch's; the encoder alone trains and is "
        "saved; a checkpoint is needed. tsdae and simcse are for sentence-embedding checkpoints (minilm-l6).",
        "mlm",
    )
    mlm_probability: float | None = _help(
        "Fraction of tokens chosen: masked for the MLM loss (with --objective electra: the generator's), deleted "
        "from the encoder's input with --objective tsdae, masked in validation's second view of each text with "
        "--objective simcse (default 0.15; 0.6 with tsdae, the paper's).", None
    )
    whole_word_mask: bool = _help("Mask every sub-word of a chosen word together.", False)
    generator_size_fraction: float | None = _help(
        "--objective electra: the generator's share of the encoder's layers, at the same width so both share the "
        "token embeddings (default 1/3, at least one layer).", None
    )
    discriminator_weight: float | None = _help(
        "--objective electra: weight of the replaced-token loss against the generator's MLM loss (default 50, "
        "the paper's).", None
    )

    # From scratch
    model_size: ModelSize | None = _help(
        "Architecture preset for training from scratch: tiny (2x128), mini (4x256), small (4x512), medium (8x512), base (12x768)."
    )
    architecture: Literal["bert", "modernbert"] = _help(
        "From scratch: the encoder family the --model_size preset builds. bert: learned absolute positions, as in "
        "BERT. modernbert: rotary positions and pre-layer-norm (ModernBERT); at small budgets it leaves the "
        "unigram plateau of MLM training far sooner (docs/stage1.md, 'Stage 1 budget').",
        "bert",
    )
    config_name: str | None = _help("A config.json folder or Hub id giving the architecture to train from scratch.")
    num_hidden_layers: int | None = _help("From scratch: encoder layers (overrides the preset).")
    hidden_size: int | None = _help("From scratch: hidden size (overrides the preset).")
    num_attention_heads: int | None = _help("From scratch: attention heads (overrides the preset).")
    intermediate_size: int | None = _help("From scratch: feed-forward size (overrides the preset).")
    vocab_size: int = _help("From scratch without --tokenizer_name: WordPiece vocabulary size to train.", 8000)
    lowercase: bool = _help("From scratch: lower-case text when training the tokenizer.", True)
    head_warmup_steps: int | None = _help(
        "Continuing a checkpoint that has no MLM head (a sentence-embedding model such as minilm-l6): train only "
        "the new head for the first N optimizer steps, the encoder frozen, so updates through a random head do "
        "not disturb what the encoder learned (default: 100 when the head is new, 0 when the checkpoint has one)."
    )
    new_head_learning_rate: float | None = _help(
        f"Continuing a checkpoint that has no MLM head: the new head's learning rate (default: {HEAD_LR_MULTIPLIER} x "
        f"--learning_rate, at most {HEAD_LR_CAP:g}), as stage 2 gives its new task head: at the encoder's rate a "
        "random head learns too slowly for the encoder to get useful gradients. A head from the checkpoint learns "
        "at --learning_rate."
    )
    sparse_mlm_head: bool = _help(
        "Compute the MLM head only at masked positions (same loss, far less work). Turn off to compare.", True
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mlm_probability is not None and not 0 < self.mlm_probability < 1:
            raise UserInputError(f"--mlm_probability must be between 0 and 1, got {self.mlm_probability}.")
        if self.streaming and self.max_train_steps is None:
            raise UserInputError(
                "--streaming needs --max_train_steps: a streamed corpus has no known length to count epochs by."
            )
        if self.architecture != "bert" and (self.model_name_or_path or self.config_name):
            raise UserInputError(
                f"--architecture {self.architecture} applies to the --model_size presets; the checkpoint or "
                "--config_name already fixes the architecture. Drop one of them."
            )
        if self.model_name_or_path and (self.model_size or self.config_name):
            raise UserInputError(
                "--model_name_or_path continues from a checkpoint; --model_size/--config_name start from scratch. "
                "Give one or the other."
            )
        for name in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserInputError(f"--{name} must be greater than 0, got {value}.")
        if self.new_head_learning_rate is not None and self.new_head_learning_rate <= 0:
            raise UserInputError(f"--new_head_learning_rate must be greater than 0, got {self.new_head_learning_rate}.")
        if self.head_warmup_steps is not None and self.head_warmup_steps < 0:
            raise UserInputError(f"--head_warmup_steps must be 0 or more, got {self.head_warmup_steps}.")
        if self.vocab_size < 100:
            raise UserInputError(f"--vocab_size must be at least 100, got {self.vocab_size}.")
        # The options of --objective are checked by its object (tlnlp.models.objectives), which pretrain asks first.


TaskType = Literal["auto", "single_label", "multi_label", "regression"]


@dataclass
class Stage2Config(TrainingConfig):
    """Stage 2: attach a task head to a pretrained encoder and fine-tune it on labeled data. These are the
    options the stage-2 phases read (`tlnlp.finetune`); the recipes' own options are in their groups below."""

    # Stage 2's own loop defaults (stage 1 keeps TrainingConfig's): over the six built-in labeled sets x 3 seeds
    # at 1,000 labels, 1e-4 at batch 16 scored +0.3 points on average against 5e-5 at batch 8, no set below its
    # seed spread, in half the optimizer steps. BENCHMARKS.md, "The stock recipe's encoder rate and batch".
    per_device_train_batch_size: int = _help("Batch size per process for training.", 16)
    learning_rate: float = _help("Peak learning rate of the encoder (after warm-up); the new head's is "
                                 "--head_learning_rate.", 1e-4)
    test_file: str | None = _help("Test data, evaluated once at the end with the model the run keeps.")
    text_pair_column: str | None = _help("Second text column, for sentence-pair tasks.")
    label_column: str = _help("Column holding the labels.", "label")
    task_type: TaskType = _help(
        "single_label, multi_label (list-valued labels) or regression (float labels); auto infers it.", "auto"
    )
    max_train_samples: int | None = _help("Use at most N training examples (see --stratify).")
    stratify: bool = _help("With --max_train_samples: keep the class proportions (seeded).", True)

    from_scratch: bool = _help(
        "Same architecture and tokenizer as --model_name_or_path, but random weights: the no-transfer baseline.", False
    )
    head_hidden_sizes: str = _help("Hidden layers of the task head, e.g. '512,256' (empty: a single linear layer).", "")
    head_dropout: float | None = _help("Dropout in the task head (default: the encoder's hidden dropout).")
    head_activation: Literal["gelu", "relu", "tanh"] = _help("Activation between the head's hidden layers.", "gelu")
    pooling: Literal["cls", "mean"] = _help(
        "How the encoder's outputs become one vector: the [CLS] token through BERT's pooler, or the masked mean.",
        "cls",
    )

    freeze_embeddings: bool = _help("Keep the embedding layer fixed.", False)
    freeze_layers: int = _help("Keep the bottom K encoder layers fixed.", 0)
    cache_frozen_features: bool = _help(
        "With --freeze_embeddings: compute the frozen embeddings and bottom --freeze_layers layers once and train "
        "the rest from their cached outputs. Dropout is then off in the frozen part; memory grows with the "
        "number of training tokens x hidden size.", False
    )
    unfreeze_schedule: str | None = _help(
        "Gradual unfreezing (ULMFiT): start with the whole encoder frozen and unfreeze one more layer from the top "
        "at each 'epoch', or every N optimizer steps ('N'). Layers held by --freeze_layers stay frozen."
    )
    head_learning_rate: float | None = _help(
        f"Learning rate of the new task head (default: {HEAD_LR_MULTIPLIER} x --learning_rate, at most "
        f"{HEAD_LR_CAP:g} unless --learning_rate is higher). The head starts from random weights and the encoder "
        "from trained ones, so the head needs the larger steps: at the encoder's own rate a small labeled set "
        "can end as a constant classifier. BENCHMARKS.md has the measurements behind the default."
    )

    metric_for_best_model: str | None = _help(
        "Validation metric that picks the best checkpoint, and the recipe in a search (default by task: accuracy, "
        "micro_f1, or for regression mse, where lower is better)."
    )
    restore_best_model: bool | None = _help(
        "At the end, go back to the best evaluated model instead of keeping the last step's. Default: on with "
        "--early_stopping_patience (that run ends past its best), off otherwise: on 1,000 labels the epoch picked "
        "on a small validation split scored below the last epoch on average (BENCHMARKS.md, 'Keep the last "
        "epoch'). Self-training picks its round on the validation split unless this is false."
    )
    early_stopping_patience: int | None = _help("Stop after N evaluations without improvement of the best metric.")
    min_train_steps: int = _help(
        "Train at least this many optimizer steps: when --num_train_epochs gives fewer (a small training set), "
        "whole epochs are added until it does (0: off; ignored with --max_train_steps). 3 epochs of 200 labels "
        "are about 40 steps at batch 16, too few for a new head to leave a constant classifier "
        "(BENCHMARKS.md, 'A floor under the training length on small sets').", MIN_TRAIN_STEPS
    )
    average_last_epochs: float = _help(
        "End with the average of the weights after every optimizer step of the last N epochs (tail averaging), "
        "not the last step's weights: the average lands less on where the last batches happened to push the "
        "model (0: off). Works in one process and under DDP; not with --restore_best_model true or "
        "--early_stopping_patience, which pick one evaluated model instead.", 0.0
    )

    auxiliary_mlm: str | None = _help(
        "Add a masked-language-model loss on unlabeled text to fine-tuning's loss (Chronopoulou et al. 2019): "
        "'task' (the texts of the training split, labeled or not), a text file, or a built-in/Hub data set; never "
        "a validation or test text. Every training batch brings as many of these texts, masked as in BERT's "
        "pretraining, whose tokens the encoder predicts through the checkpoint's MLM head (a new one, at the task "
        "head's rate, if it has none). About twice the compute of a step; only the classifier is saved."
    )
    auxiliary_mlm_weight: float = _help(
        "Weight of the auxiliary MLM loss, added to the task's loss at every step (the MLM loss starts near 10 "
        "through a new head, several times a task's).", 0.1
    )

    pseudo_labeled_file: str | None = _help(
        "Extra training rows whose labels a model predicted (self-training writes these): counted apart in "
        "all_results.json and named in the model card. Same format and columns as --train_file."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.freeze_layers < 0:
            raise UserInputError(f"--freeze_layers must be 0 or more, got {self.freeze_layers}.")
        if self.head_dropout is not None and not 0 <= self.head_dropout < 1:
            raise UserInputError(f"--head_dropout must be in [0, 1), got {self.head_dropout}.")
        if self.head_learning_rate is not None and self.head_learning_rate <= 0:
            raise UserInputError(f"--head_learning_rate must be greater than 0, got {self.head_learning_rate}.")
        if self.min_train_steps < 0:
            raise UserInputError(f"--min_train_steps must be 0 or more, got {self.min_train_steps}.")
        if self.early_stopping_patience is not None and self.early_stopping_patience <= 0:
            raise UserInputError(
                f"--early_stopping_patience must be greater than 0, got {self.early_stopping_patience}."
            )
        if self.average_last_epochs < 0:
            raise UserInputError(f"--average_last_epochs must be 0 or more, got {self.average_last_epochs:g}.")
        if self.average_last_epochs and self.restores_best_epoch:
            raise UserInputError(
                f"--average_last_epochs {self.average_last_epochs:g} ends with the average of the last epochs' "
                "weights, --restore_best_model (or --early_stopping_patience, which turns it on) with one evaluated "
                "model: choose one. Drop --average_last_epochs, or pass --restore_best_model false."
            )
        if self.max_train_samples is not None and self.max_train_samples <= 0:
            raise UserInputError(f"--max_train_samples must be greater than 0, got {self.max_train_samples}.")
        if self.unfreeze_schedule is not None and self.unfreeze_schedule != "epoch":
            if not self.unfreeze_schedule.isdigit() or int(self.unfreeze_schedule) <= 0:
                raise UserInputError(
                    f"--unfreeze_schedule must be 'epoch' or a positive number of steps, got {self.unfreeze_schedule!r}."
                )
        if self.cache_frozen_features and not self.freeze_embeddings:
            raise UserInputError(
                "--cache_frozen_features needs --freeze_embeddings (and usually --freeze_layers K): only a frozen "
                "bottom of the encoder gives the same outputs every epoch."
            )
        if self.cache_frozen_features and self.unfreeze_schedule:
            raise UserInputError(
                "--cache_frozen_features cannot be combined with --unfreeze_schedule: thawed layers change their outputs."
            )
        if self.auxiliary_mlm == "":
            raise UserInputError("--auxiliary_mlm needs a value: 'task', a text file or a data set name.")
        if not self.auxiliary_mlm_weight > 0:
            raise UserInputError(f"--auxiliary_mlm_weight must be greater than 0, got {self.auxiliary_mlm_weight:g}.")
        if self.auxiliary_mlm and self.cache_frozen_features:
            raise UserInputError(
                "--auxiliary_mlm runs the whole encoder on its unlabeled texts; --cache_frozen_features skips the "
                "frozen bottom for the labeled ones. Drop one of the two."
            )
        _ = self.head_hidden_sizes_list  # validates the format before any work starts

    @property
    def head_lr(self) -> float:
        """The task head's learning rate: --head_learning_rate, else HEAD_LR_MULTIPLIER x --learning_rate
        capped at HEAD_LR_CAP (never below the encoder's own rate)."""
        return new_head_lr(self.learning_rate, self.head_learning_rate)

    @property
    def head_hidden_sizes_list(self) -> list[int]:
        text = self.head_hidden_sizes.strip()
        if not text:
            return []
        try:
            sizes = [int(part) for part in text.split(",")]
        except ValueError:
            sizes = []
        if not sizes or any(size <= 0 for size in sizes):
            raise UserInputError(
                f"--head_hidden_sizes must be comma-separated positive integers such as '512,256', got {text!r}."
            )
        return sizes

    @property
    def restores_best_epoch(self) -> bool:
        """--restore_best_model as given, else on only with early stopping (which ends past the best epoch)."""
        if self.restore_best_model is not None:
            return self.restore_best_model
        return self.early_stopping_patience is not None


@dataclass
class SearchOptions:
    """Recipe search (`tlnlp.recipes.search`)."""

    search_trials: int | None = _help(
        "Search the recipe first: N Optuna trials (TPE) over learning rate, epochs, batch size, warm-up, weight "
        "decay, pooling, frozen layers, layer-wise decay and head dropout, each scored by --search_folds-fold "
        "cross-validation on the training labels (or on --validation_file); then train the final model with the "
        "best recipe on all the labels. Writes search/ (trials.csv, best_config.yaml, search.png); a killed "
        "search resumes when run again."
    )
    search_folds: int = _help("Cross-validation folds that score each search trial (without --validation_file).", 3)
    search_space: str | None = _help(
        "A YAML file that narrows or widens the search: option: {low, high, log} | [choices] | value | null."
    )

    def __post_init__(self) -> None:
        if self.search_trials is not None and self.search_trials <= 0:
            raise UserInputError(f"--search_trials must be greater than 0, got {self.search_trials}.")
        if not 2 <= self.search_folds <= 20:
            raise UserInputError(f"--search_folds must be between 2 and 20, got {self.search_folds}.")


@dataclass
class SelfTrainingOptions:
    """Self-training on unlabeled text (`tlnlp.recipes.self_training`)."""

    unlabeled_file: str | None = _help(
        "Unlabeled text for self-training (.txt one document per line, .csv, .json, .jsonl): a teacher trained on the "
        "labels labels it, and its confident, class-balanced predictions join the labels to train a student."
    )
    unlabeled_dataset: str | None = _help("A built-in data set or Hub dataset id as the unlabeled text (its train split).")
    unlabeled_text_column: str | None = _help("Text column of the unlabeled data (default: 'text', or the first string column).")
    self_training_rounds: int | None = _help(
        "Teacher -> pseudo-labels -> student rounds; each student teaches the next (default 1 with unlabeled data)."
    )
    pseudo_label_precision: float = _help(
        "Keep a pseudo-label only above the confidence at which the teacher's predictions on the held-out labels "
        "are this precise (the threshold is chosen on the validation split, never the test split), and never "
        "below halfway between chance and certainty (0.75 for two classes).", 0.9
    )
    pseudo_labels_per_class: int | None = _help(
        "At most this many pseudo-labels per class, the most confident (default: the labeled examples per class)."
    )
    max_unlabeled_samples: int = _help(
        "Label at most this many unlabeled texts per round; --unlabeled_selection says which.", 20000
    )
    unlabeled_selection: Literal["first", "similar"] = _help(
        "Which --max_unlabeled_samples texts to label when the unlabeled data holds more: 'first', the first N, "
        "or 'similar', those nearest a labeled text in the encoder's mean-pooled embedding (retrieval as in "
        "SentAugment, Du et al. 2021), for a broad corpus of which only part is like the labeled texts.", "first"
    )
    unlabeled_pool_size: int = _help(
        "--unlabeled_selection similar chooses among the first this many unlabeled texts, and embeds them all "
        "(MiniLM embedded about 160 sentences a second on 2 CPU cores).", 100000
    )

    def __post_init__(self) -> None:
        unlabeled = self.unlabeled_file or self.unlabeled_dataset
        if self.unlabeled_file and self.unlabeled_dataset:
            raise UserInputError("Give --unlabeled_file or --unlabeled_dataset, not both.")
        if self.self_training_rounds is not None and self.self_training_rounds < 0:
            raise UserInputError(f"--self_training_rounds must be 0 or more, got {self.self_training_rounds}.")
        if self.self_training_rounds and not unlabeled:
            raise UserInputError(
                f"--self_training_rounds {self.self_training_rounds} needs unlabeled text to pseudo-label: add "
                "--unlabeled_file FILE or --unlabeled_dataset NAME."
            )
        if unlabeled and self.self_training_rounds is None:
            self.self_training_rounds = 1
        if not 0 < self.pseudo_label_precision <= 1:
            raise UserInputError(f"--pseudo_label_precision must be in (0, 1], got {self.pseudo_label_precision}.")
        if self.pseudo_labels_per_class is not None and self.pseudo_labels_per_class <= 0:
            raise UserInputError(f"--pseudo_labels_per_class must be greater than 0, got {self.pseudo_labels_per_class}.")
        if self.max_unlabeled_samples <= 0:
            raise UserInputError(f"--max_unlabeled_samples must be greater than 0, got {self.max_unlabeled_samples}.")
        if self.unlabeled_pool_size < self.max_unlabeled_samples:
            raise UserInputError(f"--unlabeled_pool_size ({self.unlabeled_pool_size}) must be at least "
                                 f"--max_unlabeled_samples ({self.max_unlabeled_samples}): the texts to label are "
                                 "chosen from the pool.")


@dataclass
class ContinuedPretrainingOptions:
    """Continued pretraining before fine-tuning (`tlnlp.recipes.continued_pretraining`)."""

    continued_pretraining: str | None = _help(
        "Continue the encoder's pretraining before fine-tuning: 'task' (TAPT: the texts of the training split, "
        "labeled or not, never the validation or test texts), a text file, or a built-in/Hub data set (DAPT: its "
        "train split); several joined by '+' run in turn ('speech-passages+task': DAPT, then TAPT). Runs stage 1's "
        "code, caches the adapted encoder by its inputs (a second seed or a search reuses it), and scores it "
        "against the original (--continued_pretraining_gate) to decide which is kept (--keep_adapted_encoder); "
        "all_results.json and the model card record both scores."
    )
    continued_pretraining_objective: Literal["mlm", "tsdae", "simcse"] = _help(
        "The continued pretraining's objective (stage 1's --objective): mlm, masked-language modelling; tsdae, "
        "a denoising auto-encoder over sentences that trains the mean-pooled sentence vector directly (Wang et al. "
        "2021); simcse, contrastive learning between two dropout passes over each text (Gao et al. 2021). tsdae "
        "and simcse are for sentence-embedding checkpoints such as minilm-l6 (docs/stage1.md compares them).", "mlm"
    )
    continued_pretraining_steps: int = _help(
        "Optimizer steps of the continued pretraining (of each corpus, when several are joined by '+').", 300
    )
    continued_pretraining_learning_rate: float = _help(
        "Peak learning rate of the continued pretraining, for the top encoder layer; lower layers get less "
        "(--continued_pretraining_layer_decay), so what the checkpoint learned is kept.", 5e-5
    )
    continued_pretraining_layer_decay: float = _help(
        "Layer-wise learning-rate decay of the continued pretraining (1.0: every layer at the full rate).", 0.8
    )
    continued_pretraining_batch_size: int = _help("Sequences per optimizer step of the continued pretraining.", 16)
    continued_pretraining_gate: Literal["finetune", "probe"] = _help(
        "How the adapted encoder is judged against the original. finetune: both are fine-tuned alike (same "
        "seed, recipe and labels) and compared on the validation split, the standard error of the difference by "
        "paired bootstrap; the kept encoder's fine-tuning is the run's model, so this costs one fine-tuning "
        "more. probe: frozen mean-pooled features + logistic regression, --continued_pretraining_folds-fold "
        "cross-validation on the training labels; cheap, but blind to damage that shows only after "
        "fine-tuning (docs/stage1.md).", "finetune"
    )
    continued_pretraining_folds: int = _help(
        "Folds of the probe gate's cross-validation (--continued_pretraining_gate probe).", 5
    )
    keep_adapted_encoder: Literal["unless_worse", "if_better", "always"] = _help(
        "The gate's rule. unless_worse: keep the adapted encoder unless it scores below the original by more "
        "than the standard error of the difference (damage); "
        "if_better: only if it is above by more than that (with the probe on six built-in sets this refused "
        "gains and scored -0.02 points against the defaults on average, unless_worse +0.5); "
        "always: whatever the score (the scores are still recorded).", "unless_worse"
    )

    def __post_init__(self) -> None:
        for name in ("continued_pretraining_steps", "continued_pretraining_learning_rate",
                     "continued_pretraining_batch_size"):
            if not getattr(self, name) > 0:
                raise UserInputError(f"--{name} must be greater than 0, got {getattr(self, name)}.")
        if not 0 < self.continued_pretraining_layer_decay <= 1:
            raise UserInputError(
                f"--continued_pretraining_layer_decay must be in (0, 1], got {self.continued_pretraining_layer_decay}."
            )
        if not 2 <= self.continued_pretraining_folds <= 20:
            raise UserInputError(
                f"--continued_pretraining_folds must be between 2 and 20, got {self.continued_pretraining_folds}."
            )
        if self.continued_pretraining == "":
            raise UserInputError("--continued_pretraining needs a value: 'task', a text file or a data set name.")


@dataclass
class FinetuneConfig(ContinuedPretrainingOptions, SelfTrainingOptions, SearchOptions, Stage2Config):
    """The options of `python -m tlnlp.finetune`: stage 2's, then each recipe's group (one flat set on the
    command line and in YAML files)."""

    def __post_init__(self) -> None:
        Stage2Config.__post_init__(self)
        SearchOptions.__post_init__(self)
        SelfTrainingOptions.__post_init__(self)
        ContinuedPretrainingOptions.__post_init__(self)
        if self.continued_pretraining and self.from_scratch:
            raise UserInputError(
                "--continued_pretraining adapts the pretrained weights of --model_name_or_path; --from_scratch "
                "discards them. Drop one of the two."
            )
        if self.self_training_rounds and self.search_trials:
            raise UserInputError(
                "--search_trials and --self_training_rounds cannot be combined in one run: search first, then "
                "self-train with --config search/best_config.yaml."
            )


def _yaml_to_argv(path: str, config_class: type) -> list[str]:
    """Turn a YAML file into command-line arguments, so both go through the same parser and types."""
    file = Path(path)
    if not file.is_file():
        raise UserInputError(f"--config {path}: no such file. Give the path of a YAML file of options.")
    try:
        values = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise UserInputError(f"--config {path} is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise UserInputError(f"--config {path} must hold a mapping of option: value, found {type(values).__name__}.")
    known = {f.name for f in dataclasses.fields(config_class)} - {"config"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserInputError(
            f"--config {path}: unknown option(s) {', '.join(unknown)}. Valid options: {', '.join(sorted(known))}."
        )
    argv: list[str] = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        if isinstance(value, (dict, tuple, set)):
            raise UserInputError(f"--config {path}: option {key} must be a single value, got {value!r}.")
        argv += [f"--{key}", str(value)]
    return argv


def parse_config(config_class: type, argv: list[str] | None = None):
    """Fill `config_class` from an optional `--config file.yaml` and the command line (which wins)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(config_class)
    yaml_path = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            yaml_path = argv[i + 1]
        elif arg.startswith("--config="):
            yaml_path = arg.split("=", 1)[1]
    full_argv = (_yaml_to_argv(yaml_path, config_class) if yaml_path else []) + argv
    try:
        namespace, unknown = parser.parse_known_args(full_argv)
    except SystemExit as exit_:
        if exit_.code == 0:  # --help
            raise
        raise UserInputError("Invalid command-line options (see the message above and --help).") from None
    if unknown:
        raise UserInputError(f"Unknown option(s): {' '.join(unknown)}. Run with --help to see the valid ones.")
    return config_class(**vars(namespace))


def config_to_dict(config: Any) -> dict[str, Any]:
    """The resolved configuration, as written next to the model (secrets removed)."""
    values = dataclasses.asdict(config)
    for secret in ("hub_token",):
        values.pop(secret, None)
    return values
