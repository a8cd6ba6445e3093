"""Fine-tuning throughput and accuracy: tlnlp against the stock Hugging Face recipe, side by side.

stock         the `run_glue_no_trainer.py` recipe: AutoModelForSequenceClassification, dynamic padding with
              DataCollatorWithPadding, randomly shuffled batches, AdamW, linear schedule, evaluation every epoch.
stock-frozen  the same, with the embeddings and bottom K layers frozen by hand (requires_grad=False), as a
              user of the stock recipe would freeze them.
tlnlp         `python -m tlnlp.finetune` with its defaults (length-grouped batches) and the same model,
              head, data, labels, batch, sequence length, learning rate, epochs and precision.
tlnlp-cached  tlnlp with the same layers frozen and --cache_frozen_features.

A variant may name its own precision after an @ (`tlnlp@auto`, `stock@bf16`); otherwise --mixed_precision
applies. `auto` is tlnlp's default: bf16 on a CPU with AVX512-BF16/AMX, else fp32. With --launcher accelerate
the tlnlp variants run under `accelerate launch -m tlnlp.finetune`, as users run them.

Every run is a fresh process; the variants alternate over several repetitions; medians and ratios are
printed and written as JSON. Examples/s counts training examples over the whole training time: every
epoch's validation pass included, and for tlnlp-cached the one-off feature caching too. Test accuracy is
measured after training, outside the timing.

    python benchmarks/bench_finetune.py --output benchmarks/results/finetune_cpu.json
    python benchmarks/bench_finetune.py --variants stock,tlnlp@no,tlnlp@auto --launcher accelerate \
        --output benchmarks/results/finetune_cpu_bf16.json
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

VARIANTS = ("stock", "tlnlp", "stock-frozen", "tlnlp-cached")


def stock(args: argparse.Namespace, frozen: bool, precision: str) -> dict:
    """The stock recipe, rebuilt: what a user of the Hugging Face example would run."""
    import torch
    from accelerate import Accelerator
    from datasets import load_dataset
    from torch.utils.data import DataLoader
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, get_scheduler

    from tlnlp.data import builtin

    torch.manual_seed(args.seed)
    splits = load_dataset("json" if args.train_file.endswith((".json", ".jsonl")) else "csv",
                          data_files={"train": args.train_file, "validation": args.validation_file,
                                      "test": args.test_file})
    if args.labels:
        splits["train"] = splits["train"].select(builtin.stratified_indices(splits["train"]["label"], args.labels,
                                                                            args.seed).tolist())
    names = sorted({str(v) for v in splits["train"]["label"]})
    label2id = {name: i for i, name in enumerate(names)}
    model_path = builtin.resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=len(names))
    if frozen:
        model.base_model.embeddings.requires_grad_(False)
        for layer in model.base_model.encoder.layer[: args.freeze_layers]:
            layer.requires_grad_(False)

    def encode(batch):
        out = tokenizer(batch["text"], truncation=True, max_length=args.max_seq_length)
        out["labels"] = [label2id[str(v)] for v in batch["label"]]
        return out

    data = {k: v.map(encode, batched=True, remove_columns=v.column_names) for k, v in splits.items()}
    collator = DataCollatorWithPadding(tokenizer)
    train_dl = DataLoader(data["train"], shuffle=True, batch_size=args.batch_size, collate_fn=collator)
    eval_dl = DataLoader(data["validation"], batch_size=args.eval_batch_size, collate_fn=collator)
    test_dl = DataLoader(data["test"], batch_size=args.eval_batch_size, collate_fn=collator)
    no_decay = ["bias", "LayerNorm.weight"]
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([
        {"params": [p for n, p in params if not any(nd in n for nd in no_decay)], "weight_decay": 0.0},
        {"params": [p for n, p in params if any(nd in n for nd in no_decay)], "weight_decay": 0.0},
    ], lr=args.learning_rate)
    epochs = args.frozen_epochs if frozen else args.epochs
    scheduler = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=0,
                              num_training_steps=epochs * len(train_dl))
    accelerator = Accelerator(mixed_precision=precision)
    model, optimizer, train_dl, eval_dl, test_dl, scheduler = accelerator.prepare(
        model, optimizer, train_dl, eval_dl, test_dl, scheduler)

    def accuracy(dataloader) -> float:
        model.eval()
        right = total = 0
        with torch.no_grad():
            for batch in dataloader:
                predictions = model(**batch).logits.argmax(-1)
                right += int((predictions == batch["labels"]).sum())
                total += len(predictions)
        return right / total

    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for batch in train_dl:
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        accuracy(eval_dl)
    seconds = time.perf_counter() - start
    return {"train_time_s": seconds, "examples_per_s": epochs * len(data["train"]) / seconds,
            "test_accuracy": accuracy(test_dl), "epochs": epochs}


def tlnlp(args: argparse.Namespace, cached: bool, precision: str) -> dict:
    """`python -m tlnlp.finetune` or `accelerate launch -m tlnlp.finetune`, as a user runs it."""
    epochs = args.frozen_epochs if cached else args.epochs
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--dynamo_backend", "no", "-m"] if args.launcher == "accelerate" else [sys.executable, "-m"]
    with tempfile.TemporaryDirectory() as out:
        command = [*launch, "tlnlp.finetune", "--model_name_or_path", args.model,
                   "--train_file", args.train_file, "--validation_file", args.validation_file,
                   "--test_file", args.test_file, "--max_seq_length", str(args.max_seq_length),
                   "--per_device_train_batch_size", str(args.batch_size),
                   "--per_device_eval_batch_size", str(args.eval_batch_size),
                   "--learning_rate", str(args.learning_rate), "--num_train_epochs", str(epochs),
                   "--max_grad_norm", "0", "--seed", str(args.seed), "--logging_steps", "1000",
                   "--mixed_precision", precision,
                   "--output_dir", out, "--overwrite_output_dir", "--cache_dir", str(Path(out) / "cache")]
        if args.labels:
            command += ["--max_train_samples", str(args.labels)]
        if cached:
            command += ["--freeze_embeddings", "--freeze_layers", str(args.freeze_layers), "--cache_frozen_features"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"tlnlp.finetune failed:\n{done.stderr[-3000:]}")
        results = json.loads((Path(out) / "all_results.json").read_text())
    return {"train_time_s": results["train_runtime_s"], "examples_per_s": results["train_examples_per_s"],
            "test_accuracy": results["test_accuracy"], "epochs": epochs,
            "feature_cache_s": results.get("feature_cache_s", 0.0), "precision": results["mixed_precision"]}


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    name, _, precision = variant.partition("@")
    precision = precision or args.mixed_precision
    if name not in VARIANTS:
        raise SystemExit(f"Unknown variant {name!r} in --variants; expected one of {', '.join(VARIANTS)}.")
    if name.startswith("stock"):
        if precision == "auto":
            raise SystemExit("The stock recipe has no 'auto' precision: give stock variants no, bf16 or fp16.")
        return {**stock(args, frozen=name == "stock-frozen", precision=precision), "precision": precision}
    return tlnlp(args, cached=name == "tlnlp-cached", precision=precision)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm-l6", help="Encoder: a built-in name or a model folder.")
    parser.add_argument("--train_file", help="Labeled data with text and label columns (default: wiki-topics).")
    parser.add_argument("--validation_file")
    parser.add_argument("--test_file")
    parser.add_argument("--labels", type=int, default=1000, help="Stratified training examples (0: all).")
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--eval_batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--epochs", type=int, default=3, help="Epochs of full fine-tuning.")
    parser.add_argument("--frozen_epochs", type=int, default=5, help="Epochs of the frozen-bottom variants.")
    parser.add_argument("--freeze_layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--mixed_precision", default="no", choices=["no", "bf16", "fp16", "auto"],
                        help="Autocast precision of every variant that names none (no: fp32; auto: tlnlp's default).")
    parser.add_argument("--launcher", default="python", choices=["python", "accelerate"],
                        help="How the tlnlp variants are started: `python -m` or `accelerate launch -m`.")
    parser.add_argument("--output", help="Write the results as JSON here.")
    parser.add_argument("--_variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    parser.add_argument("--_result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.train_file is None:
        from tlnlp.data import builtin

        files = builtin.dataset_files("wiki-topics")
        args.train_file, args.validation_file, args.test_file = files["train"], files["validation"], files["test"]

    if args._variant:  # a child process: one run, result to a file
        Path(args._result).write_text(json.dumps(run_variant(args._variant, args)))
        return {}

    variants = args.variants.split(",")
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    for repeat in range(args.repeats):
        order = variants if repeat % 2 == 0 else variants[::-1]  # alternate, so drift hits every variant
        for variant in order:
            with tempfile.NamedTemporaryFile(suffix=".json") as result:
                command = [sys.executable, __file__, *passthrough, "--train_file", args.train_file,
                           "--validation_file", args.validation_file, "--test_file", args.test_file,
                           "--_variant", variant, "--_result", result.name]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(f"{variant} failed:\n{done.stderr[-3000:]}")
                runs[variant].append(json.loads(Path(result.name).read_text()))
            print(f"repeat {repeat + 1}/{args.repeats} {variant:18} {runs[variant][-1]['examples_per_s']:7.1f} "
                  f"examples/s, test accuracy {runs[variant][-1]['test_accuracy']:.4f}", flush=True)

    median = {v: statistics.median(r["examples_per_s"] for r in rs) for v, rs in runs.items()}
    accuracy = {v: statistics.mean(r["test_accuracy"] for r in rs) for v, rs in runs.items()}
    speedups = {}
    baselines = [v for v in variants if v.startswith("stock")]
    for fast in (v for v in variants if v.startswith("tlnlp")):
        for slow in baselines:  # the cached variant against both stock recipes; the others against full stock
            if slow.startswith("stock-frozen") and not fast.startswith("tlnlp-cached"):
                continue
            speedups[f"{fast} / {slow}"] = median[fast] / median[slow]
    result = {
        "config": {k: getattr(args, k) for k in ("model", "labels", "max_seq_length", "batch_size", "learning_rate",
                                                 "epochs", "frozen_epochs", "freeze_layers", "repeats", "seed",
                                                 "launcher")}
        | {"precision": {v: runs[v][0]["precision"] for v in variants}, "data": args.train_file,
           "command": " ".join(["python", *sys.argv])},
        "examples_per_s_median": median, "test_accuracy_mean": accuracy, "speedup": speedups, "runs": runs,
    }
    print(f"\n{'':18} {'precision':>9} {'examples/s (median)':>20} {'test accuracy':>14} {'epochs':>7}")
    for variant in variants:
        print(f"{variant:18} {runs[variant][0]['precision']:>9} {median[variant]:20.1f} {accuracy[variant]:14.4f} "
              f"{runs[variant][0]['epochs']:7d}")
    for name, value in speedups.items():
        print(f"speed-up {name}: {value:.2f}x")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
