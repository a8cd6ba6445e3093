"""Peak resident memory with --streaming: flat as the corpus grows.

Writes plain-text corpora of increasing size (Wikipedia lead paragraphs, repeated and shuffled), then
measures, each in fresh processes, the peak resident set size (ru_maxrss) of:

  data   tlnlp's streaming pretraining pipeline over the WHOLE file: read, tokenize, pack into blocks,
         batch and mask every block once (the part whose memory could grow with the corpus). With
         --ranks N, N processes drain it side by side, each through its own `ShardedStream` share, as the
         ranks of a multi-process run do; the peak of each is reported;
  train  `python -m tlnlp.pretrain --streaming` on the file for --train_steps steps (tiny model), under
         `accelerate launch` with N processes when --ranks N > 1 (the peak of the largest process).

    python benchmarks/streaming_memory.py --sizes_gb 0.1,1 --output benchmarks/results/streaming_memory.json
    python benchmarks/streaming_memory.py --sizes_gb 0.4,4 --ranks 2 \
        --output benchmarks/results/streaming_memory_2ranks.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Runs `python argv...` as a child and prints the peak RSS (KiB on Linux) of the children it waited for.
PEAK_RSS = ("import resource, subprocess, sys; done = subprocess.run([sys.executable, *sys.argv[1:]]); "
            "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def write_corpus(path: Path, size_bytes: int, seed: int = 0) -> int:
    from datasets import load_dataset

    from tlnlp.data import builtin

    lines = [t.replace("\n", " ") for t in load_dataset("json", data_files=builtin.dataset_files("wiki-leads"))["train"]["text"]]
    rng, written = random.Random(seed), 0
    with path.open("w", encoding="utf-8") as f:
        while written < size_bytes:
            rng.shuffle(lines)
            for line in lines:
                f.write(line + "\n")
                written += len(line.encode("utf-8")) + 1
                if written >= size_bytes:
                    break
    return written


def stream_everything(file: str, seq: int, batch: int, rank: int, ranks: int) -> dict:
    """The child for `data`: rank `rank` of `ranks` drains its share of one pass of the stream, through the
    same `ShardedStream` and loader as tlnlp.pretrain --streaming."""
    import functools

    import torch
    from transformers import DataCollatorForLanguageModeling

    from tlnlp.data import builtin
    from tlnlp.data.prepare import load_raw_datasets, mask_batch, mlm_rows, pad_for_masking
    from tlnlp.data.streaming import ShardedStream, stream_loader
    from tlnlp.models.modeling import load_tokenizer

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // ranks))  # as tlnlp does under accelerate launch
    tokenizer = load_tokenizer(builtin.model_dir("minilm-l6", weights=False))
    raw = load_raw_datasets(train_file=file, validation_file=None, dataset_name=None, dataset_config_name=None,
                            streaming=True)
    rows_of = functools.partial(mlm_rows, tokenizer=tokenizer, max_seq_length=seq, line_by_line=False,
                                whole_word_mask=False)
    stream = ShardedStream(raw["train"], rows_of, "text", rank=rank, world_size=ranks, held_out=0)
    masker = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    start, rows, tokens = time.time(), 0, 0
    for b in stream_loader(stream, batch, pad_for_masking(tokenizer), num_workers=0, pin_memory=False):
        if stream.state_dict()["pass"] > 0:  # the stream repeats endlessly; one pass is the whole file
            break
        b = mask_batch(b, masker)
        rows += len(b["input_ids"])
        tokens += int(b["attention_mask"].sum())
    return {"blocks": rows, "tokens": tokens, "seconds": time.time() - start}


def measure(*commands: list[str], env: dict | None = None) -> list[float]:
    """Runs the commands side by side, each under its own peak-RSS probe; the peak of each, in MB."""
    running = [subprocess.Popen([sys.executable, "-c", PEAK_RSS, *command], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env) for command in commands]
    peaks = []
    for command, child in zip(commands, running):
        stdout, stderr = child.communicate()
        status, kib = stdout.split()[-2:]
        if status != "0":
            raise RuntimeError(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
        peaks.append(int(kib) / 1024)
    return peaks


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes_gb", default="0.1,1", help="Corpus sizes to measure, in GB (comma-separated).")
    parser.add_argument("--train_steps", type=int, default=100)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--ranks", type=int, default=1, help="Processes sharing the stream, as in a multi-process run.")
    parser.add_argument("--workdir", help="Where the corpora are written (default: a temporary folder).")
    parser.add_argument("--output", help="Write the results as JSON here.")
    parser.add_argument("--_drain", help=argparse.SUPPRESS)  # internal: the `data` child
    parser.add_argument("--_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._drain:
        result = stream_everything(args._drain, args.seq, args.batch, args._rank, args.ranks)
        Path(f"{args._drain}.rank{args._rank}.json").write_text(json.dumps(result))
        return result
    # Under `accelerate launch` on a CPU-only machine: gloo processes, one thread each side of the 2 ranks.
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    launch = (["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(args.ranks),
               "--main_process_port", "29533"] if args.ranks > 1 else [])

    results = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        for size in (float(s) for s in args.sizes_gb.split(",")):
            corpus = Path(work) / f"corpus_{size}gb.txt"
            written = write_corpus(corpus, int(size * 1e9))
            data_mb = measure(*([__file__, "--_drain", str(corpus), "--seq", str(args.seq), "--batch", str(args.batch),
                                 "--ranks", str(args.ranks), "--_rank", str(rank)] for rank in range(args.ranks)))
            drained = [json.loads(Path(f"{corpus}.rank{rank}.json").read_text()) for rank in range(args.ranks)]
            out = Path(work) / "run"
            [train_mb] = measure([*launch, "-m", "tlnlp.pretrain", "--train_file", str(corpus), "--streaming",
                                  "--tokenizer_name", "minilm-l6", "--model_size", "tiny",
                                  "--max_seq_length", str(args.seq), "--per_device_train_batch_size", str(args.batch),
                                  "--max_train_steps", str(args.train_steps), "--logging_steps", "50",
                                  "--output_dir", str(out), "--overwrite_output_dir", "--cache_dir",
                                  str(Path(work) / "cache")], env=env)
            tokens = sum(d["tokens"] for d in drained)
            seconds = max(d["seconds"] for d in drained)
            row = {"corpus_gb": written / 1e9, "ranks": args.ranks,
                   "data_peak_rss_mb": max(data_mb), "data_peak_rss_mb_per_rank": data_mb,
                   "train_peak_rss_mb": train_mb, "tokens_streamed": tokens,
                   "tokens_per_rank": [d["tokens"] for d in drained],
                   "blocks_streamed": sum(d["blocks"] for d in drained), "data_seconds": seconds,
                   "train_steps": args.train_steps}
            results.append(row)
            print(f"{row['corpus_gb']:.2f} GB, {args.ranks} rank(s): whole-file data pipeline peak "
                  f"{' / '.join(f'{mb:,.0f}' for mb in data_mb)} MB per rank ({tokens:,} tokens in {seconds:.0f} s); "
                  f"{args.train_steps}-step training run peak {train_mb:,.0f} MB", flush=True)
            corpus.unlink()
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"runs": results, "seq": args.seq, "batch": args.batch,
                                                 "command": " ".join(["python", *sys.argv])}, indent=2))
    return {"runs": results}


if __name__ == "__main__":
    main()
