"""Tiny models and data made here: nothing is downloaded from the Hub."""

from __future__ import annotations

import csv
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import BertConfig, BertForMaskedLM, BertModel, ModernBertConfig

from tlnlp.models.modeling import train_wordpiece

REPO = Path(__file__).resolve().parent.parent
TOPICS = {
    "sports": "ball team goal match player coach league score win season stadium".split(),
    "music": "song band guitar album concert singer melody drum piano chorus tune".split(),
    "science": "atom cell energy theory experiment physics molecule data lab gene quantum".split(),
}
COMMON = "the a of and in on with for is was to by at from this that it".split()


def pytest_configure(config):
    """Under pytest-xdist each worker trains in-process with one torch thread: two workers with torch's default
    of one thread per core would run four threads on two cores. (Subprocess runs set OMP_NUM_THREADS=1 already;
    os.environ is left alone, so the tests of the launcher's thread count still see the user's environment.)"""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """The `heavy` runs first (a stable sort): under `-n 2` the longest runs then overlap one another, and the
    many short tests fill both workers at the end, not one worker left running a long test alone."""
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one state per process, and an Accelerator made with other settings (a bf16 run, say)
    refuses to start while an earlier test's state is alive: each test ends by clearing it, so no test depends
    on which tests ran before it in the same worker."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def one_thread_subprocesses(monkeypatch):
    """For a test whose subprocess trains MiniLM: one thread, as `run_script` gives every launch. At torch's
    default of a thread per core it meets the other test worker's run on the same two cores; so oversubscribed,
    the README example took 498 s in a test-all run against 46 s alone (Intel Xeon, AMX)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def make_sentence(rng: random.Random, topic: str, words: int = 12) -> str:
    return " ".join(rng.choice(TOPICS[topic]) if rng.random() < 0.6 else rng.choice(COMMON) for _ in range(words))


def make_documents(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    topics = sorted(TOPICS)
    return [(topic := topics[i % len(topics)], make_sentence(rng, topic, rng.randint(6, 30))) for i in range(n)]


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """Unlabeled text, one document per line."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(text for _, text in make_documents(400)) + "\n")
    return path


def write_labeled(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="session")
def labeled_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("labeled")
    docs = make_documents(300, seed=1)
    rows = [{"text": text, "label": topic} for topic, text in docs]
    return {
        "train": write_labeled(folder / "train.csv", rows[:180]),
        "validation": write_labeled(folder / "validation.csv", rows[180:240]),
        "test": write_labeled(folder / "test.csv", rows[240:]),
    }


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    tokenizer = train_wordpiece((text for _, text in make_documents(400)), vocab_size=200)
    return tokenizer


def tiny_bert_config(vocab_size: int, layers: int = 2) -> BertConfig:
    return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                      intermediate_size=37, max_position_embeddings=128)


def tiny_modernbert_config(vocab_size: int, layers: int = 2) -> ModernBertConfig:
    return ModernBertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                            intermediate_size=24, max_position_embeddings=128, pad_token_id=0, cls_token_id=2,
                            sep_token_id=3, bos_token_id=None, eos_token_id=None)


@pytest.fixture(scope="session")
def tiny_mlm_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved BertForMaskedLM with its tokenizer: a stand-in for a stage 1 output."""
    folder = tmp_path_factory.mktemp("tiny_mlm")
    import torch

    torch.manual_seed(0)
    BertForMaskedLM(tiny_bert_config(len(tiny_tokenizer))).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def headless_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved encoder without an MLM head, as minilm-l6 is shipped."""
    import torch

    folder = tmp_path_factory.mktemp("headless")
    torch.manual_seed(0)
    BertModel(tiny_bert_config(len(tiny_tokenizer)), add_pooling_layer=True).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(script: str, args: list[str], processes: int = 1, timeout: int = 300,
               wrapper: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a real script through `accelerate launch` (2 processes: CPU data parallel over gloo)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    target = str(wrapper) if wrapper else str(REPO / "scripts" / script)
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    if processes > 1:
        # `--cpu --num_processes 2` silently runs one process; `--multi_gpu` with ACCELERATE_USE_CPU runs two.
        launch += ["--multi_gpu", "--num_processes", str(processes), "--main_process_port", str(free_port())]
    else:
        launch += ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return subprocess.run(launch + [target, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=REPO)
