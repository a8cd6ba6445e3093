"""Stage 1: masked-language-model pretraining, from scratch or continued from a checkpoint."""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict
from transformers import AutoModelForMaskedLM, DataCollatorForLanguageModeling, DataCollatorForTokenClassification

from tlnlp.core.config import PretrainConfig, new_head_lr
from tlnlp.core.engines import first_on_each_node, from_main_process
from tlnlp.core.errors import UserInputError
from tlnlp.core.loop import Task, default_param_groups, loader_workers, train
from tlnlp.core.run import end_run, preprocessing_done, start_run
from tlnlp.data import builtin
from tlnlp.data.prepare import (
    STREAMING_VALIDATION_DOCS,
    cached_map,
    drop_blank_texts,
    ensure_validation,
    load_raw_datasets,
    mask_batch,
    mask_once,
    mlm_rows,
    pad_for_masking,
    prepare_mlm_dataset,
    resolve_text_column,
    sequence_lengths,
    tokenizer_fingerprint,
    tokenizing_processes,
)
from tlnlp.data.streaming import ShardedStream
from tlnlp.models.modeling import (
    check_tokenizer_and_length,
    learning_rate_scales,
    load_mlm_model,
    load_model_tokenizer,
    load_tokenizer,
    scratch_config,
    tokenizer_from_json,
    train_wordpiece,
)
from tlnlp.models.objectives import checked_objective

logger = logging.getLogger(__name__)

TOKENIZER_TRAINING_DOCS = 200_000  # enough text for a WordPiece vocabulary; a streamed corpus may be endless
DEFAULT_SCRATCH_SEQ_LEN = 128
DEFAULT_HEAD_WARMUP = 100  # DATA.md: MiniLM's new head reaches ~9% masked accuracy after 150 head-only steps


def corpus_tokenizer(train, text_column: str, cfg: PretrainConfig) -> str:
    """A WordPiece tokenizer trained on the corpus (as tokenizers' JSON), cached by corpus and settings.

    Training gives the same vocabulary on every machine (see `train_wordpiece`); the cache saves a second
    run the training and lets it reuse the tokenized data.
    """
    # A streamed corpus has no fingerprint: it is named by its source instead.
    fingerprint = getattr(train, "_fingerprint", None) or f"{cfg.train_file}/{cfg.dataset_name}/{cfg.dataset_config_name}"
    # "v2": vocabularies cached before training was made deterministic are not reused.
    key = hashlib.sha256(f"v2/{fingerprint}/{text_column}/{cfg.vocab_size}/{cfg.lowercase}".encode()).hexdigest()
    folder = cfg.cache_path / "tokenizers" / key[:20]
    if (folder / "tokenizer.json").exists():
        logger.info("Reusing the WordPiece tokenizer trained earlier on this corpus: %s", folder)
        return (folder / "tokenizer.json").read_text(encoding="utf-8")

    def texts():
        rows = itertools.islice(iter(train), TOKENIZER_TRAINING_DOCS)
        return (row[text_column] for row in rows if isinstance(row[text_column], str))

    tokenizer = train_wordpiece(texts, cfg.vocab_size, cfg.lowercase)
    logger.info("Trained a WordPiece tokenizer on the training corpus: %d tokens.", len(tokenizer))
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, folder)
    except OSError:  # another run saved one first: use that
        shutil.rmtree(tmp, ignore_errors=True)
    return (folder / "tokenizer.json").read_text(encoding="utf-8")


def check_stream_size(train, held_out: int, slots: int) -> None:
    """A stream needs one document per slot (process x loader worker) beyond its validation head; read
    that many now, so a too-small corpus is named before any training (and not as a worker's error)."""
    needed = held_out + slots
    found = sum(1 for _ in itertools.islice(iter(train), needed))
    if found < needed:
        raise UserInputError(
            f"The streamed corpus holds {found} document(s); it needs at least {needed}: {held_out} held out for "
            f"validation (give --validation_file to hold none out) and one for each of the {slots} processes x "
            "loader workers (--dataloader_num_workers)."
        )


class HeadWarmup:
    """Head-only warm-up: for the first `steps` optimizer steps only the new MLM head's parameters are
    updated. A random head's first gradients are large and meaningless; through a frozen encoder they cannot
    disturb what it learned. The encoder's gradients are dropped before each of those steps: no update, no
    optimizer state, no decay.

    Under data parallelism (DDP, FSDP, DeepSpeed: a process group exists) the encoder keeps `requires_grad`,
    which the wrapper registered once. In a single process it also stops requiring gradients after the first
    step (the optimizer, built before it, must hold its parameters), so backward stops at the head: a warm-up
    step of MiniLM costs about half a full step on a CPU. It requires them again for the first step after."""

    def __init__(self, model: torch.nn.Module, new_parameter_names: list[str], steps: int):
        new = set(new_parameter_names)
        self.waiting = [p for name, p in model.named_parameters() if name not in new and p.requires_grad]
        self.steps = steps
        self.skip_backward = not (torch.distributed.is_available() and torch.distributed.is_initialized())

    def __call__(self, step: int, epoch: int) -> None:
        if step < self.steps:
            for param in self.waiting:
                param.grad = None
                # After the last warm-up step's backward: the next step trains the encoder again.
                param.requires_grad_(not self.skip_backward or step == self.steps - 1)
        elif step == self.steps:
            logger.info("Head-only warm-up done after %d steps: the encoder trains from now on.", self.steps)


def head_warmup_steps(cfg: PretrainConfig, new_head: list[str], total_steps: int | None) -> int:
    """--head_warmup_steps, or by default 100 steps when the checkpoint has no MLM head (a random head) and
    none when it has one, at most half of a run whose --max_train_steps is given."""
    if cfg.head_warmup_steps is not None:
        if total_steps and cfg.head_warmup_steps >= total_steps:
            logger.warning("--head_warmup_steps %d covers the whole run of %d steps: the encoder will not train.",
                           cfg.head_warmup_steps, total_steps)
        return cfg.head_warmup_steps
    steps = DEFAULT_HEAD_WARMUP if new_head else 0
    return min(steps, total_steps // 2) if total_steps else steps


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Stage 1 as configured, as `python -m tlnlp.pretrain` runs it: the run's checks and Accelerate, the
    training (`run_pretraining`) and the run's files."""
    checked_objective(cfg)
    accelerator, hub_repo = start_run(cfg)
    results = run_pretraining(cfg, accelerator)
    if cfg.preprocess_only:
        return results
    end_run(cfg, accelerator, results, "pretrain", hub_repo)
    return results


def run_pretraining(cfg: PretrainConfig, accelerator) -> dict[str, Any]:
    """Stage 1 on the given Accelerator: a tokenizer (trained, or the checkpoint's), the data, the
    objective's model and the training loop, which saves the model in --output_dir. A recipe (continued
    pretraining before fine-tuning) calls this and writes the run's files itself."""
    objective = checked_objective(cfg)
    model_source = builtin.resolve_model(cfg.model_name_or_path)

    with first_on_each_node(accelerator):
        raw = load_raw_datasets(
            train_file=cfg.train_file, validation_file=cfg.validation_file, dataset_name=cfg.dataset_name,
            dataset_config_name=cfg.dataset_config_name, streaming=cfg.streaming, csv_delimiter=cfg.csv_delimiter,
        )
        text_column = resolve_text_column(raw["train"], cfg.text_column)
        raw = drop_blank_texts(raw, text_column)
        held_out = 0 if "validation" in raw else STREAMING_VALIDATION_DOCS  # a stream's head, when it is the validation
        raw = ensure_validation(raw, cfg.validation_split_percentage, cfg.seed, cfg.streaming,
                                needed_by="Stage 1 (its validation loss and perplexity)")

    trained_tokenizer = False
    if cfg.tokenizer_name or model_source:
        tokenizer_source = builtin.resolve_model(cfg.tokenizer_name, weights=False)
        tokenizer = load_model_tokenizer(model_source, tokenizer_source, cfg.trust_remote_code)
    elif cfg.config_name:
        tokenizer = load_tokenizer(cfg.config_name, cfg.trust_remote_code)
    else:
        # Trained (or read from its cache) by the main process alone, then sent to every rank: one training,
        # not one per process, and a rank can never pick up another vocabulary from a stale node-local cache.
        tokenizer_json = corpus_tokenizer(raw["train"], text_column, cfg) if accelerator.is_main_process else None
        tokenizer = tokenizer_from_json(from_main_process(accelerator, tokenizer_json), cfg.lowercase)
        trained_tokenizer = True

    new_head: list[str] = []
    if model_source:
        model, report = load_mlm_model(model_source, cfg.trust_remote_code)
        new_head = list(report.new) if objective.reads_mlm_head else []
        if new_head:
            logger.warning(
                "%s has no MLM head weights (%s): the head is initialised randomly and learned in this run; "
                "the encoder weights all come from the checkpoint.", cfg.model_name_or_path, ", ".join(report.new)
            )
        max_seq_length = cfg.max_seq_length or min(512, model.config.max_position_embeddings)
    else:
        max_seq_length = cfg.max_seq_length or DEFAULT_SCRATCH_SEQ_LEN
        config = scratch_config(
            tokenizer, model_size=cfg.model_size, config_name=cfg.config_name, architecture=cfg.architecture,
            max_seq_length=max_seq_length,
            trust_remote_code=cfg.trust_remote_code,
            overrides={name: getattr(cfg, name) for name in
                       ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")},
        )
        model = AutoModelForMaskedLM.from_config(config)
    check_tokenizer_and_length(model.config, tokenizer, max_seq_length)

    # Masks are drawn in the training loop from the global RNG, which checkpoints restore (see Task.on_batch).
    masker = DataCollatorForLanguageModeling(
        tokenizer, mlm_probability=cfg.mlm_probability, whole_word_mask=cfg.whole_word_mask, **objective.masking(),
    )
    prepare = dict(text_column=text_column, max_seq_length=max_seq_length, line_by_line=cfg.line_by_line,
                   whole_word_mask=cfg.whole_word_mask)

    def build(splits: DatasetDict) -> DatasetDict:
        tokenized = {k: prepare_mlm_dataset(v, tokenizer, num_proc=cfg.preprocessing_num_workers or
                                            tokenizing_processes(len(v)), **prepare)
                     for k, v in splits.items() if k in ("train", "validation")}
        # Validation masks are drawn once from a fixed seed, so perplexity is comparable run to run.
        tokenized["validation"] = mask_once(tokenized["validation"], tokenizer, masker, cfg.seed)
        return DatasetDict(tokenized)

    if cfg.streaming:
        slots = accelerator.num_processes * max(1, loader_workers(cfg, accelerator))
        check_stream_size(raw["train"], held_out, slots)
        rows = functools.partial(mlm_rows, tokenizer=tokenizer, max_seq_length=max_seq_length,
                                 line_by_line=cfg.line_by_line, whole_word_mask=cfg.whole_word_mask)
        train_data = ShardedStream(raw["train"], rows, text_column, rank=accelerator.process_index,
                                   world_size=accelerator.num_processes, held_out=held_out)
        # The held-out head of the stream is small: materialize it, so it is masked and evaluated like any split.
        eval_data = build(DatasetDict({"validation": Dataset.from_list(list(raw["validation"]))}))["validation"]
    else:
        with first_on_each_node(accelerator):
            key = {"tokenizer": tokenizer_fingerprint(tokenizer), **prepare, "mlm_probability": cfg.mlm_probability,
                   "seed": cfg.seed, "stage": "mlm"}
            tokenized = cached_map(raw, build, key, cfg.cache_path,
                                   cfg.preprocessed_dataset_dir and Path(cfg.preprocessed_dataset_dir))
        if cfg.preprocess_only:
            return preprocessing_done(accelerator, tokenized)
        train_data, eval_data = tokenized["train"], tokenized["validation"]

    warmup_steps = head_warmup_steps(cfg, new_head, cfg.max_train_steps)
    warmup = HeadWarmup(model, new_head, warmup_steps) if warmup_steps else None
    if warmup:
        logger.info("Head-only warm-up: the first %d optimizer steps train only the new MLM head (%s); the encoder "
                    "is frozen meanwhile.", warmup_steps, ", ".join(new_head))
    built = objective.build(model, cfg, tokenizer)
    # A new (random) head learns faster than the trained encoder, as stage 2's task head does, and so do the
    # objective's new parameters; layer-wise decay slows the layers further from the head. By parameter
    # identity: the objective may wrap the model.
    new_rate = new_head_lr(cfg.learning_rate, cfg.new_head_learning_rate) / cfg.learning_rate
    head_scale = new_rate if new_head else 1.0
    scales = {}
    if cfg.layerwise_lr_decay < 1 or head_scale != 1 or built.new_parameters:
        by_name = learning_rate_scales(model, cfg.layerwise_lr_decay, head_scale)
        scales = {id(p): by_name[name] for name, p in model.named_parameters()}
        scales |= {id(p): new_rate for p in built.new_parameters}
    del model  # held by `built.model` where the objective keeps it
    task = Task(
        model=built.model,
        evaluate=built.evaluate,
        save=built.save,
        train_dataset=train_data,
        eval_dataset=eval_data,
        train_collator=pad_for_masking(tokenizer),
        on_batch=lambda batch: mask_batch(batch, masker),
        # Packed sequences all have the same length; lines vary, and grouping them saves padding.
        train_lengths=sequence_lengths(train_data) if cfg.line_by_line and not cfg.streaming else None,
        eval_collator=DataCollatorForTokenClassification(tokenizer),  # pads labels with -100
        param_groups=(lambda m: default_param_groups(m, cfg.learning_rate, cfg.weight_decay,
                                                     lambda p: scales.get(id(p), 1.0))) if scales else None,
        before_optimizer_step=warmup,
        summary={
            "objective": built.summary,
            "start": cfg.model_name_or_path or (f"from scratch ({cfg.config_name})" if cfg.config_name else
                                                f"from scratch ({cfg.architecture}, {cfg.model_size or 'tiny'} size)"),
            "tokenizer": f"{len(tokenizer)} tokens" + (" (trained on this corpus)" if trained_tokenizer else ""),
            "sequence length": f"{max_seq_length} ({'line by line' if cfg.line_by_line else 'packed'})",
            objective.chosen_tokens: f"{cfg.mlm_probability:.0%}" + (" whole words" if cfg.whole_word_mask else ""),
            **({"head-only warm-up": f"{warmup_steps} steps"} if warmup else {}),
            **({"layer-wise decay": f"{cfg.layerwise_lr_decay:g}"} if cfg.layerwise_lr_decay < 1 else {}),
            **({"new head's learning rate": f"{head_scale * cfg.learning_rate:g}"} if new_head else {}),
        },
    )
    results, _ = train(cfg, task, accelerator)
    results["objective"] = objective.name
    if new_head:
        results["new_head_learning_rate"] = head_scale * cfg.learning_rate
    if warmup:
        results["head_warmup_steps"] = warmup_steps
    objective.finish(results)
    return results
