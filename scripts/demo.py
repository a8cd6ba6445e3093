"""The embedded default: what transfer learning buys on 1,000 Wikipedia labels, with a stage 1 that pays.

1. Stage 1: the MiniLM encoder is pretrained further (MLM) on the task's own texts, the `wiki-topics`
   training articles, never the validation or test ones (`--continued_pretraining task`: a head-only
   warm-up for MiniLM's missing MLM head, layer-wise decay, kept unless a cross-validated probe on the
   training labels finds it worse).
2. Stage 2: fine-tune on 1,000 stratified `wiki-topics` labels from four starting points: MiniLM after
   stage 1, MiniLM as it is, MiniLM with its bottom 4 layers frozen, and MiniLM's architecture from scratch.
3. Baselines on the same 1,000 labels: TF-IDF + logistic regression, and logistic regression on
   frozen MiniLM sentence embeddings.
4. Every model is tested on the 2,000 held-out test articles; results.json, report.md and plots are
   written to --output_dir. Finished steps are skipped when the demo is run again.

`--stage1_only` runs the other stage 1 instead (`make stage1-budget`): MLM pretraining from scratch on
`wiki-leads` (a WordPiece tokenizer trained on it), fine-tuned beside its from-scratch twin.
"""

import argparse
import contextlib
import json
import logging
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

from datasets import load_dataset

from tlnlp.core.files import RESULTS_FILE
from tlnlp.data import builtin
from tlnlp.models.objectives import get_objective
from tlnlp.recipes.baselines import frozen_embedding_logistic_regression, tfidf_logistic_regression
from tlnlp.recipes.study import Arm, run_study, write_report

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
LABELS = 1000
SEED = 42
TAPT_ARM = "MiniLM after stage 1 (continued on the task's texts)"
EPOCHS, BATCH = 3, 16
FINETUNE = ["--max_seq_length", "64", "--num_train_epochs", str(EPOCHS), "--per_device_train_batch_size", str(BATCH),
            "--pooling", "mean", "--logging_steps", "20",
            # Each model is validated once, after its last step: the model the demo tests (the last is kept).
            # Validating after every epoch too costs 40 s in fp32, and moves the figures within seed noise
            # (each pass over the validation loader draws a seed from the RNG that dropout then uses).
            "--eval_steps", str(EPOCHS * math.ceil(LABELS / BATCH))]


class Clock:
    """Elapsed time per demo step and in total, logged as each step ends and kept for results.json."""

    def __init__(self) -> None:
        self.start = time.time()
        self.steps: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, name: str):
        began = time.time()
        yield
        self.steps[name] = round(time.time() - began, 1)
        logging.info("--- %s: %.0f s (demo so far: %.0f s) ---", name, self.steps[name], self.total)

    @property
    def total(self) -> float:
        return round(time.time() - self.start, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/demo")
    parser.add_argument("--stage1_config", default=str(CONFIGS / "demo_stage1.yaml"),
                        help="With --stage1_only: the from-scratch stage 1 settings (a pretraining YAML); "
                             "configs/stage1_budget.yaml is the longer run.")
    parser.add_argument("--stage1_only", action="store_true",
                        help="Stage 1 from scratch on wiki-leads, fine-tuned beside its from-scratch twin: no MiniLM "
                             "arms, no baselines (make stage1-budget).")
    parser.add_argument("--seeds", default=str(SEED), help="Comma-separated fine-tuning seeds.")
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(seed) for seed in args.seeds.split(",")]

    clock = Clock()
    stage1 = out / "stage1"
    minilm_lr = ["--learning_rate", "1e-4"]
    if args.stage1_only:
        if not (stage1 / RESULTS_FILE).exists():
            logging.info("=== Stage 1: pretraining from scratch on wiki-leads (%s) ===", args.stage1_config)
            command = [sys.executable, "-m", "tlnlp.pretrain", "--config", args.stage1_config,
                       "--output_dir", str(stage1), "--overwrite_output_dir"]
            with clock.step("stage 1"):
                if subprocess.run(command).returncode != 0:
                    return 1
        small_lr = ["--learning_rate", "1e-3"]
        arms = [
            Arm("scratch", str(stage1), name="stage1-size from scratch", finetune_args=small_lr),
            Arm("pretrained", str(stage1), name="stage1 encoder (wiki-leads MLM)", finetune_args=small_lr),
        ]
    else:
        arms = [
            # The probe gate: the default (fine-tuning both encoders) would add a fine-tuning, past the demo's
            # 15 minutes in fp32, and the MiniLM arm below shows the original's fine-tuning anyway.
            Arm("dapt", "minilm-l6", dapt_corpus="task", name=TAPT_ARM,
                finetune_args=[*minilm_lr, "--continued_pretraining_gate", "probe"]),
            Arm("scratch", "minilm-l6", name="MiniLM-size from scratch", finetune_args=minilm_lr),
            Arm("pretrained", "minilm-l6", name="MiniLM encoder", finetune_args=minilm_lr),
            Arm("frozen", "minilm-l6", freeze_layers=4, name="MiniLM, bottom 4 layers frozen",
                finetune_args=[*minilm_lr, "--cache_frozen_features"]),
        ]
    with clock.step("stage 1 and stage 2: every arm"):
        rows = run_study(arms=arms, dataset="wiki-topics", label_counts=[LABELS], seeds=seeds, output_dir=out,
                         finetune_args=FINETUNE)

    baselines_file = out / "baselines.json"
    if args.stage1_only:
        baselines = {}
    elif baselines_file.exists():
        baselines = json.loads(baselines_file.read_text())
    else:
        logging.info("=== Baselines on the same %d labels ===", LABELS)
        with clock.step("baselines"):
            baselines = run_baselines()
        baselines_file.write_text(json.dumps(baselines, indent=2))

    command = "python scripts/demo.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    results = write_report(out, rows, baselines, f"wiki-topics, {LABELS} labels: transfer vs from scratch", command)
    if args.stage1_only:
        stage1_results = json.loads((stage1 / RESULTS_FILE).read_text())
    else:  # the continued pretraining, recorded by the arm's first run
        run = json.loads((out / "runs" / TAPT_ARM / f"labels{LABELS}_seed{seeds[0]}" / RESULTS_FILE).read_text())
        results["continued_pretraining"] = run["continued_pretraining"]
        stage1_results = json.loads((Path(run["continued_pretraining"]["adapted_encoder"]) / RESULTS_FILE).read_text())
    results["stage1"] = stage1_results
    # Steps skipped because an earlier run finished them are not in this run's times.
    results["elapsed_s"] = {**clock.steps, "total": clock.total}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n" + (out / "report.md").read_text().split("\n![")[0])
    objective = get_objective(stage1_results.get("objective", "mlm"))
    quality = objective.quality(stage1_results)
    print(f"Stage 1 ({objective.name}): {stage1_results['train_tokens']:,} tokens in "
          f"{stage1_results['train_runtime_s']:.0f} s, {quality}")
    if "continued_pretraining" in results:
        gate = results["continued_pretraining"]
        if gate.get("gate") == "finetune":
            decided_on = f"{gate['gate_examples']} validation examples, both fine-tuned"
            scores = gate["validation_original"], gate["validation_adapted"]
        else:
            decided_on = f"{gate['gate_labels']} training labels, {gate['gate_folds']}-fold probe"
            scores = gate["probe_accuracy_original"], gate["probe_accuracy_adapted"]
        print(f"Stage 1 gate ({decided_on}): original {scores[0]:.3f}, adapted {scores[1]:.3f}: kept the "
              f"{gate['kept']} encoder")
    # `--mixed_precision auto` picks bf16 on CPUs with AVX512-BF16/AMX: the figures depend on that choice.
    print(f"Training precision (--mixed_precision auto on this machine): {stage1_results.get('mixed_precision')}")
    print("Elapsed: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in clock.steps.items())
          + f"; total {clock.total:.0f} s ({clock.total / 60:.1f} min)")
    print(f"Results, report and plots: {out}/results.json, report.md, accuracy.png")
    return 0


def run_baselines() -> dict[str, dict]:
    """TF-IDF and frozen-MiniLM-embedding logistic regressions on the demo's labels."""
    splits = load_dataset("json", data_files=builtin.dataset_files("wiki-topics"))
    chosen = builtin.stratified_indices(splits["train"]["label"], LABELS, SEED)
    train = splits["train"].select(chosen.tolist())
    data = (train["text"], train["label"], splits["test"]["text"], splits["test"]["label"])
    return {
        "TF-IDF + logistic regression": {**tfidf_logistic_regression(*data), "labels": LABELS},
        "frozen MiniLM embeddings + logistic regression": {
            **frozen_embedding_logistic_regression(builtin.model_dir("minilm-l6"), *data), "labels": LABELS},
    }


if __name__ == "__main__":
    sys.exit(main())
