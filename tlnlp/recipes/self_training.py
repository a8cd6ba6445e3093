"""Self-training on unlabeled text: a teacher trained on the labels labels the unlabeled texts; its confident,
class-balanced predictions join the labels to train a student, which teaches the next round (He et al. 2020,
"Revisiting Self-Training"; Du et al. 2021, "Self-training Improves Pre-training for NLU").

    python -m tlnlp.finetune --model_name_or_path minilm-l6 --dataset_name wiki-topics --max_train_samples 1000 \\
        --unlabeled_dataset wiki-leads --self_training_rounds 1 --output_dir runs/self-trained

- Confidence threshold: the lowest teacher confidence at which the teacher's predictions on the held-out
  labels (the validation split; never the test split) reach --pseudo_label_precision, and never below
  the floor halfway between chance and certainty (0.75 for two classes; `confidence_floor`).
- Class balance: at most --pseudo_labels_per_class per class (default: the labeled examples per class),
  the most confident first, so a class the teacher favours cannot swamp the others.
- Which unlabeled texts: at most --max_unlabeled_samples, the first ones, or with --unlabeled_selection
  similar those most like the labeled texts (nearest in the encoder's sentence embedding; `most_similar`),
  for a broad corpus of which only part is of the task's kind. Unlabeled texts that are exactly a
  validation or test text are never pseudo-labeled.
- The teacher is a plain fine-tuning on the labels. After --continued_pretraining's finetune gate it is the
  gate's fine-tuning of the kept encoder, which is that already: copied, not trained again.
- Each student starts from the same encoder as the teacher (not from the teacher's weights) and trains
  on labels + pseudo-labels. The run's model, copied to --output_dir, is the round that scores best on the
  validation split: normally the last student, but the teacher when the pseudo-labels hurt (unlabeled text
  unlike the labeled, say). --restore_best_model false keeps the last student. Every round
  (`self_training/roundK`, round0 the teacher) and its pseudo-labels are kept; a finished round is not
  redone when the command is run again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from tlnlp.core.config import FinetuneConfig
from tlnlp.core.errors import UserInputError
from tlnlp.core.files import RESULTS_FILE
from tlnlp.core.outputs import write_run_files
from tlnlp.core.run import finish, start_run
from tlnlp.data.prepare import (
    count_lines,
    drop_blank_texts,
    ensure_validation,
    load_labeled,
    load_raw_datasets,
    resolve_text_column,
    stratified_subset,
    write_jsonl,
)
from tlnlp.hub import repo as hub
from tlnlp.hub.card import write_card
from tlnlp.stage2.metrics import decided_on, selection_metric
from tlnlp.stage2.phases import finetune, read_labeled_splits

logger = logging.getLogger(__name__)

FOLDER = "self_training"


@dataclasses.dataclass(frozen=True)
class Data:
    """The files every round trains and chooses on."""

    labels: Path
    validation: Path
    test: Path | None
    unlabeled: list[str]
    unlabeled_pool: int  # the distinct texts `unlabeled` was chosen from
    text_column: str
    label_column: str
    classes: int


def run_self_training(cfg: FinetuneConfig, check_output: bool = True, teacher: Path | None = None) -> dict[str, Any]:
    """The teacher and each student are calls of the stage-2 phases on this process's one Accelerator.
    `check_output` False: the caller checked --output_dir (continued pretraining ran in it first). `teacher`:
    a finished fine-tuning of cfg's encoder on the same labels with the same options (the finetune gate's),
    used as round 0 instead of training it again."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserInputError("Self-training runs its rounds one after another in one process: launch it with "
                             "`python -m tlnlp.finetune` (or `accelerate launch --num_processes 1`).")
    folder = Path(cfg.output_dir) / FOLDER
    # The same command again after a stop continues its rounds; a first run must not write over another.
    accelerator, hub_repo = start_run(cfg, check_output=check_output and not folder.exists())
    data = prepare(cfg, folder / "data")
    per_class = cfg.pseudo_labels_per_class or max(1, round(count_lines(data.labels) / data.classes))
    metric = selection_metric(cfg.metric_for_best_model, "single_label")[0]
    round_results = [train_round(cfg, accelerator, data, folder / "round0", pseudo=None, trained=teacher)]
    rounds: list[dict[str, Any]] = []
    for number in range(1, cfg.self_training_rounds + 1):
        pseudo_file, report = pseudo_label(cfg, data, folder / f"round{number - 1}", per_class,
                                           folder / f"pseudo_labels_round{number}.jsonl")
        # No confident pseudo-label: the student trains on the labels alone, as the warning says.
        results = train_round(cfg, accelerator, data, folder / f"round{number}",
                              pseudo=pseudo_file if report["pseudo_labels"] else None)
        report.update(round=number, **{f"student_eval_{metric}": results.get(f"eval_{metric}"),
                                       f"student_test_{metric}": results.get(f"test_{metric}")})
        rounds.append(report)
        round_results.append(results)

    below = student_below_teacher(cfg.metric_for_best_model, round_results[0], round_results[-1])
    # The round is a coarser choice than the epoch (the teacher is the fallback when pseudo-labels hurt), so it
    # is made on validation unless the user turned choosing off outright.
    choose_round = cfg.restore_best_model is not False
    kept = best_round(cfg.metric_for_best_model, round_results) if choose_round else len(round_results) - 1
    validation_examples = count_lines(data.validation)
    small = decided_on("The kept self-training round", validation_examples,
                       "Give a --validation_file of 200 or more examples, or keep the last student with "
                       "--restore_best_model false.") if choose_round else None
    if kept != len(round_results) - 1:
        logger.warning("Self-training keeps round %d (%s), the best on the validation split, as the run's model "
                       "(--restore_best_model false keeps the last student).", kept,
                       "the teacher" if kept == 0 else "a student")
    output_dir = Path(cfg.output_dir)
    for file in (folder / f"round{kept}").iterdir():  # the chosen round's model, card and results
        if file.is_file():
            shutil.copy2(file, output_dir / file.name)
    results = round_results[kept] | {"self_training": {
        "rounds": rounds, "kept_round": kept, "unlabeled_selection": cfg.unlabeled_selection,
        "unlabeled_pool": data.unlabeled_pool, "pseudo_label_precision": cfg.pseudo_label_precision,
        "pseudo_labels_per_class": per_class, "validation_examples": validation_examples,
        **({"small_validation_warning": small} if small else {}),
        f"teacher_eval_{metric}": round_results[0].get(f"eval_{metric}"),
        f"teacher_test_{metric}": round_results[0].get(f"test_{metric}"), "student_below_teacher": below,
        **({"teacher_from": str(teacher)} if teacher else {}),
    }}
    (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2))
    write_card(output_dir, cfg.hub_model_id)
    try:
        hub.publish(cfg, accelerator, hub_repo)
    finally:
        finish(accelerator)
    return results


def best_round(metric: str | None, round_results: list[dict]) -> int:
    """The round that scores best on the validation split; on a tie the later round (the student). Rounds
    without the score are never preferred."""
    metric, greater_is_better = selection_metric(metric, "single_label")
    sign = 1 if greater_is_better else -1
    scored = [(sign * r[f"eval_{metric}"], number) for number, r in enumerate(round_results)
              if r.get(f"eval_{metric}") is not None]
    return max(scored)[1] if scored else len(round_results) - 1


def student_below_teacher(metric: str | None, teacher: dict, student: dict) -> bool | None:
    """Whether the last student scores worse than the teacher on the validation split (warned in the log):
    pseudo-labels can hurt, for instance when the unlabeled text differs from the labeled. None: not measured."""
    metric, greater_is_better = selection_metric(metric, "single_label")
    before, after = teacher.get(f"eval_{metric}"), student.get(f"eval_{metric}")
    if before is None or after is None:
        return None
    worse = after < before if greater_is_better else after > before
    if worse:
        logger.warning("Self-training: the student's validation %s is %.4f, the teacher's %.4f: the pseudo-labels "
                       "did not help. The teacher is in %s/round0. Try a higher --pseudo_label_precision, fewer "
                       "--pseudo_labels_per_class, or unlabeled text more like the labeled (the same kind and "
                       "length of text).", metric, after, before, FOLDER)
    return worse


def prepare(cfg: FinetuneConfig, folder: Path) -> Data:
    """The labels, validation and test splits as the plain run would make them, and the unlabeled texts:
    all checked before any training."""
    if cfg.text_pair_column:
        raise UserInputError("Self-training labels single texts; --text_pair_column is not supported with it.")
    raw, text_column, task_type = load_labeled(cfg)
    if task_type != "single_label":
        raise UserInputError(f"Self-training picks one confident class per text: it needs a single-label task, "
                             f"and this one is {task_type}.")
    raw = ensure_validation(raw, cfg.validation_split_percentage, cfg.seed,
                            needed_by="Self-training (its confidence threshold and the round it keeps)")
    train = raw["train"]
    if cfg.max_train_samples is not None:
        train = stratified_subset(train, cfg.label_column, cfg.max_train_samples, task_type, cfg.stratify, cfg.seed)
    source = f"--unlabeled_file {cfg.unlabeled_file}" if cfg.unlabeled_file else f"--unlabeled_dataset {cfg.unlabeled_dataset}"
    try:
        unlabeled = load_raw_datasets(train_file=cfg.unlabeled_file, validation_file=None,
                                      dataset_name=cfg.unlabeled_dataset, dataset_config_name=None,
                                      csv_delimiter=cfg.csv_delimiter, train_option="--unlabeled_file")["train"]
        cut = cfg.max_unlabeled_samples if cfg.unlabeled_selection == "first" else cfg.unlabeled_pool_size
        unlabeled = unlabeled.select(range(min(len(unlabeled), cut)))
        unlabeled_column = resolve_text_column(unlabeled, cfg.unlabeled_text_column, "--unlabeled_text_column")
        unlabeled = drop_blank_texts({"train": unlabeled}, unlabeled_column)["train"]
    except UserInputError as error:
        raise UserInputError(f"The unlabeled data ({source}): {error}") from None
    texts = unlabeled[unlabeled_column]
    held_out = set(raw["validation"][text_column]) | (set(raw["test"][text_column]) if "test" in raw else set())
    kept = [text for text in dict.fromkeys(texts) if text not in held_out]  # also drops repeated texts
    if len(kept) < len(texts):
        logger.info("Unlabeled texts: %d of %d kept (%d repeated, or exactly a validation or test text).",
                    len(kept), len(texts), len(texts) - len(kept))
    if not kept:
        raise UserInputError("The unlabeled data holds no text that is not already a validation or test text: "
                             "nothing to pseudo-label. Give other unlabeled text.")
    pool = len(kept)
    if pool > cfg.max_unlabeled_samples:  # only with --unlabeled_selection similar; 'first' was cut above
        kept = most_similar(cfg, list(train[text_column]), kept)
    columns = [text_column, cfg.label_column]
    labels = write_jsonl(folder / "labels.jsonl", train, columns)
    validation = write_jsonl(folder / "validation.jsonl", raw["validation"], columns)
    test = write_jsonl(folder / "test.jsonl", raw["test"], columns) if "test" in raw else None

    classes = len(set(map(str, train[cfg.label_column])))
    return Data(labels, validation, test, kept, pool, text_column, cfg.label_column, classes)


def most_similar(cfg: FinetuneConfig, labeled: list[str], texts: list[str]) -> list[str]:
    """The --max_unlabeled_samples texts nearest the labeled ones, in corpus order. A text scores the cosine
    similarity of its mean-pooled encoder embedding to that of its nearest labeled text: SentAugment's
    retrieval of task-like sentences from a large bank (Du et al. 2021), with the encoder that is fine-tuned.
    From full reviews for review snippets, say, it keeps reviewers' judgements and drops credits."""
    count = cfg.max_unlabeled_samples
    logger.info("Choosing the %d of %d unlabeled texts most like the labeled ones (--unlabeled_selection similar; "
                "embeddings from %s).", count, len(texts), cfg.model_name_or_path)
    anchors = unit_embeddings(cfg, labeled, progress=False)
    pool = cached_unit_embeddings(cfg, texts)
    nearest = np.concatenate([(pool[start : start + 4096] @ anchors.T).max(axis=1)
                              for start in range(0, len(pool), 4096)])
    chosen = np.sort(np.argsort(-nearest, kind="stable")[:count])
    logger.info("Unlabeled texts kept: cosine similarity to the nearest labeled text %.3f or more (median over all "
                "%d: %.3f).", float(nearest[chosen].min()), len(texts), float(np.median(nearest)))
    return [texts[i] for i in chosen]


def unit_embeddings(cfg: FinetuneConfig, texts: list[str], progress: bool) -> np.ndarray:
    """The encoder's mean-pooled embeddings, scaled to length 1; in fp32, as the teacher labels (no autocast)."""
    from tlnlp.data.builtin import resolve_model
    from tlnlp.models.modeling import mean_pooled_embeddings

    tokenizer = resolve_model(cfg.tokenizer_name, weights=False) if cfg.tokenizer_name else None
    rows = mean_pooled_embeddings(resolve_model(cfg.model_name_or_path), texts, cfg.max_seq_length,
                                  tokenizer_dir=tokenizer, progress=progress)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def cached_unit_embeddings(cfg: FinetuneConfig, texts: list[str]) -> np.ndarray:
    """unit_embeddings of the unlabeled pool, kept under --cache_dir: they do not depend on the labels, so a
    run on other labels or another seed with the same encoder and corpus does not embed the pool again."""
    from tlnlp.data.builtin import resolve_model

    def identity(name: str | None, weights: bool = True) -> list:  # a local folder is named by its files too
        folder = Path(resolve_model(name, weights)) if name else None  # (retrained, it differs)
        if folder is None or not folder.is_dir():
            return [name]
        return [str(folder.resolve())] + sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                                                for f in folder.iterdir() if f.is_file())

    key = json.dumps([identity(cfg.model_name_or_path), identity(cfg.tokenizer_name, weights=False), cfg.max_seq_length, texts])
    path = cfg.cache_path / "embeddings" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.npy"
    if path.exists():
        logger.info("Unlabeled texts' embeddings from the cache: %s", path)
        return np.load(path)
    rows = unit_embeddings(cfg, texts, progress=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, rows)
    tmp.replace(path)  # atomic: a half-written file is never read
    return rows


def train_round(cfg: FinetuneConfig, accelerator, data: Data, output_dir: Path, pseudo: Path | None,
                trained: Path | None = None) -> dict[str, Any]:
    """One fine-tuning on the prepared files, with its own results, configuration and card in `output_dir`
    (skipped when an earlier command finished it; copied from `trained` when that fine-tuning was made
    elsewhere); returns its results."""
    if (output_dir / RESULTS_FILE).exists():
        logger.info("Self-training: %s was finished by an earlier run; reusing it.", output_dir)
        return json.loads((output_dir / RESULTS_FILE).read_text())
    if trained is not None:
        logger.info("Self-training: the teacher is %s, the same fine-tuning on the labels; copied, not trained "
                    "again.", trained)
        work = output_dir.with_name(output_dir.name + ".partial")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        for file in trained.iterdir():  # the model, tokenizer, predictions, results and card
            if file.is_file():
                shutil.copy2(file, work / file.name)
        shutil.rmtree(output_dir, ignore_errors=True)  # a teacher an earlier command began to train here
        work.rename(output_dir)  # whole or not at all: a half-copied teacher is never reused
        return json.loads((output_dir / RESULTS_FILE).read_text())
    what = ("a student, on labels + pseudo-labels" if pseudo else
            "the teacher, on the labels" if output_dir.name == "round0" else
            "a student, on the labels alone (no confident pseudo-label)")
    logger.info("=== Self-training %s: %s ===", output_dir.name, what)
    shutil.rmtree(output_dir, ignore_errors=True)  # a round killed part way starts again
    raw = read_labeled_splits(train_file=str(data.labels), validation_file=str(data.validation),
                              test_file=str(data.test) if data.test else None)
    round_cfg = dataclasses.replace(cfg, text_column=data.text_column)  # the column the labels were written with
    results = finetune(round_cfg, accelerator, raw, output_dir, pseudo_labeled_file=str(pseudo) if pseudo else None,
                       restore_best=cfg.restores_best_epoch)
    # The round's record names the user's data set and, for a student, its pseudo-labels.
    record = dataclasses.replace(cfg, pseudo_labeled_file=str(pseudo) if pseudo else None)
    write_run_files(accelerator, record, results, "finetune", output_dir=output_dir)
    accelerator.free_memory()
    return json.loads((output_dir / RESULTS_FILE).read_text())  # as a reused round's: with its stage


def pseudo_label(cfg: FinetuneConfig, data: Data, teacher: Path, per_class: int, path: Path) -> tuple[Path, dict]:
    """The teacher's confident, class-balanced predictions on the unlabeled texts, written as training rows."""
    from tlnlp.stage2.inference import predict_texts

    validation = [json.loads(line) for line in data.validation.read_text(encoding="utf-8").splitlines()]
    length = cfg.max_seq_length
    held_out = list(predict_texts(str(teacher), [row[data.text_column] for row in validation], max_length=length,
                                  progress=False))
    truth = [str(row[data.label_column]) for row in validation]
    threshold, precision = confidence_threshold([max(p["probabilities"].values()) for p in held_out],
                                                [p["label"] == t for p, t in zip(held_out, truth)],
                                                cfg.pseudo_label_precision)
    decided_on("The pseudo-label confidence threshold", len(validation),
               "Give a --validation_file of 200 or more examples; the threshold never goes below the floor "
               "halfway between chance and certainty.")
    floor = confidence_floor(data.classes)
    if threshold < floor:
        logger.info("The threshold that reaches precision %.2f on the validation split, %.3f, is below the floor "
                    "%.3f (halfway between chance, 1/%d, and certainty): the floor is used.",
                    cfg.pseudo_label_precision, threshold, floor, data.classes)
        threshold = floor
    predicted = list(predict_texts(str(teacher), data.unlabeled, max_length=length))
    chosen = select_pseudo_labels(predicted, threshold, per_class)
    label_type = type(json.loads(data.labels.read_text(encoding="utf-8").splitlines()[0])[data.label_column])
    rows = [{data.text_column: row["text"], data.label_column: label_type(row["label"])} for row in chosen]
    write_jsonl(path, rows, [data.text_column, data.label_column])
    counts = {}
    for row in chosen:
        counts[row["label"]] = counts.get(row["label"], 0) + 1
    report = {"threshold": threshold, "threshold_floor": floor, "validation_examples": len(validation),
              "held_out_precision": precision, "pseudo_labels": len(chosen),
              "pseudo_labels_per_class": dict(sorted(counts.items())), "unlabeled_texts": len(data.unlabeled),
              "file": str(path)}
    logger.info("Pseudo-labels from %s: %d of %d unlabeled texts above confidence %.3f (held-out precision %.3f "
                "there); per class: %s", teacher, len(chosen), len(data.unlabeled), threshold,
                precision, ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "none")
    if not chosen:
        logger.warning("No pseudo-labels this round: the teacher never reaches held-out precision %.2f, or no "
                       "unlabeled text is that confident. The student trains on the labels alone; lower "
                       "--pseudo_label_precision to admit more.", cfg.pseudo_label_precision)
    return path, report


def confidence_threshold(confidences: list[float], correct: list[bool], precision: float) -> tuple[float, float]:
    """The lowest confidence t such that the held-out predictions at or above t are at least `precision`
    correct (with at least 5 of them, so one lucky example cannot set it). Returns (t, that precision);
    t = 1.0+ when no t qualifies, so nothing is kept."""
    order = np.argsort(confidences)[::-1]
    hits = np.cumsum(np.asarray(correct, dtype=float)[order])
    counts = np.arange(1, len(order) + 1)
    ok = (hits / counts >= precision) & (counts >= 5)
    if not ok.any():
        return float("inf"), 0.0
    last = int(np.nonzero(ok)[0].max())  # the most predictions that still meet the precision
    return float(np.asarray(confidences)[order][last]), float(hits[last] / counts[last])


def confidence_floor(classes: int) -> float:
    """The lowest confidence a pseudo-label may have: halfway between chance (1/classes) and certainty. On a
    small validation split the precision target can be met by luck at a confidence barely above chance
    (0.534 for two classes was seen on 50 examples), and such pseudo-labels teach the student nothing."""
    return (1 + 1 / max(classes, 1)) / 2


def select_pseudo_labels(predictions: list[dict], threshold: float, per_class: int) -> list[dict]:
    """Predictions at or above `threshold`, at most `per_class` per class, the most confident first."""
    by_class: dict[str, list[dict]] = {}
    for row in predictions:
        if max(row["probabilities"].values()) >= threshold:
            by_class.setdefault(row["label"], []).append(row)
    chosen = []
    for label in sorted(by_class):
        rows = sorted(by_class[label], key=lambda r: -r["probabilities"][label])
        chosen += rows[:per_class]
    return chosen

