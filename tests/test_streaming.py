"""Streaming over processes and loader workers: each document tokenized once, equal batches per process,
validation never trained on, O(1) resume, and a training loop that never waits for the device per micro-batch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import REPO, make_documents, run_script
from safetensors.torch import load_file
from transformers import AutoTokenizer

import tlnlp.core.loop
import tlnlp.data.streaming
import tlnlp.pretrain
import tlnlp.stage1.pretrain
from tlnlp.core.config import PretrainConfig, parse_config
from tlnlp.core.errors import UserInputError
from tlnlp.data.prepare import sequence_lengths


def numbered_documents(n: int, seed: int = 21) -> list[str]:
    return [f"document {i}: {text}" for i, (_, text) in enumerate(make_documents(n, seed=seed))]


def doc_id(text: str) -> int:
    return int(text.split(":")[0].split()[1])


def run_main(args: list[str]) -> dict:
    AcceleratorState._reset_state(reset_partial_state=True)
    return tlnlp.pretrain.main(parse_config(PretrainConfig, args))


def tiny(corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["--train_file", str(corpus), "--output_dir", str(out), "--model_size", "tiny", "--hidden_size", "32",
            "--num_attention_heads", "2", "--intermediate_size", "64", "--vocab_size", "200", "--max_seq_length",
            "32", "--per_device_train_batch_size", "4", "--streaming", "--seed", "9", *extra]


@pytest.mark.slow
def test_two_processes_with_two_workers_tokenize_each_document_once(tmp_path):
    """596 documents in 3 uneven files (more shards than processes); the first 500 are the validation head.
    Over exactly one pass, 2 processes x 2 workers train on each of the other 96 once, and every document
    is tokenized by one worker of one process only."""
    docs = numbered_documents(596)
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name, (start, stop) in {"a": (0, 150), "b": (150, 550), "c": (550, 596)}.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[start:stop]))
    out, reports = tmp_path / "out", tmp_path / "reports"
    reports.mkdir()
    args = ["--dataset_name", str(folder), "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"),
            "--model_size", "tiny", "--hidden_size", "32", "--num_attention_heads", "2", "--intermediate_size", "64",
            "--vocab_size", "300", "--streaming", "--line_by_line", "--max_seq_length", "64",
            "--per_device_train_batch_size", "4", "--max_train_steps", "12", "--dataloader_num_workers", "2"]
    # 96 training documents = 4 slots x 24 = 2 processes x 12 batches of 4: exactly one pass in 12 steps.
    done = run_script("", [str(reports), "pretrain", *args], processes=2, wrapper=REPO / "tests" / "rank_report.py")
    assert done.returncode == 0, done.stderr[-3000:]
    tokenizer = AutoTokenizer.from_pretrained(out)
    seen = [[tokenizer.decode(ids, skip_special_tokens=True) for ids in json.loads((reports / f"rows{r}.json").read_text())]
            for r in range(2)]
    assert len(seen[0]) == len(seen[1]) == 48  # equal batches per process
    assert sorted(doc_id(t) for t in seen[0] + seen[1]) == list(range(500, 596))  # each once; no validation doc
    tokenized_by: dict[int, set[str]] = {}
    for file in reports.glob("tokenized-*.txt"):
        for line in file.read_text().splitlines():
            tokenized_by.setdefault(doc_id(line), set()).add(file.stem)
    assert set(tokenized_by) == set(range(500, 596))  # the validation head is never tokenized for training
    assert all(len(workers) == 1 for workers in tokenized_by.values())  # one worker of one process per document
    assert len(set().union(*tokenized_by.values())) == 4  # 2 processes x 2 workers shared the work


def test_a_resumed_stream_redoes_o1_work_and_ends_bit_identical(tmp_path, monkeypatch):
    corpus, validation = tmp_path / "corpus.txt", tmp_path / "validation.txt"
    corpus.write_text("\n".join(numbered_documents(3000)) + "\n")
    validation.write_text("\n".join(t for _, t in make_documents(40, seed=3)) + "\n")
    monkeypatch.setattr(tlnlp.data.streaming, "GROUP_DOCS", 8)  # small groups: the bound below is then tight
    counter = tmp_path / "tokenized.txt"
    original = tlnlp.stage1.pretrain.mlm_rows

    def counting_rows(texts, *args, **kwargs):  # runs in the loader workers: count through a file
        with counter.open("a") as f:
            f.write("".join(f"{doc_id(t)}\n" for t in texts))
        return original(texts, *args, **kwargs)

    monkeypatch.setattr(tlnlp.stage1.pretrain, "mlm_rows", counting_rows)
    common = ["--validation_file", str(validation), "--cache_dir", str(tmp_path / "cache"), "--max_train_steps", "30",
              "--dataloader_num_workers", "2", "--logging_steps", "5"]
    run_main(tiny(corpus, tmp_path / "straight", *common, "--checkpointing_steps", "20"))
    straight_work = len(counter.read_text().splitlines())
    counter.unlink()
    run_main(tiny(corpus, tmp_path / "resumed", *common, "--resume_from_checkpoint",
                  str(tmp_path / "straight" / "checkpoints" / "step_00000020")))
    resumed_work = len(counter.read_text().splitlines())
    # Each worker re-tokenizes its current group and prefetches a few more: a constant, not the 20 steps before.
    slots, prefetched_groups = 2, 4
    assert resumed_work <= slots * 8 * (1 + prefetched_groups) < straight_work
    expected, got = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_too_small_a_stream_is_named_before_training(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(numbered_documents(501)) + "\n")
    with pytest.raises(UserInputError, match=r"holds 501 document\(s\); it needs at least 502: 500 held out"):
        run_main(tiny(corpus, tmp_path / "run", "--max_train_steps", "2", "--dataloader_num_workers", "2",
                      "--cache_dir", str(tmp_path / "cache")))
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_the_loop_does_not_wait_for_the_device_per_micro_batch(tmp_path, monkeypatch):
    """No `.item()` and no `bool(tensor)` in tlnlp's code while a micro-batch is processed: on a GPU each
    would wait for the queued work (the loss is checked for NaN on the device, read once per log window)."""
    calls: list[str] = []
    inside = {"step": False}
    item, to_bool = torch.Tensor.item, torch.Tensor.__bool__

    def record(name):
        frame = sys._getframe(2)
        if inside["step"] and "/tlnlp/" in frame.f_code.co_filename:
            calls.append(f"{name} in {frame.f_code.co_filename}:{frame.f_lineno}")

    def counting_item(self):
        record("item")
        return item(self)

    def counting_bool(self):
        record("bool")
        return to_bool(self)

    train_step = tlnlp.core.loop.Trainer._train_step

    def watched_step(self, batch):
        inside["step"] = True
        try:
            return train_step(self, batch)
        finally:
            inside["step"] = False

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    monkeypatch.setattr(torch.Tensor, "__bool__", counting_bool)
    monkeypatch.setattr(tlnlp.core.loop.Trainer, "_train_step", watched_step)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(t for _, t in make_documents(300)) + "\n")
    args = tiny(corpus, tmp_path / "run", "--max_train_steps", "8", "--cache_dir", str(tmp_path / "cache"),
                "--gradient_accumulation_steps", "2")
    args.remove("--streaming")
    results = run_main(args)
    assert results["optimizer_steps"] == 8
    assert calls == []


def test_line_lengths_come_from_arrow():
    from datasets import Dataset

    data = Dataset.from_dict({"input_ids": [[1, 2, 3], [4], [5, 6]]}).select([2, 0, 1])
    assert sequence_lengths(data) == [2, 3, 1]
