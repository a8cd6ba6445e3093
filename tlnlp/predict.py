"""`python -m tlnlp.predict`: classify texts with a fine-tuned model (tlnlp.stage2.inference)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

import tlnlp  # noqa: F401  (registers tlnlp's classifier class, so custom heads need no remote code)
from tlnlp.core.errors import UserInputError
from tlnlp.stage2.inference import predict_texts, read_texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Classify texts with a fine-tuned model; writes JSON lines.")
    parser.add_argument("--model", required=True, help="Output folder of finetune_cls.py, or a Hub model id.")
    parser.add_argument("--input", required=True, help=".txt (one text per line), .csv, .jsonl, or - for stdin.")
    parser.add_argument("--output", default="-", help="Where the JSON lines go (default: standard output).")
    parser.add_argument("--text_column", default="text", help="Column with the text, for .csv/.jsonl input.")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_length", type=int, help="Truncate texts to this many tokens.")
    parser.add_argument("--trust_remote_code", action="store_true", help="Allow code shipped with the model to run.")
    args = parser.parse_args(argv)
    try:
        texts = read_texts(args.input, args.text_column)
        sink = contextlib.nullcontext(sys.stdout) if args.output == "-" else open(args.output, "w", encoding="utf-8")
        with sink as out:
            for row in predict_texts(args.model, texts, args.batch_size, args.max_length, args.trust_remote_code,
                                     progress=args.output != "-"):
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
