"""SIGKILL a real run mid-epoch, resume with `latest`: the weights equal an uninterrupted run's."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file


def start(script, args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "scripts" / script), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)


def kill_after_checkpoint(script, args, folder, timeout=120):
    process = start(script, args)
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if any((p / "trainer_state.json").exists() for p in (folder / "checkpoints").glob("step_*")):
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"


@pytest.mark.parametrize("stage", ["pretrain", "finetune", "finetune-cached"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(stage, corpus_file, labeled_files, tiny_mlm_dir, tmp_path):
    if stage == "pretrain":
        script = "pretrain_mlm.py"
        common = ["--train_file", str(corpus_file), "--model_size", "tiny", "--hidden_size", "32",
                  "--num_attention_heads", "2", "--intermediate_size", "64", "--vocab_size", "200",
                  "--max_seq_length", "32", "--per_device_train_batch_size", "4", "--num_train_epochs", "3"]
    else:
        script = "finetune_cls.py"
        common = ["--model_name_or_path", str(tiny_mlm_dir), "--train_file", str(labeled_files["train"]),
                  "--validation_file", str(labeled_files["validation"]), "--per_device_train_batch_size", "4",
                  "--max_seq_length", "32", "--num_train_epochs", "4", "--min_train_steps", "0"]
        if stage == "finetune-cached":  # resumes recompute the cached features; the weights must still agree
            common += ["--freeze_embeddings", "--freeze_layers", "1", "--cache_frozen_features"]
    common += ["--cache_dir", str(tmp_path / "cache"), "--checkpointing_steps", "20", "--seed", "5"]
    straight = subprocess.run([sys.executable, str(REPO / "scripts" / script), *common, "--output_dir",
                               str(tmp_path / "straight")], capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-2000:]

    killed = tmp_path / "killed"
    kill_after_checkpoint(script, [*common, "--output_dir", str(killed)], killed)
    assert not (killed / "model.safetensors").exists()  # killed mid-run, before the final save
    resumed = subprocess.run([sys.executable, str(REPO / "scripts" / script), *common, "--output_dir", str(killed),
                              "--resume_from_checkpoint", "latest"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, got = load_file(tmp_path / "straight" / "model.safetensors"), load_file(killed / "model.safetensors")
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
