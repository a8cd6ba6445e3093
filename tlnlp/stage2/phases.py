"""Stage 2 as named phases: attach a task head to a pretrained encoder and fine-tune it on a small labeled
set. `finetune` runs them in order; the command (`tlnlp.finetune`) and the recipes call it or the phases."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import set_seed
from datasets import DatasetDict
from torch import nn
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from tlnlp.core import engines
from tlnlp.core.config import FinetuneConfig, Stage2Config
from tlnlp.core.engines import first_on_each_node
from tlnlp.core.errors import TrainingError, UserInputError
from tlnlp.core.files import PREDICTIONS_FILE
from tlnlp.core.loop import Task, default_param_groups, train
from tlnlp.core.precision import fit_accelerator_to
from tlnlp.core.run import preprocessing_done
from tlnlp.data import builtin
from tlnlp.data.corpus import read_corpus
from tlnlp.data.prepare import (
    cached_map,
    check_label_sets,
    check_labeled_splits,
    ensure_validation,
    infer_task_type,
    label_names,
    load_raw_datasets,
    resolve_text_column,
    stratified_subset,
    tokenize_labeled,
    tokenizer_fingerprint,
)
from tlnlp.models.classifier import encoder_config
from tlnlp.models.modeling import (
    check_tokenizer_and_length,
    count_parameters,
    learning_rate_scales,
    load_model_tokenizer,
    sub_state_dict,
)
from tlnlp.stage2.auxiliary_mlm import ClassifierWithAuxiliaryMLM, check_mlm_class, with_auxiliary_mlm
from tlnlp.stage2.metrics import decided_on, load_metric, selection_metric
from tlnlp.stage2.sanity import sanity_baseline
from tlnlp.stage2.transfer import (
    CachedFeatureClassifier,
    HeadSpec,
    UnfreezeSchedule,
    build_classifier,
    freeze,
    pad_features,
)

logger = logging.getLogger(__name__)

DEFAULT_SEQ_LEN = 128
VALIDATION_PREDICTIONS = "validation_predictions.jsonl"  # written with `predict_validation`


def predict(accelerator, model, dataloader) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits and labels over a whole split, gathered from every process without duplicated tail examples."""
    model.eval()
    all_logits, all_labels = [], []
    with torch.no_grad():
        for batch in dataloader:
            labels = batch.pop("labels", None)
            logits = model(**batch).logits.float()
            gathered = accelerator.gather_for_metrics((logits, labels) if labels is not None else logits)
            if labels is not None:
                all_logits.append(gathered[0].cpu())
                all_labels.append(gathered[1].cpu())
            else:
                all_logits.append(gathered.cpu())
    logits = torch.cat(all_logits).numpy()
    return logits, (torch.cat(all_labels).numpy() if all_labels else None)


def to_predictions(logits: np.ndarray, task_type: str) -> np.ndarray:
    if task_type == "regression":
        return logits[:, 0]
    if task_type == "multi_label":
        return (logits > 0).astype(np.int64)
    return logits.argmax(-1)


def compute_metrics(logits, labels, task_type: str) -> dict[str, float]:
    metric = load_metric(task_type)
    references = labels.astype(np.int64) if task_type == "multi_label" else labels
    return metric.compute(predictions=to_predictions(logits, task_type), references=references)


# ---------------------------------------------------------------------------------------------------------
# Stage 2 as phases. `finetune` runs them in order; a recipe calls it (or the phases) with its own data and
# output folder, on the one Accelerator of the process.
# ---------------------------------------------------------------------------------------------------------


@dataclass
class LabeledData:
    """The checked labeled splits and what was learned from them (phase 1)."""

    splits: DatasetDict  # train, validation and, if given, test
    text_column: str
    text_pair_column: str | None
    label_column: str
    task_type: str
    label_names: list[str]
    pseudo_labeled_rows: int = 0
    copies_of_training_rows: dict[str, int] = field(default_factory=dict)

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.label_names)}


@dataclass
class Classifier:
    """The encoder with its new task head, its tokenizer and the recipe applied to it (phases 2 and 3)."""

    model: nn.Module
    tokenizer: Any
    report: Any  # transfer.SurgeryReport: what was loaded, new, dropped
    max_seq_length: int
    unfreeze: UnfreezeSchedule | None = None
    lr_scales: dict[int, float] = field(default_factory=dict)  # by parameter identity (see apply_recipe)
    # Counted once the recipe is applied, before training: gradual unfreezing changes the count as it goes.
    trainable_parameters: int = 0
    total_parameters: int = 0


def finetune(cfg: Stage2Config, accelerator, raw: DatasetDict, output_dir: Path, *,
             max_train_samples: int | None = None, pseudo_labeled_file: str | None = None,
             restore_best: bool = True, report_copies: bool = True, keep_model: bool = True,
             preprocessed_dataset_dir: str | None = None, preprocess_only: bool = False,
             predict_validation: bool = False) -> dict[str, Any]:
    """One fine-tuning of the recipe `cfg` on the labeled splits `raw`, written to `output_dir`: the
    phases in order. `keep_model` False (a search fold) saves only the evaluation history;
    `predict_validation` also writes the final model's predictions on the validation split (a gate compares
    two runs on them)."""
    fit_accelerator_to(accelerator, cfg)
    if cfg.auxiliary_mlm:  # before the classifier is built: its architecture's own checks come later
        from transformers import AutoConfig

        check_mlm_class(AutoConfig.from_pretrained(builtin.resolve_model(cfg.model_name_or_path),
                                                   trust_remote_code=cfg.trust_remote_code), cfg.model_name_or_path)
    set_seed(cfg.seed)  # each run starts the model initialisation and the data order from the seed
    data = prepare_labeled_data(cfg, raw, max_train_samples=max_train_samples,
                                pseudo_labeled_file=pseudo_labeled_file, report_copies=report_copies)
    classifier = apply_recipe(cfg, make_classifier(cfg, data))
    with first_on_each_node(accelerator):
        tokenized = tokenize(classifier, data, cfg.cache_path,
                             preprocessed_dataset_dir and Path(preprocessed_dataset_dir))
    if preprocess_only:
        return preprocessing_done(accelerator, tokenized)
    results, trained = fit(cfg, accelerator, classifier, data, tokenized, output_dir, restore_best=restore_best,
                           keep_model=keep_model)
    # The prepared model (FSDP gathers its shards in forward); the cached-feature wrapper reads features,
    # so the test split, which has none cached, goes through the plain classifier inside it.
    # (The auxiliary-MLM wrapper is the classifier alone when no unlabeled batch is given.)
    final_model = engines.unwrap(accelerator, trained).model if cfg.cache_frozen_features else trained
    if "test" in tokenized:
        results.update(test(accelerator, final_model, classifier.tokenizer, tokenized["test"], data, output_dir,
                            cfg.per_device_eval_batch_size))
    if predict_validation and "validation" in tokenized:
        test(accelerator, final_model, classifier.tokenizer, tokenized["validation"], data, output_dir,
             cfg.per_device_eval_batch_size, split="validation")
    if keep_model and data.task_type == "single_label":  # a search fold only scores a recipe
        baseline = sanity_check(cfg, data, results)  # on validation, or on test when there is no validation
        if baseline:
            results["sanity_baseline"] = baseline
    return summarize(results, data, classifier, cfg.head_lr)


def finetune_as_configured(cfg: FinetuneConfig, accelerator) -> dict[str, Any]:
    """One fine-tuning on the data, folder and options `cfg` names, as `python -m tlnlp.finetune` runs it
    (the study's runs too)."""
    with first_on_each_node(accelerator):
        raw = read_labeled_splits(train_file=cfg.train_file, validation_file=cfg.validation_file,
                                  test_file=cfg.test_file, dataset_name=cfg.dataset_name,
                                  dataset_config_name=cfg.dataset_config_name, csv_delimiter=cfg.csv_delimiter)
    return finetune(cfg, accelerator, raw, Path(cfg.output_dir), max_train_samples=cfg.max_train_samples,
                    pseudo_labeled_file=cfg.pseudo_labeled_file, restore_best=cfg.restores_best_epoch,
                    preprocessed_dataset_dir=cfg.preprocessed_dataset_dir, preprocess_only=cfg.preprocess_only)


def read_labeled_splits(*, train_file: str | None = None, validation_file: str | None = None,
                        test_file: str | None = None, dataset_name: str | None = None, dataset_config_name: str | None = None,
                        csv_delimiter: str | None = None) -> DatasetDict:
    """Phase 0: the train, validation and test splits of the files or data set named."""
    raw = load_raw_datasets(train_file=train_file, validation_file=validation_file, test_file=test_file,
                            dataset_name=dataset_name, dataset_config_name=dataset_config_name,
                            csv_delimiter=csv_delimiter)
    return DatasetDict({k: v for k, v in raw.items() if k in ("train", "validation", "test")})


def prepare_labeled_data(cfg: Stage2Config, raw: DatasetDict, *, max_train_samples: int | None = None,
                         pseudo_labeled_file: str | None = None, report_copies: bool = True) -> LabeledData:
    """Phase 1: columns and labels checked, a validation split held out if none was given, the training
    labels subsampled (`max_train_samples`) and pseudo-labeled rows appended (after the subset, which
    counts people's labels only). `report_copies` False: the validation split is the training split by
    choice (a progress report, as in the search's final run)."""
    raw = DatasetDict(raw)
    text_column = resolve_text_column(raw["train"], cfg.text_column)
    check_labeled_splits(raw, text_column=text_column, text_pair_column=cfg.text_pair_column,
                         label_column=cfg.label_column)
    raw = ensure_validation(raw, cfg.validation_split_percentage, cfg.seed, needed_by=(
        "Keeping the best epoch (--restore_best_model true, or --early_stopping_patience)"
        if cfg.restores_best_epoch else None))
    train_labels = raw["train"][cfg.label_column]
    task_type = infer_task_type(train_labels) if cfg.task_type == "auto" else cfg.task_type
    if max_train_samples is not None:
        raw["train"] = stratified_subset(raw["train"], cfg.label_column, max_train_samples, task_type,
                                         cfg.stratify, cfg.seed)
        train_labels = raw["train"][cfg.label_column]
    names = label_names(train_labels, task_type)
    pseudo_rows = 0
    if pseudo_labeled_file:
        raw["train"], pseudo_rows = with_pseudo_labels(raw["train"], pseudo_labeled_file, text_column,
                                                       cfg.label_column, cfg.text_pair_column, cfg.csv_delimiter)
    check_label_sets(raw, cfg.label_column, names, task_type)
    copies = copies_of_training_rows(raw, text_column, cfg.text_pair_column) if report_copies else {}
    return LabeledData(raw, text_column, cfg.text_pair_column, cfg.label_column, task_type, names, pseudo_rows,
                       copies)


def make_classifier(cfg: Stage2Config, data: LabeledData) -> Classifier:
    """Phase 2: the encoder of --model_name_or_path with a new task head (or, --from_scratch, random
    weights), its tokenizer and the sequence length, checked against each other."""
    source = builtin.resolve_model(cfg.model_name_or_path)
    tokenizer = load_model_tokenizer(source, builtin.resolve_model(cfg.tokenizer_name, weights=False), cfg.trust_remote_code)
    head = HeadSpec(cfg.head_hidden_sizes_list, cfg.head_dropout, cfg.head_activation, cfg.pooling)
    names = data.label_names
    model, report = build_classifier(
        source, num_labels=len(names), id2label=dict(enumerate(names)), task_type=data.task_type, head=head,
        from_scratch=cfg.from_scratch, trust_remote_code=cfg.trust_remote_code,
    )
    limit = encoder_config(model)
    max_seq_length = cfg.max_seq_length or min(DEFAULT_SEQ_LEN, limit.max_position_embeddings)
    check_tokenizer_and_length(limit, tokenizer, max_seq_length, need_mask=False)
    return Classifier(model, tokenizer, report, max_seq_length)


def apply_recipe(cfg: Stage2Config, classifier: Classifier) -> Classifier:
    """Phase 3: frozen layers, gradual unfreezing and the learning-rate scales (layer-wise decay, the
    head's rate), logged with the head surgery."""
    model = classifier.model
    if cfg.freeze_embeddings or cfg.freeze_layers:
        freeze(model, embeddings=cfg.freeze_embeddings, layers=cfg.freeze_layers)
    classifier.unfreeze = UnfreezeSchedule(model, cfg.unfreeze_schedule) if cfg.unfreeze_schedule else None
    head_scale = cfg.head_lr / cfg.learning_rate
    # By parameter identity: the frozen-feature cache wraps the model and renames its parameters.
    if cfg.layerwise_lr_decay < 1 or head_scale != 1:
        by_name = learning_rate_scales(model, cfg.layerwise_lr_decay, head_scale)
        classifier.lr_scales = {id(param): by_name[name] for name, param in model.named_parameters()}
    trainable, total = classifier.trainable_parameters, classifier.total_parameters = count_parameters(model)
    report = classifier.report
    logger.info(
        "Head surgery on %s:\n  loaded from the checkpoint: %d tensors\n  new: %s\n  dropped: %s\n"
        "  trainable parameters: %s of %s%s\n  learning rate: %g for the encoder, %g for the head",
        report.source, len(report.loaded), ", ".join(report.new) or "none", ", ".join(report.dropped) or "none",
        f"{trainable:,}", f"{total:,}",
        f" (frozen: {'embeddings, ' if cfg.freeze_embeddings else ''}{cfg.freeze_layers} bottom layers)"
        if cfg.freeze_embeddings or cfg.freeze_layers else "", cfg.learning_rate, cfg.head_lr,
    )
    return classifier


def tokenize(classifier: Classifier, data: LabeledData, cache_dir: Path, folder: Path | None) -> DatasetDict:
    """The splits tokenized for the classifier, cached by the inputs and settings (or kept in `folder`)."""
    tokenizer, length = classifier.tokenizer, classifier.max_seq_length

    def build(splits: DatasetDict) -> DatasetDict:
        return DatasetDict({k: tokenize_labeled(
            v, tokenizer, text_column=data.text_column, text_pair_column=data.text_pair_column,
            label_column=data.label_column, max_seq_length=length, task_type=data.task_type,
            label2id=data.label2id,
        ) for k, v in splits.items()})

    key = {"tokenizer": tokenizer_fingerprint(tokenizer), "text": data.text_column, "pair": data.text_pair_column,
           "label": data.label_column, "len": length, "task": data.task_type, "labels": data.label_names,
           "stage": "cls"}
    return cached_map(data.splits, build, key, cache_dir, folder)


# Warn when at least this share of the training texts is cut to the sequence length: then most of the text is
# never read, and the user should choose between that and several times the training time knowingly.
MOSTLY_CUT = 0.5
# The longer read the warning offers (at most the model's positions): the length measured against 128.
READ_MORE = 512


def report_cut_texts(lengths: list[int], max_seq_length: int, model_limit: int) -> str | None:
    """Log how many training texts (their token counts, as tokenized) reach the sequence length, and so were
    cut (or are exactly that long); when most were and the model reads more, return (and log) a warning that
    names the option."""
    cut = sum(length >= max_seq_length for length in lengths)
    share = cut / max(len(lengths), 1)
    logger.info("%d of %d training texts (%.0f%%) reach --max_seq_length %d and are cut to it.", cut, len(lengths),
                100 * share, max_seq_length)
    longer = min(READ_MORE, model_limit)
    if share < MOSTLY_CUT or max_seq_length >= longer:
        return None
    warning = (f"{100 * share:.0f}% of the training texts are longer than --max_seq_length {max_seq_length} and are "
               f"cut to it. --max_seq_length {longer} reads more of them, at several times the training time: on "
               "the built-in email-spam set, where 82% are cut, 512 instead of 128 gained 0.4 points (3 seeds, "
               "within their spread) at 5.3 times the time (BENCHMARKS.md, \"512 tokens instead of 128\").")
    logger.warning(warning)
    return warning


def fit(cfg: Stage2Config, accelerator, classifier: Classifier, data: LabeledData, tokenized: DatasetDict,
        output_dir: Path, *, restore_best: bool = True, keep_model: bool = True) -> tuple[dict[str, Any], nn.Module]:
    """Phase 4: train with the recipe; returns the results and the prepared model (the best one when
    `restore_best`)."""
    model, tokenizer, task_type = classifier.model, classifier.tokenizer, data.task_type
    metric_name, greater_is_better = selection_metric(cfg.metric_for_best_model, task_type)
    collator = DataCollatorWithPadding(tokenizer)

    def evaluate_split(accelerator, model, dataloader) -> dict[str, float]:
        logits, labels = predict(accelerator, model, dataloader)
        metrics = compute_metrics(logits, labels, task_type)
        if task_type == "single_label":  # a constant classifier is the usual failure on small data: watch for it
            metrics["predicted_classes"] = len(np.unique(to_predictions(logits, task_type)))
        return metrics

    def save(unwrapped, folder: Path, state_dict: dict) -> None:
        if isinstance(unwrapped, CachedFeatureClassifier):
            unwrapped, state_dict = unwrapped.model, sub_state_dict(state_dict, "model.")
        if isinstance(unwrapped, ClassifierWithAuxiliaryMLM):  # the MLM head is a training aid: not saved
            unwrapped, state_dict = unwrapped.classifier, sub_state_dict(state_dict, "classifier.")
        unwrapped.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    # No validation split (--validation_split_percentage 0): nothing is evaluated during training.
    train_data = tokenized["train"]
    eval_data = sorted_by_length(tokenized["validation"]) if "validation" in tokenized else None
    train_lengths = [len(ids) for ids in train_data["input_ids"]]
    report_cut_texts(train_lengths, classifier.max_seq_length, encoder_config(model).max_position_embeddings)
    task_model, batch_collator, cache_seconds = model, collator, 0.0
    if cfg.cache_frozen_features:
        started = time.time()
        task_model = CachedFeatureClassifier(model, cfg.freeze_layers).to(accelerator.device)
        cache = dict(batch_size=cfg.per_device_eval_batch_size, device=accelerator.device,
                     pad_token_id=tokenizer.pad_token_id or 0)
        cached_train = task_model.cache(train_data, desc="Caching frozen features (train)", **cache)
        if eval_data is None:  # checked on training examples when there is no validation split
            cached_eval = []
            check_cached_outputs(model, task_model, train_data, cached_train, collator)
        else:
            cached_eval = task_model.cache(eval_data, desc="Caching frozen features (validation)", **cache)
            check_cached_outputs(model, task_model, eval_data, cached_eval, collator)
            eval_data = cached_eval
        train_data, batch_collator = cached_train, pad_features
        cache_seconds = time.time() - started
        megabytes = sum(x["features"].numel() * 4 for x in train_data + cached_eval) / 2**20
        logger.info("Cached the frozen bottom's outputs for %d examples (%.0f MB) in %.1f s.",
                    len(train_data) + len(cached_eval), megabytes, cache_seconds)

    names, scales = data.label_names, classifier.lr_scales
    add_unlabeled_batch, auxiliary = None, None
    if cfg.auxiliary_mlm:
        held_out = {t for split in ("validation", "test") if split in data.splits
                    for t in data.splits[split][data.text_column]}
        with first_on_each_node(accelerator):  # the first process of a machine prepares the data set cache
            corpus = read_corpus(cfg, cfg.auxiliary_mlm, "--auxiliary_mlm", held_out)
        task_model, add_unlabeled_batch, auxiliary = with_auxiliary_mlm(
            cfg, model, tokenizer, corpus, classifier.max_seq_length, accelerator, scales)
    task = Task(
        model=task_model,
        train_dataset=train_data,
        eval_dataset=eval_data,
        train_collator=batch_collator,
        eval_collator=batch_collator,
        train_lengths=train_lengths,
        evaluate=evaluate_split,
        save=save if keep_model else None,
        count_unit="examples",
        count=lambda batch: int(batch["attention_mask"].shape[0]),
        param_groups=lambda m: default_param_groups(m, cfg.learning_rate, cfg.weight_decay,
                                                    lambda param: scales.get(id(param), 1.0)),
        metric_for_best_model=metric_name if eval_data is not None else None,
        greater_is_better=greater_is_better,
        restore_best=restore_best,
        early_stopping_patience=cfg.early_stopping_patience,
        min_train_steps=cfg.min_train_steps,
        average_last_epochs=cfg.average_last_epochs,
        before_optimizer_step=classifier.unfreeze,
        on_batch=add_unlabeled_batch,
        summary={"task": f"{task_type} ({len(names)} labels)" if task_type != "regression" else "regression",
                 "start": classifier.report.source, "sequence length": classifier.max_seq_length},
    )
    results, trained = train(cfg, task, accelerator, output_dir=output_dir, checkpoints=keep_model)
    results["eval_examples"] = 0 if eval_data is None else len(eval_data)
    if auxiliary:
        results["auxiliary_mlm"] = {**auxiliary, "mean_mlm_loss": engines.unwrap(accelerator, trained).mean_mlm_loss()}
    if restore_best and eval_data is not None:
        warning = decided_on(
            "The best epoch (--restore_best_model)", len(eval_data),
            "Give a --validation_file of 200 or more examples, raise --validation_split_percentage (now "
            f"{cfg.validation_split_percentage:g}%), or keep the last model with --restore_best_model false.")
        if warning:
            results["small_validation_warning"] = warning
    if cache_seconds:  # the caching is part of the training cost
        results["feature_cache_s"] = cache_seconds
        results["train_runtime_s"] += cache_seconds
        results["train_examples_per_s"] = results["train_examples"] / results["train_runtime_s"]
    return results, trained


def sanity_check(cfg: Stage2Config, data: LabeledData, results: dict[str, Any]) -> dict[str, Any]:
    """TF-IDF + logistic regression on the same training labels, scored on the same validation split, beside
    the fine-tuned model's validation score (tlnlp.stage2.sanity). Without a validation split, on the test
    split (a warning, nothing is chosen by it); without either, there is nothing to compare."""
    def texts(split) -> list[str]:
        first = split[data.text_column]
        if not data.text_pair_column:
            return first
        return [f"{a} {b}" for a, b in zip(first, split[data.text_pair_column])]

    split = "validation" if "validation" in data.splits else "test"
    train, scored = data.splits["train"], data.splits.get(split)
    if scored is None or data.label_column not in scored.column_names:
        logger.info("No labeled validation or test split: the sanity baseline is not computed.")
        return {}
    metric = selection_metric(cfg.metric_for_best_model, data.task_type)[0]
    return sanity_baseline(texts(train), train[data.label_column], texts(scored), scored[data.label_column],
                           results, metric, cfg.seed, split)


def summarize(results: dict[str, Any], data: LabeledData, classifier: Classifier, head_lr: float) -> dict[str, Any]:
    """The run's results with what describes the data and the model, and the underfitting warning."""
    if data.copies_of_training_rows:
        results["copies_of_training_rows"] = data.copies_of_training_rows
    warning = underfitting_warning(results, len(data.label_names), data.task_type)
    if warning:
        logger.warning(warning)
        results["underfitting_warning"] = warning
    results.update(task_type=data.task_type, label_names=data.label_names, train_set_size=len(data.splits["train"]),
                   trainable_parameters=classifier.trainable_parameters,
                   total_parameters=classifier.total_parameters, head_learning_rate=head_lr)
    if data.pseudo_labeled_rows:
        results["pseudo_labeled_rows"] = data.pseudo_labeled_rows
    return results


def with_pseudo_labels(train, pseudo_labeled_file: str, text_column: str, label_column: str,
                       text_pair_column: str | None, csv_delimiter: str | None):
    """The training split with the rows of `pseudo_labeled_file` appended; returns it and their count."""
    from datasets import concatenate_datasets

    pseudo = load_raw_datasets(train_file=pseudo_labeled_file, validation_file=None, dataset_name=None,
                               dataset_config_name=None, csv_delimiter=csv_delimiter,
                               train_option="--pseudo_labeled_file")["train"]
    missing = [c for c in (text_column, label_column) if c not in pseudo.column_names]
    if missing:
        raise UserInputError(f"--pseudo_labeled_file {pseudo_labeled_file} lacks the column(s) {', '.join(missing)} "
                             f"that the training data has. Columns found: {', '.join(pseudo.column_names)}.")
    pseudo = pseudo.select_columns([text_column, label_column]).cast(
        train.select_columns([text_column, label_column]).features)
    kept = train.select_columns([c for c in train.column_names if c in (text_column, label_column, text_pair_column)])
    return concatenate_datasets([kept, pseudo]), len(pseudo)


def copies_of_training_rows(raw: DatasetDict, text_column: str, pair_column: str | None) -> dict[str, int]:
    """Validation and test rows whose text (and pair) is exactly a training row's. With 1k labels a few
    such copies inflate every reported score; they are counted, warned about and kept in all_results.json."""
    def keys(split):
        pairs = split[pair_column] if pair_column else [None] * len(split)
        return list(zip(split[text_column], pairs))

    training = set(keys(raw["train"]))
    found = {}
    for name in ("validation", "test"):
        if name in raw and text_column in raw[name].column_names:
            copies = sum(key in training for key in keys(raw[name]))
            if copies:
                found[name] = copies
                logger.warning("%d of the %d %s rows are exact copies of training rows: their scores measure memory, "
                               "not generalisation. Remove them from one side.", copies, len(raw[name]), name)
    return found


def underfitting_warning(results: dict[str, Any], num_labels: int, task_type: str) -> str | None:
    """A model that predicts one class for the whole validation set, or no better than chance (MCC <= 0)."""
    if task_type != "single_label" or num_labels < 2:
        return None
    # Read on the validation split; without one (--validation_split_percentage 0), on the test split's MCC,
    # which is 0 for a model that predicts one class.
    split = "validation" if "eval_mcc" in results else "test"
    classes = results.get("eval_predicted_classes")
    mcc = results.get("eval_mcc" if split == "validation" else "test_mcc")
    if classes != 1 and (mcc is None or mcc > 0):
        return None
    found = ("predicts one class for every validation example" if classes == 1 else
             f"has MCC {mcc:.3f} on the {split} split (chance)")
    return (f"The model {found}: it learned nothing usable from the labels. Likely fixes: a higher "
            "--head_learning_rate (the new head starts from random weights), more --num_train_epochs, or fewer "
            "--freeze_layers.")


def sorted_by_length(split):
    """Evaluation order does not matter to the metrics; sorted, batches carry little padding."""
    lengths = [len(ids) for ids in split["input_ids"]]
    return split.select(sorted(range(len(split)), key=lambda i: lengths[i]))


def check_cached_outputs(model, cached: CachedFeatureClassifier, eval_data, cached_eval, collator) -> None:
    """The cached path must give the plain model's logits (eval mode) before any training relies on it."""
    n = min(8, len(eval_data))
    full_batch = collator([{k: v for k, v in eval_data[i].items() if k != "labels"} for i in range(n)])
    cached_batch = pad_features(cached_eval[:n])
    cached_batch.pop("labels", None)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        expected = model(**{k: v.to(device) for k, v in full_batch.items()}).logits
        found = cached(**{k: v.to(device) for k, v in cached_batch.items()}).logits
    model.train(was_training)
    if not torch.allclose(expected, found, atol=1e-4, rtol=1e-3):
        raise TrainingError(
            f"--cache_frozen_features does not reproduce {type(model.base_model).__name__}'s outputs (largest "
            f"difference {(expected - found).abs().max().item():.2e}). Run without --cache_frozen_features."
        )


def test(accelerator, model, tokenizer, tokenized_split, data: LabeledData, output_dir: Path,
         batch_size: int, split: str = "test") -> dict[str, Any]:
    """Phase 5: evaluate the final (best) model on the test split (or `split`) and write one prediction per
    line, to test_predictions.jsonl (`{split}_predictions.jsonl`).

    In fp32 even when training used autocast: the reported numbers and predictions are then exactly what the
    saved model gives when loaded with the stock Auto classes or `pipeline`. (DeepSpeed and FSDP hold their
    own low-precision weights and keep them.)"""
    dataloader = accelerator.prepare(DataLoader(tokenized_split, batch_size=batch_size,
                                                collate_fn=DataCollatorWithPadding(tokenizer)))
    if accelerator.mixed_precision != "no" and not (engines.uses_fsdp(accelerator) or engines.uses_deepspeed(accelerator)):
        # Removes Accelerate's autocast wrapper from the forward; training is over, nothing else runs it.
        model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    logits, labels = predict(accelerator, model, dataloader)
    task_type, names, raw = data.task_type, data.label_names, data.splits[split]
    metrics = compute_metrics(logits, labels, task_type) if labels is not None else {}
    if accelerator.is_main_process:
        predictions_file = {"test": PREDICTIONS_FILE, "validation": VALIDATION_PREDICTIONS}[split]
        with (output_dir / predictions_file).open("w", encoding="utf-8") as f:
            # The column the run resolved (given or auto-detected), which may not be called "text".
            texts = raw[data.text_column] if data.text_column in raw.column_names else None
            truth = raw[data.label_column] if data.label_column in raw.column_names else None
            for i, row in enumerate(_prediction_rows(logits, task_type, names)):
                extra = {"text": texts[i]} if texts else {}
                if truth is not None:
                    extra["true_label"] = truth[i]
                f.write(json.dumps({**extra, **row}) + "\n")
    logger.info("%s: %s", split, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return {f"{split}_{k}": v for k, v in metrics.items()}


def _prediction_rows(logits: np.ndarray, task_type: str, names: list[str]):
    if task_type == "regression":
        for value in logits[:, 0]:
            yield {"score": float(value)}
        return
    if task_type == "multi_label":
        probabilities = 1 / (1 + np.exp(-logits))
        for row in probabilities:
            yield {"labels": [n for n, p in zip(names, row) if p > 0.5],
                   "probabilities": {n: float(p) for n, p in zip(names, row)}}
        return
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities = shifted / shifted.sum(-1, keepdims=True)
    for row in probabilities:
        yield {"label": names[int(row.argmax())], "probabilities": {n: float(p) for n, p in zip(names, row)}}
