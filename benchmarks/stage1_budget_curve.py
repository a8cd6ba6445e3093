"""Stage 1 budget curve: wiki-topics accuracy against stage-1 wall time, MLM vs ELECTRA vs no stage 1.

For each objective, a short calibration run measures seconds per optimizer step on this machine; each
budget (minutes) then becomes a step count, so every run has a complete learning-rate schedule. Stage 1
is the demo's (configs/demo_stage1.yaml: ModernBERT 2x128 from scratch on wiki-leads) with only the step
count (and warm-up, at most 1/8 of it) changed, and runs once per budget; fine-tuning is the demo's, on
1,000 wiki-topics labels, over several seeds, for each stage-1 encoder and for the same network from
scratch (the twin, the flat line).

    python benchmarks/stage1_budget_curve.py --output_dir runs/budget-curve --minutes 2.5,5,10 --seeds 42,43,44

Writes results.json, report.md and budget_curve.png in --output_dir; finished runs are skipped on a re-run
(so a second invocation only redraws). The plot puts each point at its measured stage-1 training time.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from demo import CONFIGS, FINETUNE, LABELS  # noqa: E402  (the demo's stage 1 and fine-tuning recipe)

from tlnlp.recipes.study import Arm, _run, run_study, summarize  # noqa: E402

CALIBRATION_STEPS = 60


def pretrain(objective: str, steps: int, folder: Path, extra: list[str]) -> dict:
    if not (folder / "all_results.json").exists():
        _run("tlnlp.pretrain", ["--config", str(CONFIGS / "demo_stage1.yaml"), "--objective", objective,
                                "--max_train_steps", str(steps), "--num_warmup_steps", str(min(200, steps // 8)),
                                "--eval_steps", str(steps), "--output_dir", str(folder), "--overwrite_output_dir",
                                *extra], f"stage 1: {objective}, {steps} steps")
    return json.loads((folder / "all_results.json").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/budget-curve")
    parser.add_argument("--minutes", default="2.5,5,10", help="Stage-1 budgets in minutes of wall time.")
    parser.add_argument("--objectives", default="mlm,electra")
    parser.add_argument("--seeds", default="42,43,44", help="Fine-tuning seeds.")
    parser.add_argument("--pretrain_args", default="", help="Extra stage-1 options, e.g. '--mlm_probability 0.4'.")
    parser.add_argument("--redraw", action="store_true", help="Only redraw the plot and table from results.json.")
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    out = Path(args.output_dir)
    if args.redraw:
        write_plot_and_table(out, json.loads((out / "results.json").read_text()))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    budgets = [float(m) for m in args.minutes.split(",")]
    extra = shlex.split(args.pretrain_args)
    started = time.time()

    points = []
    for objective in args.objectives.split(","):
        calibration = pretrain(objective, CALIBRATION_STEPS, out / "calibration" / objective, extra)
        seconds_per_step = calibration["train_runtime_s"] / calibration["optimizer_steps"]
        for minutes in budgets:
            steps = max(CALIBRATION_STEPS, round(minutes * 60 / seconds_per_step))
            folder = out / "stage1" / f"{objective}-{minutes:g}min"
            stage1 = pretrain(objective, steps, folder, extra)
            arm = Arm("pretrained", str(folder), name=f"{objective}-{minutes:g}min",
                      finetune_args=["--learning_rate", "1e-3"])
            rows = run_study(arms=[arm], dataset="wiki-topics", label_counts=[LABELS], seeds=seeds, output_dir=out,
                             finetune_args=FINETUNE)
            (summary,) = summarize(rows)
            points.append({"objective": objective, "minutes": minutes, "steps": steps,
                           "stage1_runtime_s": stage1["train_runtime_s"], "stage1_tokens": stage1["train_tokens"],
                           "stage1_tokens_per_s": stage1["train_tokens_per_s"],
                           "test_accuracy": summary["test_accuracy"], "test_accuracy_std": summary["test_accuracy_std"],
                           "per_seed": [r["test_accuracy"] for r in rows]})
    # The twin: the same network and tokenizer with random weights (any stage-1 folder gives the architecture).
    twin_arm = Arm("scratch", str(out / "stage1" / f"{points[0]['objective']}-{budgets[0]:g}min"), name="twin",
                   finetune_args=["--learning_rate", "1e-3"])
    twin_rows = run_study(arms=[twin_arm], dataset="wiki-topics", label_counts=[LABELS], seeds=seeds,
                          output_dir=out, finetune_args=FINETUNE)
    twin = [r["test_accuracy"] for r in twin_rows]
    command = "python benchmarks/stage1_budget_curve.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    results = {"command": command, "seeds": seeds, "labels": LABELS, "points": points,
               "twin": {"test_accuracy": statistics.mean(twin), "test_accuracy_std": statistics.stdev(twin)
                        if len(twin) > 1 else 0.0, "per_seed": twin},
               "wall_time_s_this_invocation": time.time() - started}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_plot_and_table(out, results)
    print((out / "report.md").read_text())
    return 0


def write_plot_and_table(out: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for objective in dict.fromkeys(p["objective"] for p in results["points"]):
        points = [p for p in results["points"] if p["objective"] == objective]
        ax.errorbar([p["stage1_runtime_s"] / 60 for p in points], [p["test_accuracy"] for p in points],
                    yerr=[p["test_accuracy_std"] for p in points], marker="o", capsize=3, label=objective.upper())
    twin = results["twin"]
    ax.axhline(twin["test_accuracy"], linestyle="--", color="gray", label="from-scratch twin (no stage 1)")
    ax.axhspan(twin["test_accuracy"] - twin["test_accuracy_std"], twin["test_accuracy"] + twin["test_accuracy_std"],
               color="gray", alpha=0.15)
    ax.set_xlabel("measured stage-1 training time (minutes, 2 CPU cores)")
    ax.set_ylabel(f"wiki-topics test accuracy ({results['labels']} labels)")
    ax.set_title(f"Stage 1 budget: mean ± std over {len(results['seeds'])} fine-tuning seeds")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "budget_curve.png", dpi=120)
    plt.close(fig)
    lines = [f"Command: `{results['command']}`", "",
             "| stage 1 | budget | steps | measured stage-1 time | tokens/s | test accuracy (mean ± std) | per seed |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for p in results["points"]:
        lines.append(f"| {p['objective'].upper()} | {p['minutes']:g} min | {p['steps']:,} | {p['stage1_runtime_s']:.0f} s | "
                     f"{p['stage1_tokens_per_s']:,.0f} | {p['test_accuracy']:.3f} ± {p['test_accuracy_std']:.3f} | "
                     f"{' / '.join(f'{a:.3f}' for a in p['per_seed'])} |")
    lines.append(f"| none (from-scratch twin) | 0 | 0 | – | – | {twin['test_accuracy']:.3f} ± "
                 f"{twin['test_accuracy_std']:.3f} | {' / '.join(f'{a:.3f}' for a in twin['per_seed'])} |")
    (out / "report.md").write_text("\n".join(lines) + "\n\n![budget curve](budget_curve.png)\n")


if __name__ == "__main__":
    sys.exit(main())
