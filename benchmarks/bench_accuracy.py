"""Accuracy on small labeled sets: tlnlp's recipes against the tools users would otherwise pick, side by side.

On each built-in labeled set, with the same stratified labels (1,000 by default), the same MiniLM encoder
and the full test split, over several seeds:

stock          the `run_glue_no_trainer.py` recipe, rebuilt (benchmarks/bench_finetune.py: lr 1e-4, 3 epochs,
               batch 16, [CLS] head).
setfit         SetFit 1.2.0 (2 pair iterations, then logistic regression; truncated like the rest), if installed
               (`pip install -e .[bench]`); skipped otherwise, and the JSON says so.
tlnlp          `python -m tlnlp.finetune` with its defaults (only --max_seq_length set, as for every recipe).
tlnlp-self     tlnlp with self-training on the set's unlabeled text (--unlabeled_dataset, 1 round): wiki-leads
               for wiki-topics, their sentences for wiki-uncertainty, movie-review sentences for
               movie-sentences.
tlnlp-self-similar  the same with --unlabeled_selection similar (the unlabeled texts most like the labeled
               ones); not in the default list.
tlnlp-search   tlnlp with --search_trials (Optuna TPE). The built-in sets have a validation split, and it
               scores the trials (cross-validation on the labels, --search_folds, is for sets without one).

Writes benchmarks/results/accuracy_cpu.json (every run, mean ± std and wall time per recipe and set) and
prints a Markdown table. It takes hours on 2 CPU cores: `make bench-accuracy`, never part of the tests.

    python benchmarks/bench_accuracy.py --sets wiki-topics,movie-sentences,wiki-uncertainty --seeds 42,43,44
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

RECIPES = ("stock", "setfit", "tlnlp", "tlnlp-self", "tlnlp-search")
# Unlabeled text for self-training: the same kind of text as each labeled set, never its test split.
# The sentence sets pseudo-label sentences, the paragraph set paragraphs.
UNLABELED = {"wiki-topics": "wiki-leads", "wiki-uncertainty": "wiki-lead-sentences",
             "movie-sentences": "movie-review-sentences"}


def tlnlp_run(dataset: str, labels: int, seed: int, length: int, extra: list[str], keep: Path | None = None) -> float:
    """`python -m tlnlp.finetune` in a subprocess; its output directory is kept under `keep` if given."""
    with tempfile.TemporaryDirectory() as scratch:
        out = str(keep) if keep else scratch
        command = [sys.executable, "-m", "tlnlp.finetune", "--model_name_or_path", "minilm-l6", "--dataset_name", dataset,
                   "--max_train_samples", str(labels), "--seed", str(seed), "--max_seq_length", str(length),
                   "--output_dir", out, "--overwrite_output_dir", *extra]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        return json.loads((Path(out) / "all_results.json").read_text())["test_accuracy"]


def stock_run(dataset: str, labels: int, seed: int, length: int) -> float:
    import bench_finetune

    from tlnlp import builtin

    files = builtin.dataset_files(dataset)
    args = argparse.Namespace(train_file=files["train"], validation_file=files["validation"], test_file=files["test"],
                              labels=labels, seed=seed, model="minilm-l6", max_seq_length=length, batch_size=16,
                              eval_batch_size=64, learning_rate=1e-4, epochs=3, frozen_epochs=3, freeze_layers=0)
    return bench_finetune.stock(args, frozen=False, precision="no")["test_accuracy"]


def setfit_run(dataset: str, labels: int, seed: int, length: int) -> float:
    from datasets import load_dataset
    from setfit import SetFitModel, Trainer, TrainingArguments

    from tlnlp import builtin

    splits = load_dataset("json", data_files=builtin.dataset_files(dataset))
    train = splits["train"].select(builtin.stratified_indices(splits["train"]["label"], labels, seed).tolist())
    model = SetFitModel.from_pretrained(builtin.model_dir("minilm-l6"))
    model.model_body.max_seq_length = length  # the same truncation as every other recipe (else 512)
    with tempfile.TemporaryDirectory() as out:  # SetFit's checkpoints, not in the working directory
        arguments = TrainingArguments(output_dir=out, num_iterations=2, batch_size=16, num_epochs=1, seed=seed)
        trainer = Trainer(model=model, args=arguments, train_dataset=train.select_columns(["text", "label"]))
        trainer.train()
    predictions = model.predict(splits["test"]["text"])
    truth = splits["test"]["label"]
    return sum(str(p) == str(t) for p, t in zip(predictions, truth)) / len(truth)


def run(recipe: str, dataset: str, labels: int, seed: int, length: int, trials: int, folds: int,
        keep_runs: str | None = None) -> float | None:
    if recipe == "stock":
        return stock_run(dataset, labels, seed, length)
    if recipe == "setfit":
        try:
            import setfit  # noqa: F401
        except ImportError:
            return None
        return setfit_run(dataset, labels, seed, length)
    self_training = ["--unlabeled_dataset", UNLABELED[dataset], "--self_training_rounds", "1"]
    extra = {"tlnlp": [], "tlnlp-self": self_training,
             "tlnlp-self-similar": self_training + ["--unlabeled_selection", "similar"],
             "tlnlp-search": ["--search_trials", str(trials), "--search_folds", str(folds)]}[recipe]
    keep = Path(keep_runs) / dataset / recipe / f"seed{seed}" if keep_runs else None
    return tlnlp_run(dataset, labels, seed, length, extra, keep)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="wiki-topics,movie-sentences,wiki-uncertainty")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument("--labels", type=int, default=1000)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--search_trials", type=int, default=12)
    parser.add_argument("--search_folds", type=int, default=3,
                        help="Folds per search trial, for a set without a validation split (the built-in sets have one).")
    parser.add_argument("--keep_runs", metavar="DIR", help="Keep each tlnlp run's output directory (search/ trials, "
                        "self_training/ pseudo-labels, logs) under DIR/<set>/<recipe>/seed<N>; default: discard.")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "accuracy_cpu.json"))
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    command = "python benchmarks/bench_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report: dict = {"command": command, "labels": args.labels, "seeds": seeds, "encoder": "minilm-l6", "sets": {}}
    for dataset in args.sets.split(","):
        table = report["sets"].setdefault(dataset, {})
        for recipe in args.recipes.split(","):
            accuracies, started = [], time.time()
            for seed in seeds:
                accuracy = run(recipe, dataset, args.labels, seed, args.max_seq_length, args.search_trials,
                               args.search_folds, args.keep_runs)
                if accuracy is None:
                    break
                accuracies.append(accuracy)
                print(f"{dataset:17} {recipe:13} seed {seed}: {accuracy:.4f}", flush=True)
            table[recipe] = {"skipped": "not installed"} if not accuracies else {
                "per_seed": accuracies, "mean": statistics.mean(accuracies),
                "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                "wall_time_s_per_seed": (time.time() - started) / len(accuracies)}
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps(report, indent=2))  # after every recipe: a stop loses little
    print(markdown(report))
    return report


def markdown(report: dict) -> str:
    recipes = list(dict.fromkeys(r for table in report["sets"].values() for r in table))
    lines = ["| recipe | " + " | ".join(report["sets"]) + " | wall time per seed |",
             "|---|" + "---:|" * (len(report["sets"]) + 1)]
    for recipe in recipes:
        cells, times = [], []
        for table in report["sets"].values():
            result = table.get(recipe, {})
            cells.append(f"{result['mean']:.3f} ± {result['std']:.3f}" if "mean" in result else "–")
            times += [result["wall_time_s_per_seed"]] if "mean" in result else []
        lines.append(f"| {recipe} | " + " | ".join(cells) + f" | {statistics.mean(times):.0f} s |" if times else
                     f"| {recipe} | " + " | ".join(cells) + " | – |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
