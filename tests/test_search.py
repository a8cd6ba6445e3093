"""Recipe search: Optuna trials scored by cross-validation, a report, the final model, resume, bad input."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from accelerate.state import AcceleratorState
from conftest import REPO
from transformers import AutoModelForSequenceClassification

from tlnlp.core.config import FinetuneConfig, parse_config
from tlnlp.core.errors import UserInputError
from tlnlp.finetune import main

pytest.importorskip("optuna")


def run_main(args: list[str]) -> dict:
    AcceleratorState._reset_state(reset_partial_state=True)
    return main(parse_config(FinetuneConfig, args))


@pytest.fixture
def small_space(tmp_path) -> Path:
    """Few epochs and steps, so each trial takes seconds."""
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"learning_rate": {"low": 1e-3, "high": 5e-3, "log": True},
                                    "num_train_epochs": {"low": 1, "high": 2}, "per_device_train_batch_size": [16],
                                    "freeze_layers": None, "layerwise_lr_decay": None, "max_seq_length": 32}))
    return path


def search_args(model: Path, files: dict, out: Path, cache: Path, space: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(model), "--train_file", str(files["train"]), "--test_file",
            str(files["test"]), "--output_dir", str(out), "--cache_dir", str(cache), "--search_space", str(space),
            "--search_folds", "2", "--seed", "3", "--logging_steps", "5", *extra]


def test_a_small_search_reports_and_its_best_recipe_reloads(tiny_mlm_dir, labeled_files, tmp_path, small_space):
    out = tmp_path / "searched"
    results = run_main(search_args(tiny_mlm_dir, labeled_files, out, tmp_path / "cache", small_space,
                                   "--search_trials", "2"))
    folder = out / "search"
    trials = list(csv.DictReader((folder / "trials.csv").open()))
    assert len(trials) == 2 and all(t["state"] == "COMPLETE" for t in trials)
    assert (folder / "search.png").stat().st_size > 0
    assert results["search_trials"] == 2 and results["search_folds"] == 2 and "test_accuracy" in results
    best = yaml.safe_load((folder / "best_config.yaml").read_text())
    scores = [float(t["value"]) for t in trials]
    assert results["search_best_cv_score"] == pytest.approx(max(scores))
    best_trial = trials[scores.index(max(scores))]
    assert best["learning_rate"] == pytest.approx(float(best_trial["params_learning_rate"]))
    assert best["max_seq_length"] == 32 and "search_trials" not in best and "output_dir" not in best
    # The final model: trained on every label (180), saved as a standard classifier.
    assert json.loads((out / "all_results.json").read_text())["train_set_size"] == 180
    AutoModelForSequenceClassification.from_pretrained(out)
    # A trial's fold runs keep their results, not their weights.
    assert (folder / "trial_000" / "fold_0" / "eval_history.json").exists()
    assert not list(folder.glob("trial_*/fold_*/*.safetensors"))

    again = tmp_path / "from-best"
    run_main(["--config", str(folder / "best_config.yaml"), "--output_dir", str(again)])  # the user's data, the recipe
    used = yaml.safe_load((again / "training_config.yaml").read_text())
    assert used["learning_rate"] == pytest.approx(best["learning_rate"]) and used["train_file"] == str(labeled_files["train"])
    assert (again / "model.safetensors").exists()


def test_a_killed_search_resumes_without_redoing_finished_trials(tiny_mlm_dir, labeled_files, tmp_path, small_space):
    out = tmp_path / "killed"
    args = search_args(tiny_mlm_dir, labeled_files, out, tmp_path / "cache", small_space, "--search_trials", "3")
    process = subprocess.Popen([sys.executable, "-m", "tlnlp.finetune", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=REPO)
    journal, deadline = out / "search" / "journal.log", time.time() + 240
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    def finished() -> int:
        if not journal.exists():
            return 0
        try:
            study = optuna.load_study(study_name="tlnlp", storage=JournalStorage(JournalFileBackend(str(journal))))
        except KeyError:  # the journal file is there before the record that creates the study is written
            return 0
        return len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))

    while time.time() < deadline and process.poll() is None and finished() < 1:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the search ended before it could be killed"
    before = {t.number: t.params for t in optuna.load_study(
        study_name="tlnlp", storage=JournalStorage(JournalFileBackend(str(journal)))).get_trials(
        states=(optuna.trial.TrialState.COMPLETE,))}
    assert len(before) >= 1

    run_main(args)  # the same command again
    study = optuna.load_study(study_name="tlnlp", storage=JournalStorage(JournalFileBackend(str(journal))))
    counted = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)  # (later trials may be pruned)
    finished_after = {t.number: t.params for t in study.get_trials(states=counted)}
    assert len(finished_after) == 3
    assert all(finished_after[n] == params for n, params in before.items())  # finished trials kept, not redone
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))  # the interrupted one was failed
    assert (out / "model.safetensors").exists()


@pytest.mark.parametrize(("extra", "space", "message"), [
    (["--search_trials", "0"], None, "--search_trials must be greater than 0"),
    (["--search_trials", "2"], {"learning_rte": [1e-4]}, "unknown option(s) learning_rte. Searchable:"),
    (["--search_trials", "2"], {"num_train_epochs": {"low": 5, "high": 2}}, "needs low < high"),
    (["--search_trials", "2", "--search_folds", "1"], None, "--search_folds must be between 2 and 20"),
])
def test_bad_search_input_is_refused_before_training(extra, space, message, tiny_mlm_dir, labeled_files, tmp_path):
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(space or {}))
    out = tmp_path / "out"
    args = search_args(tiny_mlm_dir, labeled_files, out, tmp_path / "cache", space_file, *extra)
    with pytest.raises(UserInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_main(args)
    assert not list(out.glob("search/trial_*"))


def test_the_searched_model_card_keeps_the_built_in_data_set(tiny_mlm_dir, tmp_path, small_space):
    """The final run once recorded its data as the search's own files, so the card said "local files" and
    lost the data set's licence line."""
    out = tmp_path / "searched"
    run_main(["--model_name_or_path", str(tiny_mlm_dir), "--dataset_name", "wiki-uncertainty", "--max_train_samples",
              "40", "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"), "--search_space",
              str(small_space), "--search_folds", "2", "--search_trials", "1", "--max_seq_length", "32"])
    card = (out / "README.md").read_text()
    assert "`wiki-uncertainty` (built into tlnlp)" in card and "Licence:" in card


def test_a_search_into_a_used_folder_is_refused_with_the_runs_own_message(tiny_mlm_dir, labeled_files, tmp_path,
                                                                          small_space):
    """The search once repeated the output-folder check with its own, shorter message."""
    out = tmp_path / "used"
    out.mkdir()
    (out / "notes.txt").write_text("an earlier run")
    with pytest.raises(UserInputError, match="--resume_from_checkpoint latest to continue it"):
        run_main(search_args(tiny_mlm_dir, labeled_files, out, tmp_path / "cache", small_space, "--search_trials", "1"))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_trial_killed_before_it_named_its_worker_is_run_again_unless_another_searcher_may_own_it(tmp_path):
    """Optuna creates the trial (RUNNING) before its first line names the worker: a kill in between left it
    RUNNING for ever."""
    import socket

    import optuna

    from tlnlp.recipes import search

    study = optuna.create_study()
    study.ask()  # a trial with no worker, as a kill between its creation and its first line leaves it
    workers = tmp_path / "workers"
    workers.mkdir()
    (workers / f"{socket.gethostname()}:{os.getppid()}").touch()  # another searcher, alive
    search._forget_stale_trials(study, workers)
    assert len(study.get_trials(states=(optuna.trial.TrialState.RUNNING,))) == 1
    (workers / f"{socket.gethostname()}:{os.getppid()}").unlink()
    (workers / f"{socket.gethostname()}:{os.getpid()}").touch()  # this process only
    search._forget_stale_trials(study, workers)
    assert [t.state for t in study.get_trials()] == [optuna.trial.TrialState.FAIL]
