"""Transfer-learning studies: several starting points ("arms") x label counts x seeds, with a report.

Every fine-tuning is a call of the stage-2 phases in this process, on its one Accelerator, into its own
output folder; a `dapt:CORPUS` arm fine-tunes with `--continued_pretraining CORPUS` (`task`: the labeled
set's own training texts), so its encoder is pretrained further once, cached, and gated as the command does
it. A run whose `all_results.json` exists is skipped, so a study can be stopped and re-run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlnlp.core.config import FinetuneConfig, parse_config
from tlnlp.core.errors import UserInputError
from tlnlp.core.files import RESULTS_FILE
from tlnlp.core.outputs import write_run_files
from tlnlp.core.run import check_output_dir, finish, start_run
from tlnlp.recipes.continued_pretraining import adapt, finetune_kept

logger = logging.getLogger(__name__)


@dataclass
class Arm:
    """One starting point for fine-tuning."""

    kind: str  # scratch | pretrained | frozen | dapt
    model: str  # encoder (or, for scratch, the architecture and tokenizer) to start from
    freeze_layers: int = 0
    dapt_corpus: str | None = None  # continued MLM pretraining on this corpus first ('task': the set's texts)
    name: str = ""
    finetune_args: list[str] = field(default_factory=list)  # extra options for this arm alone

    def __post_init__(self) -> None:
        if not self.name:
            model = Path(self.model).name if os.sep in self.model else self.model
            detail = {"frozen": f"-{self.freeze_layers}", "dapt": f"-{self.dapt_corpus}"}.get(self.kind, "")
            self.name = re.sub(r"[^A-Za-z0-9_.@-]+", "_", f"{self.kind}{detail}@{model}")


def parse_arm(spec: str, default_model: str | None) -> Arm:
    """`scratch`, `pretrained`, `frozen:K`, `dapt:CORPUS`, each optionally `@MODEL`."""
    body, _, model = spec.partition("@")
    model = model or default_model
    if not model:
        raise UserInputError(f"Arm {spec!r} names no model: add @MODEL or pass --model.")
    kind, _, value = body.partition(":")
    if kind in ("scratch", "pretrained") and not value:
        return Arm(kind, model)
    if kind == "frozen" and value.isdigit():
        return Arm(kind, model, freeze_layers=int(value))
    if kind == "dapt" and value:
        return Arm(kind, model, dapt_corpus=value)
    raise UserInputError(
        f"Unknown arm {spec!r}. Use scratch, pretrained, frozen:K (K bottom layers frozen) or dapt:CORPUS "
        "(continued pretraining on CORPUS first; 'task': the set's own training texts), each optionally followed by "
        "@MODEL."
    )


def run_study(*, arms: list[Arm], dataset: str, label_counts: list[int], seeds: list[int], output_dir: Path,
              finetune_args: list[str]) -> list[dict]:
    rows = []
    total = len(arms) * len(label_counts) * len(seeds)
    index = 0
    accelerator = None
    try:
        for arm in arms:
            for n in label_counts:
                for seed in seeds:
                    index += 1
                    folder = output_dir / "runs" / arm.name / f"labels{n}_seed{seed}"
                    if (folder / RESULTS_FILE).exists():
                        logger.info("[%d/%d] %s, %d labels, seed %d: done earlier, skipped", index, total, arm.name, n,
                                    seed)
                    else:
                        logger.info("=== [%d/%d] %s, %d labels, seed %d ===", index, total, arm.name, n, seed)
                        cfg = parse_config(FinetuneConfig, run_args(arm, dataset, n, seed, folder, finetune_args))
                        accelerator = accelerator or start_run(cfg, check_output=False)[0]
                        finetune_into(cfg, accelerator, folder)
                    results = json.loads((folder / RESULTS_FILE).read_text())
                    rows.append({"arm": arm.name, "kind": arm.kind, "freeze_layers": arm.freeze_layers, "labels": n,
                                 "seed": seed, **{k: results.get(k) for k in (
                                     "test_accuracy", "test_macro_f1", "eval_accuracy", "train_runtime_s",
                                     "trainable_parameters", "total_parameters")}})
    finally:
        if accelerator is not None:
            finish(accelerator)
    return rows


def run_args(arm: Arm, dataset: str, labels: int, seed: int, folder: Path, finetune_args: list[str]):
    """The options of one run, as `python -m tlnlp.finetune` would take them."""
    args = ["--model_name_or_path", arm.model, "--dataset_name", dataset, "--max_train_samples", str(labels),
            "--seed", str(seed), "--output_dir", str(folder), "--overwrite_output_dir", *finetune_args,
            *arm.finetune_args]
    if arm.kind == "scratch":
        args.append("--from_scratch")
    if arm.kind == "frozen":
        args += ["--freeze_embeddings", "--freeze_layers", str(arm.freeze_layers)]
    if arm.kind == "dapt":
        args += ["--continued_pretraining", arm.dapt_corpus]
    return args


def finetune_into(cfg: FinetuneConfig, accelerator, folder: Path) -> None:
    """One run of the study: the phases on the study's Accelerator, with the run's results, configuration and
    model card written in `folder`."""
    if cfg.search_trials or cfg.self_training_rounds:
        raise UserInputError("A study's runs are plain fine-tunings: drop --search_trials and the self-training "
                             "options from its fine-tuning options.")
    check_output_dir(cfg)
    adaptation, kept_run = None, None
    if cfg.continued_pretraining:  # cached by its inputs: the arm's first run trains it, the others reuse it
        cfg, adaptation, kept_run = adapt(cfg, check_output=False)
    results = finetune_kept(cfg, accelerator, kept_run)
    if adaptation:
        results["continued_pretraining"] = adaptation
    write_run_files(accelerator, cfg, results, "finetune")
    accelerator.free_memory()


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and spread over seeds, per arm and label count."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["arm"], row["labels"]), []).append(row)
    summary = []
    for (arm, labels), runs in groups.items():
        accuracies = [r["test_accuracy"] for r in runs]
        summary.append({
            "arm": arm, "labels": labels, "seeds": len(runs), "kind": runs[0]["kind"],
            "freeze_layers": runs[0]["freeze_layers"],
            "test_accuracy": statistics.mean(accuracies),
            "test_accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "test_macro_f1": statistics.mean(r["test_macro_f1"] for r in runs),
            "train_runtime_s": statistics.mean(r["train_runtime_s"] for r in runs),
            "trainable_parameters": runs[0]["trainable_parameters"],
        })
    return summary


def write_report(output_dir: Path, rows: list[dict], baselines: dict[str, dict] | None, title: str,
                 command: str) -> dict[str, Any]:
    """results.json, report.md and PNG plots in `output_dir`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(rows)
    plots = []
    label_counts = sorted({s["labels"] for s in summary})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if len(label_counts) > 1:
        for arm in dict.fromkeys(s["arm"] for s in summary):
            points = sorted((s for s in summary if s["arm"] == arm), key=lambda s: s["labels"])
            ax.errorbar([p["labels"] for p in points], [p["test_accuracy"] for p in points],
                        yerr=[p["test_accuracy_std"] for p in points], marker="o", capsize=3, label=arm)
        ax.set_xscale("log")
        ax.set_xlabel("labeled training examples")
    else:
        names = [s["arm"] for s in summary]
        ax.barh(names, [s["test_accuracy"] for s in summary], xerr=[s["test_accuracy_std"] for s in summary],
                color="tab:blue")
        for y, s in enumerate(summary):
            ax.text(s["test_accuracy"] + 0.005, y, f"{s['test_accuracy']:.3f}", va="center")
        ax.set_xlabel(f"test accuracy ({label_counts[0]} labels)")
        ax.set_xlim(0, 1.08)
        ax.invert_yaxis()  # first arm on top
    for i, (name, result) in enumerate((baselines or {}).items()):
        if len(label_counts) > 1:
            ax.axhline(result["test_accuracy"], linestyle="--", color=f"C{i + 5}", label=f"{name} ({result['labels']})")
        else:
            ax.axvline(result["test_accuracy"], linestyle="--", color=f"C{i + 1}", label=name)
    if len(label_counts) > 1:
        ax.set_ylabel("test accuracy")
    ax.set_title(title)
    if len(label_counts) > 1:
        ax.legend(fontsize=8, loc="lower right")
    elif baselines:
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(output_dir / "accuracy.png", dpi=120)
    plt.close(fig)
    plots.append("accuracy.png")

    frozen = sorted((s for s in summary if s["kind"] in ("pretrained", "frozen")), key=lambda s: s["freeze_layers"])
    if len({s["freeze_layers"] for s in frozen}) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        for n in label_counts:
            points = [s for s in frozen if s["labels"] == n]
            ax.plot([p["freeze_layers"] for p in points], [p["test_accuracy"] for p in points], "o-", label=f"{n} labels")
        ax.set_xlabel("frozen bottom layers")
        ax.set_ylabel("test accuracy")
        twin = ax.twinx()
        twin.plot([p["freeze_layers"] for p in frozen if p["labels"] == label_counts[-1]],
                  [p["train_runtime_s"] for p in frozen if p["labels"] == label_counts[-1]], "s--", color="gray")
        twin.set_ylabel("training time (s)", color="gray")
        ax.legend(fontsize=8)
        ax.set_title("Freezing lower layers")
        fig.tight_layout()
        fig.savefig(output_dir / "frozen_layers.png", dpi=120)
        plt.close(fig)
        plots.append("frozen_layers.png")

    lines = [f"# {title}", "", f"Command: `{command}`", "",
             "| arm | labels | seeds | test accuracy | test macro-F1 | training time (s) | trainable parameters |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        spread = f" ± {s['test_accuracy_std']:.3f}" if s["seeds"] > 1 else ""
        lines.append(f"| {s['arm']} | {s['labels']} | {s['seeds']} | {s['test_accuracy']:.3f}{spread} | "
                     f"{s['test_macro_f1']:.3f} | {s['train_runtime_s']:.0f} | {s['trainable_parameters']:,} |")
    for name, result in (baselines or {}).items():
        lines.append(f"| {name} (baseline) | {result['labels']} | 1 | {result['test_accuracy']:.3f} | "
                     f"{result['test_macro_f1']:.3f} | {result['train_runtime_s']:.0f} | - |")
    lines += ["", *[f"![{p}]({p})" for p in plots], "", "## Every run", "",
              "| arm | labels | seed | test accuracy | validation accuracy | time (s) |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['arm']} | {r['labels']} | {r['seed']} | {r['test_accuracy']:.3f} | {r['eval_accuracy']:.3f} | "
              f"{r['train_runtime_s']:.0f} |" for r in rows]
    (output_dir / "report.md").write_text("\n".join(lines) + "\n")
    results = {"title": title, "command": command, "summary": summary, "runs": rows, "baselines": baselines or {},
               "plots": plots}
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results
