"""MLM pretraining throughput: tlnlp's training step against the stock Hugging Face recipe, side by side.

stock:  BertForMaskedLM with full-vocabulary logits, DataCollatorForLanguageModeling in the data loader
        (the `run_mlm_no_trainer.py` recipe).
tlnlp:  the same model and weights, the MLM head only at masked positions (`MaskedLMLoss`), masking in the loop.

Both run the same data, batch, sequence length, masking rate, precision, optimizer and initial weights,
alternately, several times; medians and the ratio are printed and written as JSON. Both draw the same
masks from the same weights, so their losses must agree: the mean losses may differ by at most
LOSS_TOLERANCE (relative; float summation order differs between the two heads), or the benchmark says so
and exits non-zero (`losses_agree` in the JSON).

    python benchmarks/bench_mlm.py --output benchmarks/results/mlm_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from datasets import load_dataset
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling

from tlnlp.data import builtin
from tlnlp.data.prepare import mask_batch, pack_texts, pad_for_masking
from tlnlp.models.modeling import MaskedLMLoss

LOSS_TOLERANCE = {"fp32": 1e-3, "bf16": 2e-2}


def blocks(corpus: str | None, tokenizer, seq: int, needed: int) -> list[dict]:
    if corpus:
        texts = [line for line in Path(corpus).read_text().splitlines() if line.strip()]
    else:
        texts = load_dataset("json", data_files=builtin.dataset_files("wiki-leads"))["train"]["text"]
    packed = pack_texts(texts[: max(200, needed * 4)], tokenizer, seq)
    rows = [{"input_ids": i, "special_tokens_mask": s} for i, s in zip(packed["input_ids"], packed["special_tokens_mask"])]
    rows = [r for r in rows if len(r["input_ids"]) == seq]  # full blocks only: equal work per step
    return (rows * (needed // max(len(rows), 1) + 1))[:needed]


def run(variant: str, config: BertConfig, tokenizer, data: list[dict], batch: int, steps: int, warmup: int,
        device: str, precision: str = "fp32") -> dict:
    torch.manual_seed(0)
    model = BertForMaskedLM(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")  # both variants alike
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16")
    stock_collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    masker = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    pad = pad_for_masking(tokenizer)
    wrapped = MaskedLMLoss(model, sparse=True)
    losses, tokens, elapsed = [], 0, 0.0
    for step in range(warmup + steps):
        rows = [dict(r) for r in data[step * batch : (step + 1) * batch]]
        torch.manual_seed(1000 + step)  # the same masks for both variants
        start = time.perf_counter()
        if variant == "stock":
            inputs = {k: v.to(device) for k, v in stock_collator(rows).items()}
            with autocast:
                loss = model(**inputs).loss
        else:
            inputs = {k: v.to(device) for k, v in mask_batch(pad(rows), masker).items()}
            with autocast:
                loss = wrapped(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            elapsed += time.perf_counter() - start
            tokens += int(inputs["attention_mask"].sum())
            losses.append(loss.item())
    return {"tokens_per_s": tokens / elapsed, "mean_loss": statistics.mean(losses)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="Timed steps per repetition.")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokenizer", help="Tokenizer folder (default: the MiniLM tokenizer, 30,522 tokens).")
    parser.add_argument("--corpus", help="A .txt corpus (default: wiki-leads).")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast, both variants.")
    parser.add_argument("--output", help="Write the results as JSON here.")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or builtin.model_dir("minilm-l6", weights=False))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
                        max_position_embeddings=max(512, args.seq))
    data = blocks(args.corpus, tokenizer, args.seq, (args.warmup + args.steps) * args.batch)
    runs: dict[str, list[dict]] = {"stock": [], "tlnlp": []}
    for repeat in range(args.repeats):
        order = ["stock", "tlnlp"] if repeat % 2 == 0 else ["tlnlp", "stock"]  # alternate, so drift hits both
        for variant in order:
            runs[variant].append(run(variant, config, tokenizer, data, args.batch, args.steps, args.warmup, device,
                                     args.precision))
    median = {v: statistics.median(r["tokens_per_s"] for r in rs) for v, rs in runs.items()}
    result = {
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
        "config": {k: getattr(args, k) for k in ("layers", "hidden", "heads", "seq", "batch", "steps", "repeats")}
        | {"vocab": len(tokenizer), "mlm_probability": 0.15, "precision": args.precision},
        "tokens_per_s_median": median,
        "speedup": median["tlnlp"] / median["stock"],
        "mean_loss": {v: statistics.mean(r["mean_loss"] for r in rs) for v, rs in runs.items()},
        "runs": runs,
    }
    result["loss_relative_difference"] = abs(result["mean_loss"]["tlnlp"] / result["mean_loss"]["stock"] - 1)
    result["losses_agree"] = result["loss_relative_difference"] <= LOSS_TOLERANCE[args.precision]
    print(f"{'':8} {'tokens/s (median)':>18} {'mean loss':>10}")
    for variant in ("stock", "tlnlp"):
        print(f"{variant:8} {median[variant]:18,.0f} {result['mean_loss'][variant]:10.4f}")
    print(f"speed-up: {result['speedup']:.2f}x")
    print(f"mean losses differ by {result['loss_relative_difference']:.2e} (relative; at most "
          f"{LOSS_TOLERANCE[args.precision]:.0e} allowed in {args.precision}): "
          f"{'they agree' if result['losses_agree'] else 'THEY DISAGREE: the two steps do not compute the same loss'}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    raise SystemExit(0 if main()["losses_agree"] else 1)
