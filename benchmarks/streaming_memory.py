"""Peak resident memory with --streaming: flat as the corpus grows.

Writes plain-text corpora of increasing size (Wikipedia lead paragraphs, repeated and shuffled), then
measures, each in a fresh process, the peak resident set size (ru_maxrss) of:

  data   tlnlp's streaming pretraining pipeline over the WHOLE file: read, tokenize, pack into blocks,
         batch and mask every block once (the part whose memory could grow with the corpus);
  train  `python -m tlnlp.pretrain --streaming` on the file for --train_steps steps (tiny model).

    python benchmarks/streaming_memory.py --sizes_gb 0.1,1 --output benchmarks/results/streaming_memory.json
"""

from __future__ import annotations

import argparse
import json
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

    from tlnlp import builtin

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


def stream_everything(file: str, seq: int, batch: int) -> dict:
    """The child for `data`: the streaming pipeline of tlnlp.pretrain, drained to the end."""
    from torch.utils.data import DataLoader
    from transformers import DataCollatorForLanguageModeling

    from tlnlp import builtin
    from tlnlp.data import load_raw_datasets, mask_batch, pad_for_masking, prepare_mlm_dataset
    from tlnlp.modeling import load_tokenizer

    tokenizer = load_tokenizer(builtin.model_dir("minilm-l6"))
    raw = load_raw_datasets(train_file=file, validation_file=None, dataset_name=None, dataset_config_name=None,
                            streaming=True)
    blocks = prepare_mlm_dataset(raw["train"], tokenizer, text_column="text", max_seq_length=seq,
                                 line_by_line=False, whole_word_mask=False)
    masker = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    start, rows, tokens = time.time(), 0, 0
    for b in DataLoader(blocks, batch_size=batch, collate_fn=pad_for_masking(tokenizer)):
        b = mask_batch(b, masker)
        rows += len(b["input_ids"])
        tokens += int(b["attention_mask"].sum())
    return {"blocks": rows, "tokens": tokens, "seconds": time.time() - start}


def measure(command: list[str]) -> tuple[float, str]:
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, *command], capture_output=True, text=True)
    status, kib = done.stdout.split()[-2:]
    if status != "0":
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return int(kib) / 1024, done.stderr


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes_gb", default="0.1,1", help="Corpus sizes to measure, in GB (comma-separated).")
    parser.add_argument("--train_steps", type=int, default=100)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workdir", help="Where the corpora are written (default: a temporary folder).")
    parser.add_argument("--output", help="Write the results as JSON here.")
    parser.add_argument("--_drain", help=argparse.SUPPRESS)  # internal: the `data` child
    args = parser.parse_args(argv)
    if args._drain:
        result = stream_everything(args._drain, args.seq, args.batch)
        Path(args._drain + ".result.json").write_text(json.dumps(result))
        return result

    results = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        for size in (float(s) for s in args.sizes_gb.split(",")):
            corpus = Path(work) / f"corpus_{size}gb.txt"
            written = write_corpus(corpus, int(size * 1e9))
            data_mb, _ = measure([__file__, "--_drain", str(corpus), "--seq", str(args.seq),
                                  "--batch", str(args.batch)])
            drained = json.loads(Path(str(corpus) + ".result.json").read_text())
            out = Path(work) / "run"
            train_mb, _ = measure(["-m", "tlnlp.pretrain", "--train_file", str(corpus), "--streaming",
                                   "--tokenizer_name", "minilm-l6", "--model_size", "tiny",
                                   "--max_seq_length", str(args.seq), "--per_device_train_batch_size", str(args.batch),
                                   "--max_train_steps", str(args.train_steps), "--logging_steps", "50",
                                   "--output_dir", str(out), "--overwrite_output_dir", "--cache_dir",
                                   str(Path(work) / "cache")])
            row = {"corpus_gb": written / 1e9, "data_peak_rss_mb": data_mb, "train_peak_rss_mb": train_mb,
                   "tokens_streamed": drained["tokens"], "blocks_streamed": drained["blocks"],
                   "data_seconds": drained["seconds"], "train_steps": args.train_steps}
            results.append(row)
            print(f"{row['corpus_gb']:.2f} GB: whole-file data pipeline peak {data_mb:,.0f} MB "
                  f"({drained['tokens']:,} tokens in {drained['seconds']:.0f} s); "
                  f"{args.train_steps}-step training run peak {train_mb:,.0f} MB", flush=True)
            corpus.unlink()
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"runs": results, "seq": args.seq, "batch": args.batch}, indent=2))
    return {"runs": results}


if __name__ == "__main__":
    main()
