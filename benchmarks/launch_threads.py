"""The mission's command against plain `python`: `accelerate launch scripts/finetune_cls.py` on a CPU machine
versus `python scripts/finetune_cls.py`, the same run, side by side.

Without --cpu and without a GPU, `accelerate launch` gives each process OMP_NUM_THREADS=1; tlnlp sets the
threads back to cores / processes on the machine unless the user chose a number. Each run is a fresh process
and the two commands alternate; the median examples/s of each and their ratio are printed and written as
JSON. Accuracy must be identical: the same computation, only the thread count differs.

    python benchmarks/launch_threads.py --output benchmarks/results/launch_threads_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no"]
# (prefix, extra environment). The last is the launcher's one-thread default that tlnlp used to keep.
COMMANDS = {
    "python": ([sys.executable], {}),
    "accelerate launch": (LAUNCH, {}),
    "accelerate launch, 1 thread (before)": (LAUNCH, {"TLNLP_NUM_THREADS": "1"}),
}


def run(command: str, finetune_args: list[str], output_dir: Path) -> dict:
    script = str(REPO / "scripts" / "finetune_cls.py")
    prefix, extra = COMMANDS[command]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "ACCELERATE_USE_CPU")} | extra
    done = subprocess.run([*prefix, script, *finetune_args, "--output_dir", str(output_dir)],
                          capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{command} failed:\n{done.stderr[-3000:]}")
    results = json.loads((output_dir / "all_results.json").read_text())
    return {"examples_per_s": results["train_examples_per_s"], "test_accuracy": results.get("test_accuracy")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repetitions", type=int, default=2)
    parser.add_argument("--labels", type=int, default=500)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    finetune_args = ["--model_name_or_path", "minilm-l6", "--dataset_name", "wiki-topics", "--max_train_samples",
                     str(args.labels), "--max_seq_length", "64", "--num_train_epochs", "1",
                     "--per_device_train_batch_size", "16", "--learning_rate", "1e-4", "--pooling", "mean"]
    runs: dict[str, list[dict]] = {command: [] for command in COMMANDS}
    with tempfile.TemporaryDirectory() as tmp:
        for repetition in range(args.repetitions):
            for index, command in enumerate(runs):
                out = Path(tmp) / f"run-{repetition}-{index}"
                runs[command].append(run(command, finetune_args, out))
                print(f"{command:>36}: {runs[command][-1]}", flush=True)
    medians = {c: statistics.median(r["examples_per_s"] for r in rs) for c, rs in runs.items()}
    report = {
        "command": "python benchmarks/launch_threads.py " + " ".join(sys.argv[1:]),
        "cores": len(os.sched_getaffinity(0)),
        "finetune_args": finetune_args,
        "runs": runs,
        "median_examples_per_s": medians,
        "accelerate_launch_vs_python": medians["accelerate launch"] / medians["python"],
        "one_thread_vs_python": medians["accelerate launch, 1 thread (before)"] / medians["python"],
    }
    print(json.dumps({k: report[k] for k in ("median_examples_per_s", "accelerate_launch_vs_python",
                                             "one_thread_vs_python")}, indent=2))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
