"""Batched inference with a fine-tuned classifier (local folder, built-in or Hub id)."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm
from transformers import pipeline

import tlnlp.models.classifier  # noqa: F401  (registers tlnlp's classifier class, so custom heads need no remote code)
from tlnlp.core.errors import UserInputError
from tlnlp.core.terminal import progress_bars


def read_texts(path: str, text_column: str) -> list[str]:
    """Texts from .txt (one per line), .csv or .jsonl, or '-' for standard input (one per line)."""
    if path == "-":
        return [line.rstrip("\n") for line in sys.stdin if line.strip()]
    file = Path(path)
    if not file.is_file():
        raise UserInputError(f"--input {path}: no such file.")
    if file.suffix == ".csv":
        with file.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    elif file.suffix in (".jsonl", ".json"):
        rows = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        return [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if rows and text_column not in rows[0]:
        raise UserInputError(
            f"--text_column {text_column!r} is not in {path}. Columns found: {', '.join(rows[0])}."
        )
    return [str(row[text_column]) for row in rows]


def predict_texts(model: str, texts: list[str], batch_size: int = 32, max_length: int | None = None,
                  trust_remote_code: bool = False, progress: bool = True) -> Iterator[dict]:
    classify = pipeline("text-classification", model=model, top_k=None, trust_remote_code=trust_remote_code)
    kwargs = {"truncation": True, **({"max_length": max_length} if max_length else {})}
    bar = tqdm(total=len(texts), disable=not (progress and progress_bars()), desc="Predicting", unit="text")
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        for text, scores in zip(chunk, classify(chunk, batch_size=batch_size, **kwargs)):
            best = max(scores, key=lambda s: s["score"])
            yield {"text": text, "label": best["label"], "probabilities": {s["label"]: s["score"] for s in scores}}
        bar.update(len(chunk))
    bar.close()
