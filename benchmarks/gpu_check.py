"""The GPU check: stage 1 at BERT-base size in bf16 against the stock recipe, MFU, then stage 2 from it.

1. `bench_mlm.py` at BERT-base size (12 x 768, vocabulary 30,522, sequence 128) in bf16 with fused AdamW:
   tlnlp's training step against the stock `run_mlm_no_trainer` step, alternating, tokens/s and the ratio.
2. The real `scripts/pretrain_mlm.py` at the same size on `wiki-leads`, with and without --torch_compile:
   tokens/s over the steady-state steps (from the run's own log windows) and MFU = model FLOPs/s over the
   GPU's peak dense bf16 FLOPs, looked up from the device name.
   Before that, `torch._dynamo.explain` counts graph breaks of the MLM loss with the boolean-indexed sparse
   head and with the fixed-slot head that --torch_compile uses.
3. The real `scripts/finetune_cls.py` from that checkpoint on 1,000 `wiki-topics` labels: examples/s, accuracy.

Everything lands in one JSON file. `--dry` runs the same steps with a tiny model for a few steps on
whatever device there is (CI runs it on the CPU to check the script and its JSON); its numbers mean nothing.

    bash benchmarks/gpu_check.sh            # on a GPU machine, under 8 minutes on one H100/H200
    bash benchmarks/gpu_check.sh --dry      # anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

# Peak dense bf16 tensor-core FLOP/s (no sparsity), from the vendors' data sheets.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
                   "A10G": 70e12, "A10": 125e12, "B200": 2250e12, "MI300X": 1307e12}


def peak_flops(device_name: str) -> float | None:
    for name, flops in sorted(PEAK_BF16_FLOPS.items(), key=lambda item: -len(item[0])):
        if name in device_name:
            return flops
    return None


def flops_per_token(layers: int, hidden: int, seq: int, vocab: int, masked_fraction: float, sparse: bool) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward): 2 FLOPs per weight in each matrix product,
    the attention score and value products, and the MLM head (at masked positions only when sparse)."""
    per_layer = 2 * (4 * hidden * hidden + 2 * hidden * 4 * hidden) + 2 * 2 * seq * hidden
    head = 2 * (hidden * hidden + hidden * vocab) * (masked_fraction if sparse else 1.0)
    return 3 * (layers * per_layer + head)


def steady_tokens_per_s(log: str) -> float | None:
    """The median tokens/s of the run's log windows, leaving out the first (start-up, compilation)."""
    rates = [float(x) for x in re.findall(r"step \d+: loss [\d.]+, lr [\d.e+-]+, (\d+) tokens/s", log)]
    rates = rates[1:] or rates
    return sorted(rates)[len(rates) // 2] if rates else None


def run(command: list[str], env: dict | None = None) -> str:
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stderr[-4000:]}")
    return done.stdout + done.stderr


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="Tiny model, a few steps: checks the script, not the GPU.")
    parser.add_argument("--output", help="Default: benchmarks/results/gpu_check.json (gpu_check_dry.json with --dry).")
    args = parser.parse_args(argv)
    args.output = args.output or str(REPO / "benchmarks" / "results" / f"gpu_check{'_dry' if args.dry else ''}.json")
    on_gpu = torch.cuda.is_available()
    device_name = torch.cuda.get_device_name() if on_gpu else "cpu"
    size = {"layers": 2, "hidden": 64, "heads": 2} if args.dry else {"layers": 12, "hidden": 768, "heads": 12}
    steps, batch = (6, 8) if args.dry else (300, 128)
    precision = "bf16" if on_gpu else "no"
    report: dict = {"command": "bash benchmarks/gpu_check.sh" + (" --dry" if args.dry else ""), "dry": args.dry,
                    "device": device_name, "size": size, "sequence": 128, "precision": precision,
                    "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    import bench_mlm

    report["step_vs_stock"] = bench_mlm.main([
        "--layers", str(size["layers"]), "--hidden", str(size["hidden"]), "--heads", str(size["heads"]),
        "--seq", "128", "--batch", str(batch), "--steps", "3" if args.dry else "30", "--warmup", "1" if args.dry else "5",
        "--repeats", "1" if args.dry else "2", "--precision", "bf16" if on_gpu else "fp32"])

    report["graph_breaks"] = graph_breaks(size, "cuda" if on_gpu else "cpu")

    with tempfile.TemporaryDirectory() as tmp:
        stage1_runs = {}
        for compiled in (False, True):
            out = Path(tmp) / f"stage1-{'compiled' if compiled else 'eager'}"
            command = [sys.executable, str(REPO / "scripts" / "pretrain_mlm.py"), "--dataset_name", "wiki-leads",
                       "--tokenizer_name", "minilm-l6", "--num_hidden_layers", str(size["layers"]), "--hidden_size",
                       str(size["hidden"]), "--num_attention_heads", str(size["heads"]), "--intermediate_size",
                       str(4 * size["hidden"]), "--max_seq_length", "128", "--per_device_train_batch_size", str(batch),
                       "--max_train_steps", str(steps), "--logging_steps", "2" if args.dry else "25",
                       "--learning_rate", "1e-4", "--num_warmup_steps", str(steps // 10), "--mixed_precision",
                       precision, "--output_dir", str(out)] + (["--torch_compile"] if compiled else [])
            log = run(command)
            results = json.loads((out / "all_results.json").read_text())
            rate = steady_tokens_per_s(log)
            vocab = 30522
            model_flops = flops_per_token(size["layers"], size["hidden"], 128, vocab, 0.15, sparse=True)
            peak = peak_flops(device_name)
            stage1_runs["compiled" if compiled else "eager"] = {
                "tokens_per_s_steady": rate, "tokens_per_s_overall": results["train_tokens_per_s"],
                "eval_loss": results["eval_loss"], "steps": results["optimizer_steps"],
                "mfu": rate * model_flops / peak if rate and peak else None,
            }
        report["stage1"] = stage1_runs
        report["flops_per_token"] = model_flops
        report["peak_bf16_flops"] = peak_flops(device_name)

        stage2 = Path(tmp) / "stage2"
        run([sys.executable, str(REPO / "scripts" / "finetune_cls.py"), "--model_name_or_path",
             str(Path(tmp) / "stage1-eager"), "--dataset_name", "wiki-topics", "--max_train_samples",
             "60" if args.dry else "1000", "--max_seq_length", "64", "--num_train_epochs", "1" if args.dry else "3",
             "--per_device_train_batch_size", "16", "--learning_rate", "1e-4", "--pooling", "mean",
             "--mixed_precision", precision, "--output_dir", str(stage2)])
        results = json.loads((stage2 / "all_results.json").read_text())
        report["stage2"] = {k: results.get(k) for k in ("train_examples_per_s", "eval_accuracy", "test_accuracy",
                                                        "train_runtime_s")}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2, default=float))
    print(json.dumps({k: report[k] for k in ("device", "graph_breaks", "stage1", "stage2")}, indent=2, default=float))
    return report


def graph_breaks(size: dict, device: str) -> dict[str, int]:
    """torch._dynamo.explain on the MLM loss at this size: the boolean-indexed sparse head against the
    fixed-slot head that --torch_compile uses (0 breaks expected for the latter)."""
    from transformers import BertConfig, BertForMaskedLM

    from tlnlp.models.modeling import MaskedLMLoss

    config = BertConfig(vocab_size=30522, num_hidden_layers=size["layers"], hidden_size=size["hidden"],
                        num_attention_heads=size["heads"], intermediate_size=4 * size["hidden"])
    model = BertForMaskedLM(config).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, 30522, (8, 128), generator=generator)
    labels = torch.where(torch.rand(input_ids.shape, generator=generator) < 0.15, input_ids, -100)
    batch = {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
             "labels": labels.to(device)}
    counts = {}
    for name, fixed in (("boolean_sparse_head", None), ("fixed_slot_head", 0.15)):
        torch._dynamo.reset()
        counts[name] = torch._dynamo.explain(MaskedLMLoss(model, sparse=True, fixed_slots_for=fixed))(**batch).graph_break_count
    return counts


if __name__ == "__main__":
    main()
