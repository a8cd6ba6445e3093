"""Should a default change? A candidate setting against the current defaults on every built-in labeled set.

Each set is run the way a user with N labels runs it: the N stratified labels are the training file and
nothing else (no validation file, so tlnlp holds out its own share of those labels), and the set's full
test split scores the result. For each set and seed, in one process after another:

default     `python -m tlnlp.finetune` with its defaults (only --max_seq_length set, as for every recipe, and
            --default_options where given);
candidate   the same with the candidate's options (--candidate "--restore_best_model false");
stock       the `run_glue_no_trainer.py` recipe on the same N labels (benchmarks/bench_finetune.py), for
            reference (--no_stock leaves it out).

The report gives, per set, the mean of candidate - default over the seeds, the spread of those paired
differences, and the seed spread of the default (the standard deviation of its scores); then the mean
difference over the sets and the worst set. The rule for adopting the candidate as the default:

  1. the mean difference over the sets is positive,
  2. no set loses more than its seed spread (mean difference >= -seed spread), and
  3. both still hold with any one set left out (leave-one-set-out).

    python benchmarks/bench_defaults.py --candidate "--restore_best_model false" --name keep-last \
        --output benchmarks/results/defaults_keep_last.json

Writes the JSON (rewritten after every run, so a stop loses little) and prints a Markdown table for
BENCHMARKS.md. Hours on 2 CPU cores for six sets and three seeds: never part of the tests.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))


def labeled_sets() -> list[str]:
    from tlnlp.data import builtin

    return [name for name, dataset in builtin.DATASETS.items() if dataset.labeled]


def user_files(dataset: str, labels: int, seed: int, folder: Path) -> dict[str, str]:
    """What a user with `labels` labels has: those labels (stratified, seeded, as --max_train_samples takes
    them) as train.jsonl, and the set's test split. `dataset` is a built-in name or a folder holding
    train.jsonl and test.jsonl."""
    from tlnlp.data import builtin

    source = Path(dataset)
    files = ({"train": str(source / "train.jsonl"), "test": str(source / "test.jsonl")} if source.is_dir()
             else builtin.dataset_files(dataset))

    def read(path: str) -> list[dict]:
        return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]

    rows = read(files["train"])
    if labels > len(rows):
        raise SystemExit(f"{dataset}: --labels {labels} is more than its {len(rows)} training rows.")
    chosen = builtin.stratified_indices([r["label"] for r in rows], labels, seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    # Text and label only: a built-in split's other columns (title, document) are not a user's.
    for split, split_rows in (("train", [rows[i] for i in chosen.tolist()]), ("test", read(files["test"]))):
        written[split] = str(folder / f"{split}.jsonl")
        with open(written[split], "w", encoding="utf-8") as f:
            for row in split_rows:
                f.write(json.dumps({"text": row["text"], "label": row["label"]}) + "\n")
    return written


def tlnlp_run(files: dict[str, str], model: str, seed: int, length: int, options: list[str]) -> dict:
    """One `python -m tlnlp.finetune` process; its test scores and wall time."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "tlnlp.finetune", "--model_name_or_path", model, "--train_file",
                   files["train"], "--test_file", files["test"], "--seed", str(seed), "--max_seq_length",
                   str(length), "--output_dir", out, *options]
        started = time.time()
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{shlex.join(command)} failed:\n{done.stderr[-3000:]}")
        results = json.loads((Path(out) / "all_results.json").read_text())
    return {"accuracy": results["test_accuracy"], "macro_f1": results.get("test_macro_f1"),
            "wall_time_s": time.time() - started, "best_step": results.get("best_step"),
            "optimizer_steps": results.get("optimizer_steps")}


def stock_run(files: dict[str, str], model: str, seed: int, length: int, folder: Path) -> dict:
    import bench_finetune

    # The stock recipe evaluates after each epoch but keeps the last model: a few rows serve that pass.
    validation = folder / "stock_validation.jsonl"
    validation.write_text("".join(Path(files["train"]).read_text(encoding="utf-8").splitlines(True)[:16]))
    args = argparse.Namespace(train_file=files["train"], validation_file=str(validation), test_file=files["test"],
                              labels=None, seed=seed, model=model, max_seq_length=length, batch_size=16,
                              eval_batch_size=64, learning_rate=1e-4, epochs=3, frozen_epochs=3, freeze_layers=0)
    started = time.time()
    result = bench_finetune.stock(args, frozen=False, precision="no")
    return {"accuracy": result["test_accuracy"], "wall_time_s": time.time() - started}


def stock_from(path: Path, labels: int) -> dict[tuple[str, int], float]:
    """(set, seed) -> the stock recipe's test accuracy in a bench_accuracy.py report made with `labels` labels."""
    report = json.loads(path.read_text())
    if report.get("labels", labels) != labels:
        raise SystemExit(f"--stock_scores {path} was made with {report['labels']} labels, not {labels}.")
    scores = {}
    for name, table in report["sets"].items():
        stock = table.get("stock", {})
        for seed, accuracy in zip(stock.get("seeds", report.get("seeds", [])), stock.get("per_seed", [])):
            scores[(name, seed)] = accuracy
    return scores


def defaults_from(path: Path, report: dict) -> dict[tuple[str, int], dict]:
    """(set, seed) -> a run of an earlier bench_defaults.py report whose candidate is today's defaults."""
    earlier = json.loads(path.read_text())
    same = ("labels", "encoder", "max_seq_length", "base")
    if any(earlier.get(k, "") != report[k] for k in same):
        found = {k: earlier.get(k, "") for k in same}
        raise SystemExit(f"--default_scores {path} was made with {found}, this benchmark with "
                         f"{ {k: report[k] for k in same} }: its runs are not this benchmark's defaults.")
    return {(r["set"], r["seed"]): {**r, "arm": "default", "from": f"{path} ({earlier['candidate']})"}
            for r in earlier["runs"] if r["arm"] == "candidate"}


def scores_by_set(runs: list[dict], seeds: list[int]) -> dict[str, dict[str, list[float]]]:
    """Each set's scores per arm, in seed order, for the seeds where both default and candidate ran."""
    by = {(r["set"], r["seed"], r["arm"]): r["accuracy"] for r in runs}
    sets: dict[str, dict[str, list[float]]] = {}
    for name in dict.fromkeys(r["set"] for r in runs):
        paired = [s for s in seeds if (name, s, "default") in by and (name, s, "candidate") in by]
        sets[name] = {arm: [by[(name, s, arm)] for s in paired if (name, s, arm) in by]
                      for arm in ("default", "candidate", "stock")}
        sets[name]["seeds"] = paired
    return sets


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def verdict(sets: dict[str, dict]) -> dict:
    """Per-set and overall differences, and whether the candidate may become the default (see the module
    docstring). `sets` maps a set to {"default": [scores by seed], "candidate": [...]}."""
    per_set = {}
    for name, runs in sets.items():
        differences = [c - d for c, d in zip(runs["candidate"], runs["default"])]
        per_set[name] = {"difference": statistics.mean(differences), "difference_spread": spread(differences),
                         "seed_spread": spread(runs["default"]), "differences": differences}
        per_set[name]["within_spread"] = per_set[name]["difference"] >= -per_set[name]["seed_spread"]

    def holds(names: list[str]) -> bool:
        return bool(names) and statistics.mean(per_set[n]["difference"] for n in names) > 0 and all(
            per_set[n]["within_spread"] for n in names)

    names = list(per_set)
    worst = min(names, key=lambda n: per_set[n]["difference"]) if names else None
    left_out = {n: holds([m for m in names if m != n]) for n in names} if len(names) > 1 else {}
    return {"per_set": per_set,
            "mean_difference": statistics.mean(per_set[n]["difference"] for n in names) if names else None,
            "worst_set": worst, "worst_difference": per_set[worst]["difference"] if worst else None,
            "holds_without": left_out,
            "adoptable": holds(names) and all(left_out.values())}


def markdown(report: dict) -> str:
    decision = report["verdict"]
    base = f" (both with `{report['base']}`)" if report.get("base") else ""
    lines = [f"Candidate `{report['candidate']}` against the defaults{base}, {report['labels']:,} labels, seeds "
             f"{', '.join(map(str, report['seeds']))} (test accuracy, mean over the seeds both arms ran):", "",
             "| set | stock | default | candidate | candidate - default (spread) | default's seed spread | "
             "within spread | holds without this set |", "|---|---:|---:|---:|---:|---:|:---:|:---:|"]
    for name, runs in report["sets"].items():
        if name not in decision["per_set"]:
            continue
        row = decision["per_set"][name]
        stock = f"{statistics.mean(runs['stock']):.3f}" if runs.get("stock") else "–"
        lines.append(
            f"| `{name}` | {stock} | {statistics.mean(runs['default']):.3f} | {statistics.mean(runs['candidate']):.3f} "
            f"| {row['difference']:+.3f} ({row['difference_spread']:.3f}) | {row['seed_spread']:.3f} | "
            f"{'yes' if row['within_spread'] else 'no'} | "
            f"{'yes' if decision['holds_without'].get(name, True) else 'no'} |")
    planned = report.get("planned_sets") or list(report["sets"])
    pairs = sum(len(report["sets"].get(name, {}).get("seeds", [])) for name in planned)
    short = pairs < len(planned) * len(report["seeds"])
    lines += ["", f"Mean difference {decision['mean_difference']:+.4f}; worst set `{decision['worst_set']}` "
              f"({decision['worst_difference']:+.3f}). Adoptable: **{'yes' if decision['adoptable'] else 'no'}**"
              + (f" on what has run so far ({pairs} of {len(planned) * len(report['seeds'])} set-seed pairs): "
                 "not a decision until every pair has run." if short else ".")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidate", required=True, help="The candidate's options, as on the command line.")
    parser.add_argument("--base", default="", help="Options both tlnlp arms share, e.g. a user's frozen-bottom setting "
                        "('--freeze_layers 4 --head_hidden_sizes 64'); the candidate's come after them.")
    parser.add_argument("--default_options", default="", help="Options the defaults' arm alone gets, to pin what "
                        "the defaults leave to the machine: '--mixed_precision no' holds that arm at fp32 on a CPU "
                        "where auto picks bf16, so it matches a --default_scores report made where auto gave fp32.")
    parser.add_argument("--name", default="candidate", help="A short name for the candidate, for the report.")
    parser.add_argument("--sets", default="all", help="Comma-separated built-in labeled sets (or folders holding "
                        "train.jsonl and test.jsonl); 'all': every built-in labeled set.")
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument("--labels", type=int, default=1000)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--model", default="minilm-l6", help="Encoder for every run (a built-in name or a folder).")
    parser.add_argument("--no_stock", action="store_true", help="Leave out the stock recipe.")
    parser.add_argument("--stock_scores", metavar="JSON", help="Take the stock recipe's scores from this "
                        "bench_accuracy.py report where it has them for a set and seed (the same labels: both take "
                        "them with stratified_indices(labels, seed)), instead of running it again.")
    parser.add_argument("--default_scores", metavar="JSON", help="Take the defaults' scores from the candidate "
                        "arm of this earlier bench_defaults.py report, whose candidate has since become the default, "
                        "instead of running them again. The first set and seed still runs, and the benchmark stops "
                        "if its score differs: then the defaults have changed since that report.")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "defaults.json"))
    parser.add_argument("--table_only", action="store_true", help="Run nothing: print the table of --output as it "
                        "stands (a stopped or partial benchmark) and write it beside it as .md.")
    args = parser.parse_args(argv)
    if args.table_only:
        report = json.loads(Path(args.output).read_text())
        table = markdown(report)
        Path(args.output).with_suffix(".md").write_text(f"`{report['command']}`\n\n{table}\n")
        print(table)
        return report
    seeds = [int(s) for s in args.seeds.split(",")]
    sets = labeled_sets() if args.sets == "all" else args.sets.split(",")
    command = "python benchmarks/bench_defaults.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    output = Path(args.output)
    report: dict = {"command": command, "candidate": args.candidate, "base": args.base,
                    "default_options": args.default_options, "name": args.name,
                    "labels": args.labels, "seeds": seeds, "encoder": args.model,
                    "max_seq_length": args.max_seq_length, "planned_sets": [Path(d).name for d in sets],
                    "sets": {}, "runs": []}
    done: dict[tuple[str, int, str], dict] = {}
    if output.exists():  # a stopped benchmark continues: the runs it finished are kept, not redone
        earlier = json.loads(output.read_text())
        same = {k: earlier.get(k, "") for k in ("candidate", "base", "default_options", "labels", "encoder",
                                                 "max_seq_length")}
        if same != {k: report[k] for k in same}:
            raise SystemExit(f"{output} holds another benchmark ({same}); give another --output.")
        done = {(r["set"], r["seed"], r["arm"]): r for r in earlier["runs"]}
        print(f"Continuing {output}: {len(done)} runs done.", flush=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    candidate, base, default = shlex.split(args.candidate), shlex.split(args.base), shlex.split(args.default_options)
    earlier_stock = stock_from(Path(args.stock_scores), args.labels) if args.stock_scores else {}
    if earlier_stock:
        report["stock_scores_from"] = args.stock_scores
    earlier_defaults = defaults_from(Path(args.default_scores), report) if args.default_scores else {}
    if earlier_defaults:
        report["default_scores_from"] = args.default_scores
    # The first default run made here is compared with the reused score before any other is taken.
    checked = not earlier_defaults or any(r.get("matches") for r in done.values())
    arms = ("default", "candidate") + (() if args.no_stock else ("stock",))
    with tempfile.TemporaryDirectory() as scratch:
        # Seed by seed over every set: a stopped run has a first verdict over all the sets soonest.
        for seed in seeds:
            for dataset in sets:
                name = Path(dataset).name
                folder = Path(scratch) / name / str(seed)
                files = None
                for arm in arms:
                    if (name, seed, arm) in done:
                        result = done[(name, seed, arm)]
                    elif arm == "default" and checked and (name, seed) in earlier_defaults:
                        result = earlier_defaults[(name, seed)]
                    elif arm == "stock" and (name, seed) in earlier_stock:
                        result = {"set": name, "seed": seed, "arm": arm, "accuracy": earlier_stock[(name, seed)],
                                  "from": args.stock_scores}
                    else:
                        files = files or user_files(dataset, args.labels, seed, folder)
                        run = (stock_run(files, args.model, seed, args.max_seq_length, folder) if arm == "stock" else
                               tlnlp_run(files, args.model, seed, args.max_seq_length,
                                         base + (candidate if arm == "candidate" else default)))
                        result = {"set": name, "seed": seed, "arm": arm, **run}
                        if arm == "default" and not checked and (name, seed) in earlier_defaults:
                            reused = earlier_defaults[(name, seed)]["accuracy"]
                            if abs(reused - result["accuracy"]) > 5e-4:
                                raise SystemExit(
                                    f"The defaults scored {result['accuracy']:.4f} on {name}, seed {seed}, where "
                                    f"{args.default_scores} has {reused:.4f}: the defaults have changed since that "
                                    "report (or this CPU computes other floats). Run without --default_scores.")
                            result["matches"] = args.default_scores
                            checked = True
                        took = f"{result['wall_time_s']:.0f} s" if "wall_time_s" in result else f"from {result['from']}"
                        print(f"{name:17} seed {seed} {arm:9}: {result['accuracy']:.4f} ({took})", flush=True)
                    report["runs"].append(result)
                    report["sets"] = scores_by_set(report["runs"], seeds)
                    report["verdict"] = verdict({n: s for n, s in report["sets"].items()
                                                 if len(s["candidate"]) == len(s["default"]) > 0})
                    output.write_text(json.dumps(report, indent=2))
    table = markdown(report)
    report["table"] = table
    output.write_text(json.dumps(report, indent=2))
    output.with_suffix(".md").write_text(f"`{command}`\n\n{table}\n")
    print(table)
    return report


if __name__ == "__main__":
    main()
