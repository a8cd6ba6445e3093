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
tlnlp-tapt     tlnlp with --continued_pretraining task: MiniLM continued on the set's training texts first,
               fine-tuned unless the gate finds it damaged (tlnlp.recipes.continued_pretraining).
tlnlp-tapt-tsdae  the same with --continued_pretraining_objective tsdae (a denoising auto-encoder over
               sentences instead of MLM); opt-in.
tlnlp-tapt-simcse  the same with --continued_pretraining_objective simcse (contrastive learning between two
               dropout passes over each text); opt-in.
tlnlp-tapt-self  both: continued pretraining, then self-training.
tlnlp-aux-mlm  tlnlp with --auxiliary_mlm task: an MLM loss on the set's training texts added to every
               fine-tuning step (no separate stage 1); opt-in.
tlnlp-dapt     --continued_pretraining on the set's unlabeled corpus (the one self-training reads); opt-in.
tlnlp-dapt-tapt  --continued_pretraining CORPUS+task: that corpus, then the set's training texts; opt-in.
tlnlp-search   tlnlp with --search_trials (Optuna TPE). The built-in sets have a validation split, and it
               scores the trials (cross-validation on the labels, --search_folds, is for sets without one).

Writes benchmarks/results/accuracy_cpu.json (every run, mean ± std and wall time per recipe and set; for a
recipe with continued pretraining, each seed's stage-1 minutes and gate decision), a plot beside it
(accuracy_cpu.png; with such recipes and tlnlp, also accuracy_cpu_stage1.png: each one's gain over the
defaults against its stage-1 minutes) and prints a Markdown table. It takes hours on 2 CPU cores: `make bench-accuracy`,
never part of the tests.

    python benchmarks/bench_accuracy.py --sets wiki-topics,movie-sentences,wiki-uncertainty,speech-eras --seeds 42,43,44

Run in parts (a set, a recipe or a seed at a time, each with its own --output), the parts make one report:

    python benchmarks/bench_accuracy.py --merge part1.json part2.json ... --output accuracy_cpu.json

For each set, recipe and seed the last part that ran it counts (a rerun after a fix supersedes the run
before it, and the report lists what it superseded); every score keeps the part and command it came from.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

RECIPES = ("stock", "setfit", "tlnlp", "tlnlp-tapt", "tlnlp-self", "tlnlp-tapt-self", "tlnlp-search")
OPT_IN_RECIPES = ("tlnlp-self-similar", "tlnlp-tapt-tsdae", "tlnlp-tapt-simcse", "tlnlp-dapt", "tlnlp-dapt-tapt", "tlnlp-aux-mlm")
# Unlabeled text for self-training: the same kind of text as each labeled set, never its test split.
# The sentence sets pseudo-label sentences, the paragraph set paragraphs.
UNLABELED = {"wiki-topics": "wiki-leads", "wiki-uncertainty": "wiki-lead-sentences",
             "movie-sentences": "movie-review-sentences", "speech-eras": "speech-passages",
             "brown-genres": "brown-passages"}
NEEDS_UNLABELED = ("tlnlp-self", "tlnlp-tapt-self", "tlnlp-dapt", "tlnlp-dapt-tapt", "tlnlp-self-similar")


def tlnlp_run(dataset: str, labels: int, seed: int, length: int, extra: list[str], keep: Path | None = None) -> dict:
    """`python -m tlnlp.finetune` in a subprocess: its test accuracy and, for a recipe with continued
    pretraining, what stage 1 cost and what the gate decided. Its output directory is kept under `keep`."""
    with tempfile.TemporaryDirectory() as scratch:
        out = str(keep) if keep else scratch
        command = [sys.executable, "-m", "tlnlp.finetune", "--model_name_or_path", "minilm-l6", "--dataset_name", dataset,
                   "--max_train_samples", str(labels), "--seed", str(seed), "--max_seq_length", str(length),
                   "--output_dir", out, "--overwrite_output_dir", *extra]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        return run_record(json.loads((Path(out) / "all_results.json").read_text()))


def run_record(results: dict) -> dict:
    """A tlnlp run as the report keeps it: the test accuracy, and stage 1's minutes (its own training time,
    the same when a later seed reuses the cached encoder) with the gate's decision, if it ran one."""
    record = {"accuracy": results["test_accuracy"]}
    adaptation = results.get("continued_pretraining")
    if adaptation:
        record["stage1"] = {"minutes": adaptation["stage1_minutes"], "kept": adaptation["kept"],
                            "reused_from_cache": adaptation["reused_from_cache"]}
        if adaptation.get("gate") == "finetune":  # the test score of each fine-tuning, beside the decision
            record["stage1"].update({key: adaptation[key] for key in (
                "gate", "difference", "difference_standard_error", "validation_original", "validation_adapted",
                "test_original", "test_adapted") if key in adaptation})
        else:
            record["stage1"].update({key: adaptation[key] for key in (
                "probe_difference", "probe_difference_standard_error")})
    return record


def stock_run(dataset: str, labels: int, seed: int, length: int) -> dict:
    import bench_finetune

    from tlnlp.data import builtin

    files = builtin.dataset_files(dataset)
    args = argparse.Namespace(train_file=files["train"], validation_file=files["validation"], test_file=files["test"],
                              labels=labels, seed=seed, model="minilm-l6", max_seq_length=length, batch_size=16,
                              eval_batch_size=64, learning_rate=1e-4, epochs=3, frozen_epochs=3, freeze_layers=0)
    return {"accuracy": bench_finetune.stock(args, frozen=False, precision="no")["test_accuracy"]}


def setfit_run(dataset: str, labels: int, seed: int, length: int) -> dict:
    from datasets import load_dataset
    from setfit import SetFitModel, Trainer, TrainingArguments

    from tlnlp.data import builtin

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
    return {"accuracy": sum(str(p) == str(t) for p, t in zip(predictions, truth)) / len(truth)}


def run(recipe: str, dataset: str, labels: int, seed: int, length: int, trials: int, folds: int,
        keep_runs: str | None = None, tlnlp_args: tuple[str, ...] = ()) -> dict | None:
    """One run of `recipe`: {"accuracy": ...} and, with continued pretraining, "stage1"; None if skipped."""
    if recipe == "stock":
        return stock_run(dataset, labels, seed, length)
    if recipe == "setfit":
        try:
            import setfit  # noqa: F401
        except ImportError:
            return None
        return setfit_run(dataset, labels, seed, length)
    unlabeled = UNLABELED.get(dataset, "")  # main refused a set without it for the recipes that read it
    self_training = ["--unlabeled_dataset", unlabeled, "--self_training_rounds", "1"]
    tapt = ["--continued_pretraining", "task"]
    extra = {"tlnlp": [], "tlnlp-self": self_training, "tlnlp-tapt": tapt, "tlnlp-tapt-self": tapt + self_training,
             "tlnlp-tapt-tsdae": tapt + ["--continued_pretraining_objective", "tsdae"],
             "tlnlp-tapt-simcse": tapt + ["--continued_pretraining_objective", "simcse"],
             "tlnlp-dapt": ["--continued_pretraining", unlabeled],
             "tlnlp-dapt-tapt": ["--continued_pretraining", f"{unlabeled}+task"], "tlnlp-aux-mlm": ["--auxiliary_mlm", "task"],
             "tlnlp-self-similar": self_training + ["--unlabeled_selection", "similar"],
             "tlnlp-search": ["--search_trials", str(trials), "--search_folds", str(folds)]}[recipe]
    keep = Path(keep_runs) / dataset / recipe / f"seed{seed}" if keep_runs else None
    return tlnlp_run(dataset, labels, seed, length, [*extra, *tlnlp_args], keep)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", help="Sets to run (default: wiki-topics,movie-sentences,wiki-uncertainty,"
                        "speech-eras); with --merge, the sets the report keeps, in this order (default: all).")
    parser.add_argument("--recipes", help=f"Recipes to run (default: {','.join(RECIPES)}); with --merge, the "
                        "recipes the report keeps (default: all).")
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument("--labels", type=int, default=1000)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--search_trials", type=int, default=8,
                        help="Trials per search (8: what BENCHMARKS.md measured).")
    parser.add_argument("--search_folds", type=int, default=3,
                        help="Folds per search trial, for a set without a validation split (the built-in sets have one).")
    parser.add_argument("--keep_runs", metavar="DIR", help="Keep each tlnlp run's output directory (search/ trials, "
                        "self_training/ pseudo-labels, logs) under DIR/<set>/<recipe>/seed<N>; default: discard.")
    parser.add_argument("--tlnlp_args", default="", help="Options added to every tlnlp recipe's command, recorded "
                        "in the report; e.g. --tlnlp_args='--min_train_steps 0' for a quick check on a few labels.")
    parser.add_argument("--variant", metavar="NAME", help="Record each recipe as RECIPE:NAME (e.g. --tlnlp_args="
                        "'--continued_pretraining_steps 1200' --variant 1200steps), so that runs of one recipe with "
                        "other options merge beside its plain runs instead of superseding them.")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "accuracy_cpu.json"))
    parser.add_argument("--merge", nargs="+", metavar="PART", help="Run nothing: make one report (--output, its "
                        "plot and table) from the JSONs of earlier runs, later parts superseding earlier ones.")
    args = parser.parse_args(argv)
    command = "python benchmarks/bench_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.merge:
        if args.variant:
            parser.error("--variant names the recipes of a run; a merge keeps the names its parts were run with.")
        report = {"command": command, **merge([Path(part) for part in args.merge])}
        report["sets"] = select(report["sets"], args.sets, args.recipes)
        write(report, Path(args.output))
        print(markdown(report))
        return report
    args.sets = args.sets or "wiki-topics,movie-sentences,wiki-uncertainty,speech-eras"
    args.recipes = args.recipes or ",".join(RECIPES)
    missing = [f"{recipe} on {dataset}" for dataset in args.sets.split(",") for recipe in args.recipes.split(",")
               if recipe in NEEDS_UNLABELED and dataset not in UNLABELED]
    if missing:
        parser.error(f"{', '.join(missing)}: these recipes read an unlabeled corpus of the set's kind, and the set has "
                     f"none built in (sets with one: {', '.join(UNLABELED)}). Drop those recipes or sets.")
    if args.variant is not None and not args.variant.replace("-", "").replace("_", "").isalnum():
        parser.error(f"--variant {args.variant!r}: use letters, digits, '-' and '_' (it becomes RECIPE:NAME in "
                     "the report and in --recipes when merging), e.g. --variant 1200steps.")
    seeds = [int(s) for s in args.seeds.split(",")]
    report: dict = {"command": command, "labels": args.labels, "seeds": seeds, "encoder": "minilm-l6", "sets": {}}
    tlnlp_args = tuple(shlex.split(args.tlnlp_args))
    if tlnlp_args:
        report["tlnlp_args"] = args.tlnlp_args
    for dataset in args.sets.split(","):
        table = report["sets"].setdefault(dataset, {})
        for recipe in args.recipes.split(","):
            name = f"{recipe}:{args.variant}" if args.variant else recipe
            records, started = [], time.time()
            for seed in seeds:
                record = run(recipe, dataset, args.labels, seed, args.max_seq_length, args.search_trials,
                             args.search_folds, args.keep_runs, tlnlp_args)
                if record is None:
                    break
                records.append(record)
                print(f"{dataset:17} {name:13} seed {seed}: {record['accuracy']:.4f}", flush=True)
            table[name] = {"skipped": "not installed"} if not records else summary(
                [r["accuracy"] for r in records], [(time.time() - started) / len(records)],
                [r["stage1"] for r in records if "stage1" in r])
            write(report, Path(args.output), with_plot=False)  # after every recipe: a stop loses little
    write(report, Path(args.output))
    print(markdown(report))
    return report


def summary(scores: list[float], wall_times: list[float], stage1: list[dict] | None = None) -> dict:
    """Mean, spread and wall time over the seeds; `stage1`, one record a seed (None for a seed of an older
    part without one), for recipes that ran one."""
    return {"per_seed": scores, "mean": statistics.mean(scores),
            "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
            "wall_time_s_per_seed": statistics.mean(wall_times), **({"stage1": stage1} if any(stage1 or []) else {})}


def merge(parts: list[Path]) -> dict:
    """One report from runs made in parts. A part records a mean wall time per recipe and one score per seed, in
    the order of its `seeds`; for each set, recipe and seed the last part that has it wins."""
    times_given = collections.Counter(part.resolve() for part in parts)
    given_twice = sorted({str(part) for part in parts if times_given[part.resolve()] > 1})
    if given_twice:  # it would supersede itself, and the report's command and parts would list it twice
        raise SystemExit(f"--merge: {', '.join(given_twice)} given more than once; give each part once, in the "
                         "order later parts supersede earlier ones.")
    runs: dict = {}  # (set, recipe) -> {seed: (accuracy, wall time, part, stage-1 record or None)}
    merged: dict = {"parts": [], "superseded": [], "sets": {}}
    for part in parts:
        report = json.loads(part.read_text())
        merged["parts"].append({"file": part.name, "command": report["command"]})
        for dataset, table in report["sets"].items():
            for recipe, result in table.items():
                scores = result.get("per_seed", [])
                stage1 = [*result.get("stage1", []), *[None] * len(scores)][: len(scores)]
                for seed, accuracy, adaptation in zip(report["seeds"], scores, stage1):
                    earlier = runs.setdefault((dataset, recipe), {}).get(seed)
                    if earlier:
                        merged["superseded"].append({"set": dataset, "recipe": recipe, "seed": seed,
                                                     "accuracy": earlier[0], "part": earlier[2], "by": part.name})
                    runs[(dataset, recipe)][seed] = (accuracy, result["wall_time_s_per_seed"], part.name, adaptation)
    for (dataset, recipe), by_seed in runs.items():
        seeds = sorted(by_seed)
        merged["sets"].setdefault(dataset, {})[recipe] = {
            **summary([by_seed[s][0] for s in seeds], [by_seed[s][1] for s in seeds],
                      [by_seed[s][3] for s in seeds]),
            "seeds": seeds, "parts": [by_seed[s][2] for s in seeds]}
    return merged


def select(sets: dict, wanted_sets: str | None, wanted_recipes: str | None) -> dict:
    """A merged report's tables, cut to the sets (in the order given) and recipes asked for: parts that ran
    other recipes beside the ones wanted (an older default, say) can then feed a report without them."""
    names = wanted_sets.split(",") if wanted_sets else list(sets)
    unknown = [name for name in names if name not in sets]
    if unknown:
        raise SystemExit(f"--sets {', '.join(unknown)}: no part ran it (the parts ran {', '.join(sets)}).")
    recipes = set(wanted_recipes.split(",")) if wanted_recipes else None
    return {name: {r: result for r, result in sets[name].items() if recipes is None or r in recipes}
            for name in names}


def ordered_recipes(report: dict) -> list[str]:
    """Known recipes in their listed order, each followed by its variants (RECIPE:NAME); others last."""
    known = (*RECIPES, *OPT_IN_RECIPES)
    found = {recipe for table in report["sets"].values() for recipe in table}

    def place(name: str) -> tuple:
        base, _, variant = name.partition(":")
        return (known.index(base), variant) if base in known else (len(known), name)
    return sorted(found, key=place)


def write(report: dict, output: Path, with_plot: bool = True) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    if with_plot:
        plot(report, output.with_suffix(".png"))
        if any("stage1" in r and "tlnlp" in table for table in report["sets"].values() for r in table.values()):
            plot_stage1(report, output.with_name(output.stem + "_stage1.png"))


def plot(report: dict, path: Path) -> None:
    """Mean accuracy per set and recipe, one standard deviation as the error bar and each seed as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipes, sets = ordered_recipes(report), list(report["sets"])
    width = 0.8 / max(len(recipes), 1)
    figure, axes = plt.subplots(figsize=(2.4 + 2.2 * len(sets), 4.2))
    for i, recipe in enumerate(recipes):
        ran = [(j, report["sets"][dataset][recipe]) for j, dataset in enumerate(sets)
               if "mean" in report["sets"][dataset].get(recipe, {})]
        positions = [j - 0.4 + width * (i + 0.5) for j, _ in ran]
        axes.bar(positions, [r["mean"] for _, r in ran], width, yerr=[r["std"] for _, r in ran], capsize=2,
                 label=recipe)
        for x, (_, result) in zip(positions, ran):
            axes.scatter([x] * len(result["per_seed"]), result["per_seed"], s=9, color="black", zorder=3)
    scores = [a for table in report["sets"].values() for r in table.values() for a in r.get("per_seed", [])]
    if scores:
        axes.set_ylim(max(0.0, min(scores) - 0.05), min(1.0, max(scores) + 0.03))
    axes.set_xticks(range(len(sets)), sets)
    axes.set_ylabel("test accuracy")
    axes.set_title("Same labels, same encoder: mean over seeds (dots: each seed)")
    axes.legend(fontsize=8, ncols=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_stage1(report: dict, path: Path) -> None:
    """What stage 1 buys against what it costs: for each set and recipe with a stage 1, its test accuracy
    minus the defaults' (mean over seeds, each seed a small dot) against stage 1's minutes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_stage1 = sorted({r for t in report["sets"].values() for r, x in t.items() if "stage1" in x})
    markers = dict(zip(with_stage1, itertools.cycle("osD^vPX*h")))
    entries = sum("stage1" in x for t in report["sets"].values() for x in t.values())
    figure, axes = plt.subplots(figsize=(9.0, max(4.4, 0.8 + 0.16 * entries)))  # tall enough for the legend
    for colour, (dataset, table) in enumerate(report["sets"].items()):
        if "tlnlp" not in table:
            continue
        baseline = dict(zip(table["tlnlp"].get("seeds", report.get("seeds", [])), table["tlnlp"]["per_seed"]))
        for recipe, result in table.items():
            if "stage1" not in result:
                continue
            seeds = result.get("seeds", report.get("seeds", []))
            gains = [100 * (a - baseline[s]) for s, a in zip(seeds, result["per_seed"]) if s in baseline]
            minutes = statistics.median(r["minutes"] for r in result["stage1"] if r)
            if not gains:
                continue
            axes.scatter([minutes] * len(gains), gains, s=10, color=f"C{colour}", alpha=0.5)
            axes.scatter([minutes], [statistics.mean(gains)], s=60, color=f"C{colour}", marker=markers[recipe],
                         label=f"{dataset}, {recipe}")
    axes.axhline(0, color="grey", linewidth=0.8)
    axes.set_xlim(left=0)
    axes.set_xlabel("stage-1 minutes (2-core CPU)")
    axes.set_ylabel("test accuracy minus the defaults' (points)")
    axes.set_title("Continued pretraining: gain against cost (large: mean over seeds)")
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside: inside, it hid points
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def three_places(score: float) -> str:
    """Scores on 2,000 or 1,500 test texts end in 5 at the fourth place; round those up, as a reader would
    (a float's 0.9085 is 0.90849999..., which `:.3f` rounds down)."""
    return str(Decimal(repr(round(score, 6))).quantize(Decimal("0.001"), rounding=ROUND_HALF_UP))


def markdown(report: dict) -> str:
    """The BENCHMARKS.md table: mean ± std per set, then each seed's score, and the wall time of a run."""
    sets = list(report["sets"])
    lines = ["| recipe | " + " | ".join(f"`{s}`" for s in sets) + " | wall time per run (mean over sets) |",
             "|---|" + "---:|" * (len(sets) + 1)]
    for recipe in ordered_recipes(report):
        results = [report["sets"][s].get(recipe, {}) for s in sets]
        ran = [r for r in results if "mean" in r]
        means = [f"{three_places(r['mean'])} ± {three_places(r['std'])}" if "mean" in r else "–" for r in results]
        seeds = [" / ".join(three_places(a) for a in r["per_seed"]) if "mean" in r else "–" for r in results]
        times = [f"{r['wall_time_s_per_seed']:,.0f}" for r in ran]
        wall = (f"{statistics.mean(r['wall_time_s_per_seed'] for r in ran):,.0f} s ({' / '.join(times)})"
                if ran else "–")
        lines += [f"| {recipe} | " + " | ".join(means) + f" | {wall} |", "| | " + " | ".join(seeds) + " | |"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
