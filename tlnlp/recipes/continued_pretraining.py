"""Continued pretraining before fine-tuning, in one command (Gururangan et al. 2020, "Don't Stop Pretraining"):

    python -m tlnlp.finetune --model_name_or_path minilm-l6 --dataset_name speech-eras --max_train_samples 1000 \\
        --continued_pretraining task --output_dir runs/tapt

- The corpus: `task` (TAPT) is the texts of the training split, labeled or not, after the validation split
  is held out; a file or a data set (DAPT) is its train split. Texts that are exactly a validation or test
  text are always dropped from it, so the adapted encoder never saw what it is judged on. Corpora joined by
  `+` run in turn, each continuing the encoder the one before it made: `speech-passages+task` is DAPT then
  TAPT, Gururangan et al.'s best combination.
- Stage 1 runs through stage 1's own code (`tlnlp.stage1.pretrain.run_pretraining`) on the process's
  Accelerator: MLM, line by line at the fine-tuning sequence length. A checkpoint without an MLM head
  gets a head-only warm-up and the new head a higher learning rate; layer-wise decay of the learning rate
  moves the encoder least where it learned most.
- The adapted encoder is cached under the cache folder by everything that made it (checkpoint, corpus,
  options, precision), not by the fine-tuning seed: a second seed, a search or a self-training run reuse it.
- The gate (--continued_pretraining_gate) decides which encoder is kept; by default
  (--keep_adapted_encoder unless_worse) the adapted one, unless it scores lower by more than the standard
  error of the difference. Both scores and the decision go to all_results.json and the model card.
  - finetune: the original and the adapted encoder are fine-tuned alike (same seed, recipe and labels, in
    `continued_pretraining/{original,adapted}` under --output_dir) and their final models compared on the
    validation split, the standard error by paired bootstrap over its examples. What is judged is what the
    user gets: the kept fine-tuning is the run's model. A run stopped part way reuses the finished one.
  - probe: each encoder gives frozen mean-pooled features of the training texts; a logistic regression
    scored by k-fold cross-validation on the training labels says how well each separates the classes,
    decided on every training label. Cheap, but it measures the features before fine-tuning: a stage 1 rate
    that cost fine-tuning points raised the probe (docs/stage1.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from tlnlp.core.config import FinetuneConfig, PretrainConfig, config_to_dict
from tlnlp.core.engines import first_on_each_node, from_main_process
from tlnlp.core.errors import UserInputError
from tlnlp.core.files import CONFIG_FILE, RESULTS_FILE
from tlnlp.core.outputs import write_run_files
from tlnlp.core.precision import fit_accelerator_to, resolve_mixed_precision
from tlnlp.core.run import start_run
from tlnlp.data import builtin
from tlnlp.data.corpus import Corpus, read_corpus
from tlnlp.hub.card import write_card
from tlnlp.models.modeling import (
    check_tokenizer_and_length,
    load_model_tokenizer,
    mean_pooled_embeddings,
    require_masked_lm_class,
)
from tlnlp.stage1.pretrain import run_pretraining
from tlnlp.stage2.metrics import SINGLE_LABEL_SCORES, decided_on, selection_metric
from tlnlp.stage2.phases import (
    DEFAULT_SEQ_LEN,
    VALIDATION_PREDICTIONS,
    finetune,
    finetune_as_configured,
    prepare_labeled_data,
    read_labeled_splits,
)

logger = logging.getLogger(__name__)

FOLDER = "adapted-encoders"  # under the cache folder
CORPUS_FILE = "corpus.jsonl"  # the texts stage 1 read, kept beside the adapted encoder
COMPLETE = "COMPLETE"
STAGE1_SEED = 42  # fixed, so every fine-tuning seed shares one adapted encoder
FEW_GATE_LABELS = 200  # below this, a difference of a few points between the encoders is noise


def check_model_has_mlm_class(cfg: FinetuneConfig) -> None:
    """Before any work: continued pretraining needs a masked-LM class for the checkpoint's architecture, and
    a tokenizer that fits its embeddings."""
    from transformers import AutoConfig

    source = builtin.resolve_model(cfg.model_name_or_path)
    config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    require_masked_lm_class(config, cfg.model_name_or_path, "--continued_pretraining",
                            "it cannot be pretrained further with MLM")
    tokenizer = load_model_tokenizer(source, builtin.resolve_model(cfg.tokenizer_name, weights=False), cfg.trust_remote_code)
    check_tokenizer_and_length(config, tokenizer, stage1_seq_len(cfg, config))


def stage1_seq_len(cfg: FinetuneConfig, config) -> int:
    """The fine-tuning sequence length: stage 1 then learns from texts cut as stage 2 will see them."""
    return cfg.max_seq_length or min(DEFAULT_SEQ_LEN, config.max_position_embeddings)


def cache_key(cfg: FinetuneConfig, corpus: Corpus, seq_len: int) -> str:
    """Everything that makes the adapted encoder, and nothing that does not (the fine-tuning seed)."""
    source = builtin.resolve_model(cfg.model_name_or_path)
    identity = {"model": cfg.model_name_or_path, "tokenizer": cfg.tokenizer_name}
    weights = sorted(Path(source).glob("*.safetensors")) + sorted(Path(source).glob("*.bin")) if Path(source).is_dir() else []
    identity["files"] = [[p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in weights]
    texts = hashlib.sha256("\n\0".join(corpus.texts).encode()).hexdigest()
    options = {name: getattr(cfg, name) for name in (
        "continued_pretraining_steps", "continued_pretraining_learning_rate", "continued_pretraining_layer_decay",
        "continued_pretraining_batch_size")}
    if cfg.continued_pretraining_objective != "mlm":  # absent for MLM, so the encoders cached before it stay valid
        options["continued_pretraining_objective"] = cfg.continued_pretraining_objective
    # The stage-1 settings not given here are in `stage1_config`; "v" changes when they do.
    key = {"v": 2, **identity, "texts": texts, **options, "seq_len": seq_len, "seed": STAGE1_SEED,
           "precision": resolve_mixed_precision(cfg.mixed_precision)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def stage1_config(cfg: FinetuneConfig, output_dir: Path, corpus_file: Path, seq_len: int, processes: int) -> PretrainConfig:
    steps = cfg.continued_pretraining_steps
    return PretrainConfig(
        output_dir=str(output_dir), overwrite_output_dir=True, seed=STAGE1_SEED, train_file=str(corpus_file),
        objective=cfg.continued_pretraining_objective,
        model_name_or_path=cfg.model_name_or_path, tokenizer_name=cfg.tokenizer_name,
        trust_remote_code=cfg.trust_remote_code, cache_dir=cfg.cache_dir, line_by_line=True, max_seq_length=seq_len,
        per_device_train_batch_size=max(1, cfg.continued_pretraining_batch_size // processes),
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        learning_rate=cfg.continued_pretraining_learning_rate, layerwise_lr_decay=cfg.continued_pretraining_layer_decay,
        weight_decay=0.01, max_train_steps=steps, num_warmup_steps=math.ceil(0.06 * steps),
        eval_steps=steps, mixed_precision=cfg.mixed_precision, torch_compile=cfg.torch_compile,
        logging_steps=cfg.logging_steps, preprocessing_num_workers=cfg.preprocessing_num_workers,
        dataloader_num_workers=cfg.dataloader_num_workers, ddp_timeout=cfg.ddp_timeout,
    )


def adapted_encoder(cfg: FinetuneConfig, accelerator, corpus: Corpus, seq_len: int) -> tuple[Path, dict, bool]:
    """The encoder continued on `corpus`: from the cache, or trained now and cached. Returns its folder,
    its stage-1 results and whether it was reused."""
    folder = cfg.cache_path / FOLDER / cache_key(cfg, corpus, seq_len)
    if (folder / COMPLETE).exists():
        logger.info("Continued pretraining: reusing the adapted encoder in %s (same checkpoint, corpus and options).",
                    folder)
        return folder, json.loads((folder / RESULTS_FILE).read_text()), True
    work = folder.with_name(folder.name + ".partial")
    corpus_file = work / CORPUS_FILE
    if accelerator.is_main_process:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        with corpus_file.open("w", encoding="utf-8") as f:
            for text in corpus.texts:
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    accelerator.wait_for_everyone()
    pcfg = stage1_config(cfg, work, corpus_file, seq_len, accelerator.num_processes)
    logger.info("Continued pretraining (%s) of %s on %s: %d texts, %d steps of %d sequences, learning rate %g with "
                "layer-wise decay %g.", pcfg.objective, cfg.model_name_or_path, corpus.source, len(corpus.texts),
                pcfg.max_train_steps,
                pcfg.per_device_train_batch_size * accelerator.num_processes, pcfg.learning_rate,
                pcfg.layerwise_lr_decay)
    fit_accelerator_to(accelerator, pcfg)
    results = run_pretraining(pcfg, accelerator)
    write_run_files(accelerator, pcfg, {"continued_from": cfg.model_name_or_path, "corpus": corpus.source, **results},
                    stage="pretrain", output_dir=work)
    accelerator.free_memory()
    if accelerator.is_main_process:
        (work / COMPLETE).write_text("")
        shutil.rmtree(folder, ignore_errors=True)
        work.rename(folder)  # whole or not at all: a killed run is trained again, never half reused
    accelerator.wait_for_everyone()
    return folder, json.loads((folder / RESULTS_FILE).read_text()), False


def probe_scores(features: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Per-fold accuracy of a logistic regression on the frozen features, by stratified k-fold CV."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = min(folds, int(np.bincount(labels).min()))
    if folds < 2:
        raise UserInputError("The continued-pretraining gate needs at least 2 training examples of every class.")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = []
    for train, held in splitter.split(features, labels):
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
        scores.append(probe.fit(features[train], labels[train]).score(features[held], labels[held]))
    return np.array(scores)


def keeps_adapted(rule: str, difference: float, standard_error: float) -> bool:
    """The gate's rule, on the probe's mean fold difference (adapted - original) and its standard error:
    if_better keeps the adapted encoder only when it is ahead by more than that noise; unless_worse keeps it
    unless it is behind by more; always keeps it."""
    noise = standard_error if math.isfinite(standard_error) else 0.0
    return {"if_better": difference > noise, "unless_worse": difference >= -noise, "always": True}[rule]


def probe_gate(cfg: FinetuneConfig, data, original: str, adapted: str, seq_len: int) -> dict[str, Any]:
    """Score both encoders on the training labels (same folds) and decide which one is fine-tuned."""
    train = data.splits["train"]
    texts = list(train[data.text_column])
    labels = np.array([data.label2id[label] for label in train[data.label_column]])
    with torch.no_grad():
        scores = {name: probe_scores(mean_pooled_embeddings(path, texts, seq_len), labels,
                                     cfg.continued_pretraining_folds, cfg.seed)
                  for name, path in (("original", original), ("adapted", adapted))}
    difference = scores["adapted"] - scores["original"]
    spread = float(difference.std(ddof=1) / math.sqrt(len(difference))) if len(difference) > 1 else float("nan")
    keep = keeps_adapted(cfg.keep_adapted_encoder, float(difference.mean()), spread)
    record = {
        "gate": "probe", "difference": float(difference.mean()), "difference_standard_error": spread,
        "gate_labels": len(labels), "gate_folds": len(difference),
        "probe_accuracy_original": float(scores["original"].mean()),
        "probe_accuracy_adapted": float(scores["adapted"].mean()),
        "probe_difference": float(difference.mean()), "probe_difference_standard_error": spread,
        "kept": "adapted" if keep else "original", "gate_rule": cfg.keep_adapted_encoder,
    }
    logger.info(
        "Continued-pretraining gate on %d training labels (%d-fold cross-validation, frozen mean-pooled features + "
        "logistic regression): original %.3f, adapted %.3f, difference %+.3f (standard error %.3f). Fine-tuning the "
        "%s encoder%s.", len(labels), len(difference), record["probe_accuracy_original"],
        record["probe_accuracy_adapted"], record["probe_difference"], spread, record["kept"],
        f" (--keep_adapted_encoder {cfg.keep_adapted_encoder})",
    )
    if len(labels) < FEW_GATE_LABELS:
        logger.warning("The gate decided on %d training labels: below about %d, differences of a few points are "
                       "noise. More labels, or --keep_adapted_encoder always if you trust the corpus, fix that.",
                       len(labels), FEW_GATE_LABELS)
    return record


GATE_FOLDER = "continued_pretraining"  # under --output_dir: the finetune gate's two fine-tunings
BOOTSTRAP_RESAMPLES = 1000


def finetune_gate(cfg: FinetuneConfig, accelerator, raw, original: str, adapted: str) -> tuple[dict, Path]:
    """Fine-tune both encoders alike and compare their final models on the validation split. Returns the
    record and the kept encoder's fine-tuning folder."""
    folder = Path(cfg.output_dir) / GATE_FOLDER
    runs = {}
    for name, encoder in (("original", original), ("adapted", adapted)):
        run_dir = folder / name
        run_cfg = dataclasses.replace(cfg, model_name_or_path=encoder, output_dir=str(run_dir))
        if finished_alike(run_dir, run_cfg):
            logger.info("Continued-pretraining gate: %s was fine-tuned with these options by an earlier run; "
                        "reusing it.", run_dir)
        else:
            logger.info("=== Continued-pretraining gate: fine-tuning the %s encoder ===", name)
            accelerator.wait_for_everyone()  # every process has looked before the folder is cleared
            if accelerator.is_main_process:
                shutil.rmtree(run_dir, ignore_errors=True)  # a fine-tuning killed part way starts again
            accelerator.wait_for_everyone()
            # As the plain run would fine-tune (its labels, pseudo-labels and epoch choice), plus the
            # validation predictions the comparison reads.
            results = finetune(run_cfg, accelerator, raw, run_dir, max_train_samples=cfg.max_train_samples,
                               pseudo_labeled_file=cfg.pseudo_labeled_file, restore_best=cfg.restores_best_epoch,
                               report_copies=name == "original", predict_validation=True)
            write_run_files(accelerator, run_cfg, results, "finetune", output_dir=run_dir)
            accelerator.free_memory()
        runs[name] = json.loads((run_dir / RESULTS_FILE).read_text())
    metric = selection_metric(cfg.metric_for_best_model, "single_label")[0]
    record = from_main_process(accelerator, compare_on_validation(cfg, folder, metric, runs)
                               if accelerator.is_main_process else None)
    return record, folder / record["kept"]


def finished_alike(run_dir: Path, cfg: FinetuneConfig) -> bool:
    """Whether an earlier command finished this fine-tuning with the same options (other options, or a
    stage 1 trained again, fine-tune it again)."""
    if not (run_dir / RESULTS_FILE).exists() or not (run_dir / CONFIG_FILE).exists():
        return False
    options = yaml.safe_load(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return yaml.safe_load((run_dir / CONFIG_FILE).read_text()) == options


def compare_on_validation(cfg: FinetuneConfig, folder: Path, metric: str, runs: dict) -> dict[str, Any]:
    """The paired difference (adapted - original) of the selection metric on the validation split, its
    bootstrap standard error, and the decision."""
    predictions = {name: [json.loads(line) for line in (folder / name / VALIDATION_PREDICTIONS).read_text(
        encoding="utf-8").splitlines()] for name in runs}
    truth = np.array([str(row["true_label"]) for row in predictions["original"]])
    predicted = {name: np.array([row["label"] for row in rows]) for name, rows in predictions.items()}
    def score(references, predictions) -> float:
        return float(SINGLE_LABEL_SCORES[metric](references, predictions))

    difference = score(truth, predicted["adapted"]) - score(truth, predicted["original"])
    rng = np.random.default_rng(cfg.seed)
    resampled = [score(truth[i], predicted["adapted"][i]) - score(truth[i], predicted["original"][i])
                 for i in (rng.integers(0, len(truth), len(truth)) for _ in range(BOOTSTRAP_RESAMPLES))]
    spread = float(np.std(resampled, ddof=1))
    keep = keeps_adapted(cfg.keep_adapted_encoder, difference, spread)
    record = {
        "gate": "finetune", "difference": difference, "difference_standard_error": spread,
        "gate_metric": metric, "gate_examples": len(truth),
        "validation_original": score(truth, predicted["original"]),
        "validation_adapted": score(truth, predicted["adapted"]),
        "kept": "adapted" if keep else "original", "gate_rule": cfg.keep_adapted_encoder,
    }
    for name, results in runs.items():  # reported beside, never used to decide
        if f"test_{metric}" in results:
            record[f"test_{name}"] = results[f"test_{metric}"]
    logger.info(
        "Continued-pretraining gate on %d validation examples (both encoders fine-tuned alike): %s original %.4f, "
        "adapted %.4f, difference %+.4f (bootstrap standard error %.4f). Keeping the %s encoder's fine-tuning "
        "(--keep_adapted_encoder %s).", len(truth), metric, record["validation_original"],
        record["validation_adapted"], difference, spread, record["kept"], cfg.keep_adapted_encoder,
    )
    warning = decided_on("The continued-pretraining gate", len(truth),
                         "Give a --validation_file of 200 or more examples, raise --validation_split_percentage, "
                         "or use --continued_pretraining_gate probe, which decides on the training labels.")
    if warning:
        record["small_validation_warning"] = warning
    return record




def finetune_kept(cfg: FinetuneConfig, accelerator, kept_run: Path | None) -> dict[str, Any]:
    """The run's fine-tuning: the finetune gate's of the kept encoder, copied to --output_dir, or (the probe
    gate) one now."""
    if kept_run is None:
        return finetune_as_configured(cfg, accelerator)
    if accelerator.is_main_process:
        for file in kept_run.iterdir():  # the model, tokenizer and predictions; the results are written anew
            if file.is_file():
                shutil.copy2(file, Path(cfg.output_dir) / file.name)
    accelerator.wait_for_everyone()
    results = json.loads((kept_run / RESULTS_FILE).read_text())
    results.pop("stage", None)
    return results


def adapt(cfg: FinetuneConfig, check_output: bool = True) -> tuple[FinetuneConfig, dict[str, Any], Path | None]:
    """Continue the encoder's pretraining on the corpus (or reuse it from the cache) and gate it. Returns
    the configuration to fine-tune with (its --model_name_or_path the encoder kept), the record, and the
    finetune gate's fine-tuning of the kept encoder (None with the probe gate)."""
    if cfg.preprocess_only:
        raise UserInputError("--preprocess_only tokenizes and stops; --continued_pretraining trains. Run them apart.")
    if cfg.task_type in ("multi_label", "regression"):
        raise UserInputError(
            f"--continued_pretraining's gate scores single-label classification; this task is {cfg.task_type}. "
            "Continue pretraining with scripts/pretrain_mlm.py and fine-tune the result."
        )
    check_model_has_mlm_class(cfg)
    accelerator, _ = start_run(cfg, check_output=check_output)
    with first_on_each_node(accelerator):
        raw = read_labeled_splits(train_file=cfg.train_file, validation_file=cfg.validation_file,
                                  test_file=cfg.test_file, dataset_name=cfg.dataset_name,
                                  dataset_config_name=cfg.dataset_config_name, csv_delimiter=cfg.csv_delimiter)
        data = prepare_labeled_data(cfg, raw, max_train_samples=cfg.max_train_samples, report_copies=False)
        if data.task_type != "single_label":
            raise UserInputError(
                f"--continued_pretraining's gate scores single-label classification; this task is {data.task_type}. "
                "Continue pretraining with scripts/pretrain_mlm.py and fine-tune the result."
            )
        metric = selection_metric(cfg.metric_for_best_model, "single_label")[0]
        if cfg.continued_pretraining_gate == "finetune" and metric not in SINGLE_LABEL_SCORES:
            raise UserInputError(
                f"--continued_pretraining_gate finetune compares the fine-tunings by --metric_for_best_model, "
                f"here {metric!r}; it takes one of {', '.join(SINGLE_LABEL_SCORES)}. Choose one of those, or use "
                "--continued_pretraining_gate probe."
            )
        if cfg.continued_pretraining_gate == "finetune" and "validation" not in data.splits:
            raise UserInputError(
                "--continued_pretraining_gate finetune compares the two fine-tunings on the validation split, "
                "and this run has none (--validation_split_percentage 0). Give a --validation_file, or use "
                "--continued_pretraining_gate probe (it decides on the training labels)."
            )
        held_out = {t for split in ("validation", "test") if split in data.splits
                    for t in data.splits[split][data.text_column]}
        # Every corpus is read before any training, so a bad one in a chain is refused before the first trains.
        corpora = [read_corpus(cfg, value, "--continued_pretraining", held_out)
                   for value in corpus_chain(cfg.continued_pretraining)]
    from transformers import AutoConfig

    seq_len = stage1_seq_len(cfg, AutoConfig.from_pretrained(builtin.resolve_model(cfg.model_name_or_path),
                                                             trust_remote_code=cfg.trust_remote_code))
    started = time.perf_counter()
    phases, start = [], cfg
    for corpus in corpora:  # each phase continues the encoder the phase before it made, and is cached alone
        folder, stage1, reused = adapted_encoder(start, accelerator, corpus, seq_len)
        phases.append({
            "corpus": corpus.source, "corpus_texts": len(corpus.texts), "reused_from_cache": reused,
            "head_warmup_steps": stage1.get("head_warmup_steps", 0), "perplexity": stage1.get("eval_perplexity"),
            # Stage 1's own training time, also when the encoder came from the cache.
            "stage1_minutes": round(stage1.get("train_runtime_s", 0.0) / 60, 2), "adapted_encoder": str(folder),
        })
        start = dataclasses.replace(start, model_name_or_path=str(folder))
    minutes = (time.perf_counter() - started) / 60
    original = builtin.resolve_model(cfg.model_name_or_path)
    kept_run = None
    if cfg.continued_pretraining_gate == "finetune":
        decision, kept_run = finetune_gate(cfg, accelerator, raw, original, str(folder))
    else:
        decision = from_main_process(accelerator, probe_gate(cfg, data, original, str(folder), seq_len)
                                     if accelerator.is_main_process else None)
    record = {
        "objective": cfg.continued_pretraining_objective, "corpus": ", then ".join(p["corpus"] for p in phases),
        "corpus_texts": sum(p["corpus_texts"] for p in phases),
        "steps": cfg.continued_pretraining_steps * len(phases),
        "head_warmup_steps": phases[0]["head_warmup_steps"], "perplexity": phases[-1]["perplexity"],
        # `minutes` is this run's (a lookup when every phase came from the cache); `stage1_minutes` what
        # stage 1 cost when it trained.
        "minutes": round(minutes, 2), "reused_from_cache": all(p["reused_from_cache"] for p in phases),
        "adapted_encoder": str(folder), "stage1_minutes": round(sum(p["stage1_minutes"] for p in phases), 2),
        "original_encoder": cfg.model_name_or_path, **decision,
    }
    if len(phases) > 1:
        record["phases"] = phases
    chosen = str(folder) if decision["kept"] == "adapted" else cfg.model_name_or_path
    return dataclasses.replace(cfg, model_name_or_path=chosen), record, kept_run


def corpus_chain(value: str) -> list[str]:
    """The corpora of --continued_pretraining, in the order they run: `a+b` is a, then b (a file whose name
    holds a `+` is one corpus)."""
    if Path(value).exists():
        return [value]
    chain = [part.strip() for part in value.split("+")]
    if not all(chain) or len(set(chain)) < len(chain):
        raise UserInputError(
            f"--continued_pretraining {value!r}: corpora joined by '+' run in turn, each once and none empty; for "
            "example 'speech-passages+task' continues on the domain's texts, then on the task's (DAPT + TAPT)."
        )
    return chain


def record_in_run(output_dir: Path, record: dict[str, Any], hub_model_id: str | None) -> None:
    """A recipe's finished run (search, self-training): the continued-pretraining record joins its
    all_results.json, and its model card is made again to say so."""
    from accelerate import PartialState

    results_file = output_dir / RESULTS_FILE
    if not PartialState().is_main_process or not results_file.exists():
        return
    results = json.loads(results_file.read_text())
    results["continued_pretraining"] = record
    results_file.write_text(json.dumps(results, indent=2, default=float))
    write_card(output_dir, hub_model_id)
