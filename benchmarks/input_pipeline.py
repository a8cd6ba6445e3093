"""Input-pipeline throughput for stage 1: can the CPUs keep the GPUs fed?

Measures tokens/s of the whole data path of `pretrain_mlm.py` (read, tokenize, pack into 128-token blocks,
collate, MLM-mask) with the MiniLM/BERT tokenizer (30,522 tokens), for 1, 2, ... up to all cores:

  stream        --streaming: `ShardedStream` through torchdata's StatefulDataLoader; W loader workers tokenize
                (W = cores - 1 at most: the training process itself collates and masks), W = 0 is one core.
  stream ranks  the same stream split over N processes (one core each), as the ranks of a multi-process
                run split it: each tokenizes only its own documents; the rate is the sum over ranks.
  preprocessed  --preprocess_only once (`num_proc` = cores), then training reads the memory-mapped result:
                the tokenizing rate of that step, and the rate at which training reads, collates and masks it.

Each rate is set against what one GPU of BERT-base consumes at 40% MFU (FLOPs per token as in gpu_check.py,
H100 peak). Each configuration is run twice and the better rate kept.

    python benchmarks/input_pipeline.py --output benchmarks/results/input_pipeline_cpu.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import tempfile
import time
from pathlib import Path

import datasets
import torch
from datasets import load_dataset, load_from_disk
from gpu_check import PEAK_BF16_FLOPS, flops_per_token
from torch.utils.data import DataLoader
from transformers import DataCollatorForLanguageModeling

from tlnlp.data import builtin
from tlnlp.data.prepare import mask_batch, mlm_rows, pad_for_masking, prepare_mlm_dataset
from tlnlp.data.streaming import ShardedStream, stream_loader
from tlnlp.models.modeling import load_tokenizer

SEQ, BATCH = 128, 32


def write_corpus(path: Path, megabytes: float) -> None:
    texts = [t.replace("\n", " ") for t in load_dataset("json", data_files=builtin.dataset_files("wiki-leads"))["train"]["text"]]
    rng, written, target = random.Random(0), 0, int(megabytes * 2**20)
    with path.open("w", encoding="utf-8") as f:
        while written < target:
            rng.shuffle(texts)
            for text in texts:
                f.write(text + "\n")
                written += len(text.encode()) + 1
                if written >= target:
                    break


def drain_span(loader, masker, tokens: int, warmup_batches: int = 20) -> tuple[int, float, float]:
    """Pulls `tokens` tokens through `loader`, collated and masked as the training loop does, after
    `warmup_batches` (worker start-up is not throughput): (tokens, wall-clock start, wall-clock end)."""
    def forever():  # a finite loader (the preprocessed data) is read again, epoch after epoch
        while True:
            yield from loader

    seen, start = 0, None
    for i, batch in enumerate(forever()):
        batch = mask_batch(batch, masker)
        if i == warmup_batches:
            seen, start = 0, time.time()
        seen += int(batch["attention_mask"].sum())
        if start is not None and seen >= tokens:
            break
    return seen, start, time.time()


def drain(loader, masker, tokens: int) -> float:
    """Tokens/s through `loader` (see drain_span)."""
    seen, start, end = drain_span(loader, masker, tokens)
    return seen / (end - start)


def stage1_pipeline():
    """Stage 1's data path with MiniLM's tokenizer: (tokenizer, rows of a document group, collate, masker).
    One thread per process: the fast tokenizer would otherwise spread each batch over every core by itself,
    and "1 core" would not mean one core."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer = load_tokenizer(builtin.model_dir("minilm-l6", weights=False))
    rows = functools.partial(mlm_rows, tokenizer=tokenizer, max_seq_length=SEQ, line_by_line=False,
                             whole_word_mask=False)
    return tokenizer, rows, pad_for_masking(tokenizer), DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)


def drain_rank(corpus: str, rank: int, ranks: int, tokens: int) -> tuple[int, float, float]:
    """One rank of a multi-process stream, in its own process: (tokens drained, start, end) after warm-up."""
    torch.set_num_threads(1)
    _, rows, collate, masker = stage1_pipeline()
    source = load_dataset("text", data_files={"train": corpus}, streaming=True)["train"]
    stream = ShardedStream(source, rows, "text", rank=rank, world_size=ranks, held_out=0)
    return drain_span(stream_loader(stream, BATCH, collate, 0, pin_memory=False), masker, tokens)


def stream_over_ranks(corpus: Path, ranks: int, tokens: int) -> float:
    """Tokens/s of `ranks` processes draining their shares at once: all their tokens over the span from the
    first one's start to the last one's end (worker start-up and warm-up excluded)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(ranks, mp_context=get_context("spawn")) as pool:
        done = list(pool.map(drain_rank, [str(corpus)] * ranks, range(ranks), [ranks] * ranks,
                             [tokens // ranks] * ranks))
    return sum(t for t, _, _ in done) / (max(end for _, _, end in done) - min(start for _, start, _ in done))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=float, default=40.0, help="Size of the corpus (wiki-leads, repeated).")
    parser.add_argument("--tokens", type=int, default=4_000_000, help="Tokens drained per stream measurement.")
    parser.add_argument("--output", default=None)
    parser.add_argument("--max_cores", type=int, default=None, help="Measure up to this many cores (default: all).")
    args = parser.parse_args(argv)
    cores = min(len(os.sched_getaffinity(0)), args.max_cores or 1 << 10)
    datasets.disable_caching()  # every tokenizing run does the work, none reads an earlier run's cache
    tokenizer, rows, collate, masker = stage1_pipeline()
    gpu_tokens_per_s = 0.4 * PEAK_BF16_FLOPS["H100"] / flops_per_token(12, 768, SEQ, len(tokenizer), 0.15)
    report: dict = {"command": "python benchmarks/input_pipeline.py", "cores": cores, "megabytes": args.megabytes,
                    "sequence": SEQ, "batch": BATCH, "bert_base_gpu_tokens_per_s_at_40pct_mfu": gpu_tokens_per_s,
                    "stream": {}, "preprocessed": {}}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        write_corpus(corpus, args.megabytes)
        source = load_dataset("text", data_files={"train": str(corpus)}, streaming=True)["train"]
        for workers in range(0, cores):  # workers + the main process = cores used
            rates = []
            for _ in range(2):
                stream = ShardedStream(source, rows, "text", rank=0, world_size=1, held_out=0)
                loader = stream_loader(stream, BATCH, collate, workers, pin_memory=False)
                rates.append(drain(loader, masker, args.tokens))
                del loader
            report["stream"][f"{workers + 1} core(s)"] = {"cores": workers + 1, "loader_workers": workers,
                                                          "tokens_per_s": max(rates)}
            print(f"stream, {workers} workers: {max(rates):,.0f} tokens/s", flush=True)
        for ranks in range(2, cores + 1):
            rate = max(stream_over_ranks(corpus, ranks, args.tokens) for _ in range(2))
            report["stream"][f"{ranks} ranks"] = {"cores": ranks, "ranks": ranks, "loader_workers": 0,
                                                  "tokens_per_s": rate}
            print(f"stream over {ranks} ranks: {rate:,.0f} tokens/s", flush=True)

        raw = load_dataset("text", data_files={"train": str(corpus)})["train"]
        for processes in sorted({1, cores}):
            start = time.perf_counter()
            packed = prepare_mlm_dataset(raw, tokenizer, text_column="text", max_seq_length=SEQ, line_by_line=False,
                                         whole_word_mask=False, num_proc=processes if processes > 1 else None)
            folder = Path(tmp) / f"tokenized-{processes}"
            packed.save_to_disk(str(folder))
            elapsed = time.perf_counter() - start
            total = sum(len(ids) for ids in packed.with_format("arrow")["input_ids"].to_pylist())
            report["preprocessed"][f"tokenize, {processes} core(s)"] = {"cores": processes, "tokens": total,
                                                                     "tokens_per_s": total / elapsed}
            print(f"preprocess, {processes} processes: {total / elapsed:,.0f} tokens/s", flush=True)
        mapped = load_from_disk(str(folder)).shuffle(seed=0)  # memory-mapped; random order, as training reads it
        for workers in range(0, cores):
            loader = DataLoader(mapped, batch_size=BATCH, collate_fn=collate, num_workers=workers)
            rate = max(drain(loader, masker, args.tokens) for _ in range(2))
            report["preprocessed"][f"read, {workers + 1} core(s)"] = {"cores": workers + 1, "loader_workers": workers,
                                                                   "tokens_per_s": rate}
            print(f"read preprocessed, {workers} workers: {rate:,.0f} tokens/s", flush=True)

    for part in ("stream", "preprocessed"):
        for entry in report[part].values():
            entry["bert_base_gpus_fed"] = entry["tokens_per_s"] / gpu_tokens_per_s
            entry["tokens_per_s_per_core"] = entry["tokens_per_s"] / entry["cores"]
    print(json.dumps(report, indent=2))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    torch.set_num_threads(1)  # the pipeline is CPU work in its own processes; keep masking single-threaded
    main()
