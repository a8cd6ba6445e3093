"""Recipe search on the labeled set: Optuna (TPE sampler, pruning between folds) over the fine-tuning options,
each trial scored by k-fold cross-validation on the training labels (a 5% split of 1k labels is ~50 examples,
too noisy to choose on), or on --validation_file when one is given; then the final model is trained with the
best recipe on all the labels.

    python -m tlnlp.finetune --model_name_or_path minilm-l6 --dataset_name wiki-topics --max_train_samples 1000 \\
        --search_trials 20 --output_dir runs/searched

Writes `search/` in the output folder: `trials.csv`, `best_config.yaml` (reusable with --config),
`search.png`, and Optuna's journal, from which a killed search resumes (run the same command again) and
which several processes may share to run trials in parallel.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import socket
import statistics
from pathlib import Path
from typing import Any

import yaml

from tlnlp.core.config import FinetuneConfig, config_to_dict
from tlnlp.core.errors import TrainingError, UserInputError
from tlnlp.core.files import RESULTS_FILE
from tlnlp.core.run import end_run, finish, start_run
from tlnlp.data.prepare import count_lines, load_labeled, stratified_subset, write_jsonl
from tlnlp.stage2.metrics import decided_on, selection_metric
from tlnlp.stage2.phases import finetune, read_labeled_splits

logger = logging.getLogger(__name__)

SEARCH_DIR = "search"
JOURNAL = "journal.log"
# For 1k-2k labels: a range {low, high, log}, a list of choices, or a fixed value. `--search_space file.yaml`
# overrides entries (null removes one: the flag's value is used).
DEFAULT_SPACE: dict[str, Any] = {
    "learning_rate": {"low": 1e-5, "high": 2e-4, "log": True},
    "num_train_epochs": {"low": 3, "high": 10},
    "per_device_train_batch_size": [8, 16, 32],
    "warmup_fraction": {"low": 0.0, "high": 0.2},
    "weight_decay": {"low": 0.0, "high": 0.1},
    "pooling": ["cls", "mean"],
    "freeze_layers": {"low": 0, "high": 2},
    "layerwise_lr_decay": {"low": 0.7, "high": 1.0},
    "head_dropout": {"low": 0.0, "high": 0.3},
}
# What a space may name besides the defaults: other options worth searching on small data.
EXTRA_KEYS = ("head_learning_rate", "head_hidden_sizes", "max_seq_length", "freeze_embeddings")
INTEGER_KEYS = ("num_train_epochs", "per_device_train_batch_size", "freeze_layers", "max_seq_length")


# ---------------------------------------------------------------------------------------------------------
# The search space
# ---------------------------------------------------------------------------------------------------------


def load_space(path: str | None) -> dict[str, Any]:
    """The default space with the file's entries applied, checked before anything is trained."""
    space = dict(DEFAULT_SPACE)
    if path:
        file = Path(path)
        if not file.is_file():
            raise UserInputError(f"--search_space {path}: no such file. Give a YAML file of option: range.")
        try:
            changes = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise UserInputError(f"--search_space {path} is not valid YAML: {error}") from None
        if not isinstance(changes, dict):
            raise UserInputError(f"--search_space {path} must hold a mapping of option: range, choices or value.")
        allowed = sorted({*DEFAULT_SPACE, *EXTRA_KEYS})
        unknown = sorted(set(changes) - set(allowed))
        if unknown:
            raise UserInputError(f"--search_space {path}: unknown option(s) {', '.join(unknown)}. "
                                 f"Searchable: {', '.join(allowed)}.")
        for key, value in changes.items():
            if value is None:
                space.pop(key, None)
            else:
                space[key] = value
    for key, value in space.items():
        if isinstance(value, dict):
            if set(value) - {"low", "high", "log"} or not {"low", "high"} <= set(value):
                raise UserInputError(f"--search_space: {key} must be a value, a list of choices or "
                                     f"{{low: ..., high: ..., log: true|false}}, got {value!r}.")
            if not value["low"] < value["high"]:
                raise UserInputError(f"--search_space: {key} needs low < high, got {value['low']} and {value['high']}.")
        elif isinstance(value, list) and not value:
            raise UserInputError(f"--search_space: {key} has an empty list of choices.")
    return space


def sample(trial, space: dict[str, Any]) -> dict[str, Any]:
    params = {}
    for key, value in space.items():
        if isinstance(value, dict):
            if key in INTEGER_KEYS:
                params[key] = trial.suggest_int(key, int(value["low"]), int(value["high"]), log=value.get("log", False))
            else:
                params[key] = trial.suggest_float(key, float(value["low"]), float(value["high"]),
                                                  log=value.get("log", False))
        elif isinstance(value, list):
            params[key] = trial.suggest_categorical(key, value)
        else:
            params[key] = value
    return params


def recipe(cfg: FinetuneConfig, params: dict[str, Any], train_size: int, **changes: Any) -> FinetuneConfig:
    """`cfg` with a trial's parameters (warm-up as a fraction of the optimizer steps) and `changes`: the
    recipe a trial trains. Data and output folders are not part of it; the search passes them to the phases."""
    params = dict(params)
    fraction = params.pop("warmup_fraction", None)
    batch = params.get("per_device_train_batch_size", cfg.per_device_train_batch_size)
    epochs = params.get("num_train_epochs", cfg.num_train_epochs)
    if fraction is not None:
        params["num_warmup_steps"] = int(fraction * epochs * -(-train_size // batch))
    if "head_hidden_sizes" in params and isinstance(params["head_hidden_sizes"], list):
        params["head_hidden_sizes"] = ",".join(str(s) for s in params["head_hidden_sizes"])
    return dataclasses.replace(cfg, **params, **changes)


# ---------------------------------------------------------------------------------------------------------
# Folds
# ---------------------------------------------------------------------------------------------------------


def write_folds(cfg: FinetuneConfig, folder: Path) -> tuple[list[tuple[Path, Path]], Path, Path | None, str, int]:
    """The training labels (after --max_train_samples) as JSONL, and k stratified folds of them (or the one
    given split when --validation_file is set), and the test split if there is one. Returns (folds, all
    labels file, test file, task type, label count)."""
    raw, text_column, task_type = load_labeled(cfg)
    train = raw["train"]
    if cfg.max_train_samples is not None:
        train = stratified_subset(train, cfg.label_column, cfg.max_train_samples, task_type, cfg.stratify, cfg.seed)
    columns = [c for c in (text_column, cfg.text_pair_column, cfg.label_column) if c]

    def write(name: str, rows) -> Path:
        return write_jsonl(folder / f"{name}.jsonl", rows, columns)

    everything = write("labels", train)
    test = write("test", raw["test"]) if "test" in raw else None
    if "validation" in raw:
        return [(everything, write("validation", raw["validation"]))], everything, test, task_type, len(train)
    if cfg.search_folds > len(train):
        raise UserInputError(f"--search_folds {cfg.search_folds} is more than the {len(train)} training examples.")
    # Stratified: the examples of each class, in a seeded order, are dealt to the folds in turn.
    rng = random.Random(cfg.seed)
    by_class: dict[str, list[int]] = {}
    for index, label in enumerate(train[cfg.label_column]):
        by_class.setdefault(json.dumps(label, sort_keys=True), []).append(index)
    fold_of, position = {}, 0
    for label in sorted(by_class):
        members = by_class[label]
        rng.shuffle(members)
        for index in members:
            fold_of[index] = position % cfg.search_folds
            position += 1
    folds = []
    for k in range(cfg.search_folds):
        held = [i for i in range(len(train)) if fold_of[i] == k]
        kept = [i for i in range(len(train)) if fold_of[i] != k]
        folds.append((write(f"fold{k}_train", train.select(kept)), write(f"fold{k}_validation", train.select(held))))
    return folds, everything, test, task_type, len(train)


# ---------------------------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------------------------


def _forget_stale_trials(study, workers: Path) -> None:
    """A killed search leaves its trial RUNNING forever: mark those of dead processes on this machine failed,
    so the trial is run again (finished trials are never redone). A trial killed before it named its worker
    (between Optuna creating it and its first line) is stale when no other process of the search may own it."""
    import optuna

    for trial in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
        owner = trial.user_attrs.get("worker", "")
        if _gone(owner) if owner else not _another_searcher(workers):
            study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
            logger.info("Trial %d was interrupted (its process is gone); it will be run again.", trial.number)


def _worker() -> str:
    """This process, as trials, locks and the workers folder name it."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _gone(worker: str) -> bool:
    """Whether `worker` (host:pid) was a process of this machine that no longer runs (one of another machine
    sharing the folder may be alive)."""
    host, _, pid = worker.rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not _alive(int(pid))


def _another_searcher(workers: Path) -> bool:
    """Whether another process searching in this folder may be alive."""
    return any(file.name != _worker() and not _gone(file.name) for file in workers.iterdir())


def _claim(lock: Path) -> bool:
    """Create `lock` naming this process; True if it is ours (a lock left by a dead process is taken over)."""
    try:
        descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        if _gone(lock.read_text()):
            lock.unlink(missing_ok=True)
            return _claim(lock)
        return False
    os.write(descriptor, _worker().encode())
    os.close(descriptor)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_search(cfg: FinetuneConfig, check_output: bool = True) -> dict[str, Any]:
    """Search, write the report, then train the final model: every run is a call of the stage-2 phases on
    this process's one Accelerator, with its own data and output folder. `check_output` False: the caller
    checked --output_dir (continued pretraining ran in it first)."""
    import optuna

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserInputError(
            "--search_trials runs each trial in one process. To run trials in parallel, start several processes "
            "with the same command and --output_dir (one per GPU, e.g. CUDA_VISIBLE_DEVICES=i python -m "
            "tlnlp.finetune ...): they share the study. Not `accelerate launch --num_processes N`."
        )
    output_dir = Path(cfg.output_dir)
    folder = output_dir / SEARCH_DIR
    resuming = (folder / JOURNAL).exists()
    # A search resumed (the same command again) or joined by a parallel process writes into its own folder.
    accelerator, hub_repo = start_run(cfg, check_output=check_output and not resuming)
    space = load_space(cfg.search_space)
    folds, everything, test, task_type, train_size = write_folds(cfg, folder / "data")
    metric, greater_is_better = selection_metric(cfg.metric_for_best_model, task_type)
    direction = "maximize" if greater_is_better else "minimize"

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.create_study(
        study_name="tlnlp", direction=direction, load_if_exists=True,
        storage=JournalStorage(JournalFileBackend(str(folder / JOURNAL))),
        sampler=optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=min(5, cfg.search_trials)),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
    )
    workers = folder / "workers"  # one file per searching process, named host:pid
    workers.mkdir(parents=True, exist_ok=True)
    (workers / _worker()).touch()
    _forget_stale_trials(study, workers)
    counted = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = len(study.get_trials(states=counted))
    logger.info("Recipe search: %d of %d trials done%s; %s by %d-fold cross-validation of %s.", done,
                cfg.search_trials, " (resumed)" if resuming else "", metric, len(folds), "the training labels"
                if len(folds) > 1 else "--validation_file")
    if len(folds) == 1:
        decided_on("The recipe search's choice of trial", count_lines(folds[0][1]),
                   "Leave out --validation_file to score each trial by cross-validation on all the training labels "
                   "(--search_folds).")

    def objective(trial) -> float:
        trial.set_user_attr("worker", _worker())
        params = sample(trial, space)
        trial_cfg = recipe(cfg, params, train_size)
        scores = []
        for k, (train_file, validation_file) in enumerate(folds):
            run_dir = folder / f"trial_{trial.number:03d}" / f"fold_{k}"
            shutil.rmtree(run_dir, ignore_errors=True)
            fold = read_labeled_splits(train_file=str(train_file), validation_file=str(validation_file), test_file=None)
            # The trained recipe's score is its last evaluation (no picking); a fold keeps no model.
            results = finetune(trial_cfg, accelerator, fold, run_dir, restore_best=False, keep_model=False)
            write_results(run_dir, results)
            accelerator.free_memory()
            scores.append(results[f"eval_{metric}"])
            trial.report(statistics.mean(scores), k)
            if k + 1 < len(folds) and trial.should_prune():
                logger.info("Trial %d pruned after fold %d (%s %.4f).", trial.number, k, metric, statistics.mean(scores))
                raise optuna.TrialPruned()
        logger.info("Trial %d: %s %.4f over %d fold(s) with %s", trial.number, metric, statistics.mean(scores),
                    len(folds), params)
        return statistics.mean(scores)

    study.optimize(objective, n_trials=max(cfg.search_trials - done, 0), catch=(TrainingError,),
                   callbacks=[optuna.study.MaxTrialsCallback(cfg.search_trials, states=counted)])
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise UserInputError("No search trial completed (all were pruned or failed); see the log above.")
    best = study.best_trial
    best_params = {**{k: v for k, v in space.items() if not isinstance(v, (dict, list))}, **best.params}
    scored = f"{len(folds)}-fold cross-validated" if len(folds) > 1 else "validation-split"
    write_report(study, cfg, best_params, train_size, folder, f"{scored} {metric}")
    logger.info("Best recipe (trial %d, %s %.4f): %s. Training the final model on all %d labels.", best.number,
                metric, best.value, best_params, train_size)

    if not _claim(folder / "final.lock"):  # processes searching in parallel: one of them trains the final model
        logger.info("Another process trains the final model (%s).", folder / "final.lock")
        finish(accelerator)
        return {"search_best_trial": best.number, "search_best_cv_score": best.value, "search_metric": metric}
    # All the labels; the epochs were chosen by cross-validation, so the last epoch is kept. The run's
    # evaluation is on the training labels themselves (a progress report, not a score).
    best_cfg = recipe(cfg, best_params, train_size)
    final = read_labeled_splits(train_file=str(everything), validation_file=str(everything),
                                test_file=str(test) if test else None)
    results = finetune(best_cfg, accelerator, final, output_dir, restore_best=False, report_copies=False)
    results.update(search_trials=len(study.trials), search_best_trial=best.number,
                   search_best_cv_score=best.value, search_metric=metric, search_folds=len(folds))
    end_run(best_cfg, accelerator, results, "finetune", hub_repo)  # the card names the user's data set
    return results


def write_results(run_dir: Path, results: dict[str, Any]) -> None:
    """A search fold's all_results.json (its model is not kept: the results are)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RESULTS_FILE).write_text(json.dumps({"stage": "finetune", **results}, indent=2, default=float))


def write_report(study, cfg: FinetuneConfig, best_params: dict, train_size: int, folder: Path, score: str) -> None:
    """trials.csv, best_config.yaml (the full option set, reusable with --config) and search.png. `score`
    names what scored the trials, e.g. "3-fold cross-validated accuracy"."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    study.trials_dataframe().to_csv(folder / "trials.csv", index=False)
    best_cfg = recipe(cfg, best_params, train_size, search_trials=None, search_space=None)
    leave_out = ("config", "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "hub_token")
    values = {k: v for k, v in config_to_dict(best_cfg).items() if v is not None and k not in leave_out}
    (folder / "best_config.yaml").write_text(
        f"# Best recipe of {len(study.trials)} trials ({score} {study.best_value:.4f}); "
        "use with --config.\n" + yaml.safe_dump(values, sort_keys=False))

    figure, (history, importance) = plt.subplots(1, 2, figsize=(11, 4))
    finished = [t for t in study.trials if t.value is not None]
    history.scatter([t.number for t in finished], [t.value for t in finished], s=18, label="trial")
    running, best_so_far = [], None
    for t in finished:
        better = best_so_far is None or (t.value < best_so_far if study.direction.name == "MINIMIZE" else t.value > best_so_far)
        best_so_far = t.value if better else best_so_far
        running.append(best_so_far)
    history.plot([t.number for t in finished], running, color="C1", label="best so far")
    history.set(xlabel="trial", ylabel=score, title="Recipe search")
    history.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    history.legend()
    try:
        importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError):  # too few completed trials to fit the importance model
        importances = {}
    importance.barh(list(importances)[::-1], list(importances.values())[::-1])
    importance.set(xlabel="importance (fANOVA)", title="Which options mattered")
    figure.tight_layout()
    figure.savefig(folder / "search.png", dpi=110)
    plt.close(figure)
