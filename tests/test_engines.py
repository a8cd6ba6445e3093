"""Engines and machines through the real launcher: two "nodes" on one machine, FSDP2 and DeepSpeed ZeRO-2 on
2 gloo processes, a rank killed mid-run, torch.compile with cached features, and CPU threads per process.

Most of these take 20-60 s each and are marked `heavy`: `make test-all` (and CI) runs them, `make test` does not.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import REPO, free_port, run_script
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, pipeline

from tlnlp.core.config import FinetuneConfig
from tlnlp.core.engines import fill_deepspeed_config
from tlnlp.core.errors import UserInputError

heavy = pytest.mark.heavy
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
ACCELERATE_CONFIGS = REPO / "configs" / "accelerate"


def scratch_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["--train_file", str(corpus), "--output_dir", str(out), "--model_size", "tiny", "--hidden_size", "32",
            "--num_attention_heads", "2", "--intermediate_size", "64", "--vocab_size", "300", "--max_seq_length", "32",
            "--per_device_train_batch_size", "8", "--max_train_steps", "8", "--seed", "3", *extra]


def finetune_args(model: Path, files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(model), "--train_file", str(files["train"]), "--validation_file",
            str(files["validation"]), "--test_file", str(files["test"]), "--output_dir", str(out),
            "--max_seq_length", "32", "--per_device_train_batch_size", "8", "--num_train_epochs", "3", "--seed", "3",
            "--min_train_steps", "0", *extra]


def node_env(home: Path, **extra: str) -> dict[str, str]:
    """One "machine": its own TLNLP_HOME (node-local disk), gloo on the CPU, one thread (2 nodes share 2 cores)."""
    return {**os.environ, "TLNLP_HOME": str(home), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1", **extra}


def start_node(rank: int, port: int, script: str, args: list[str], home: Path) -> subprocess.Popen:
    launch = [*LAUNCH, "--multi_gpu", "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
              "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--mixed_precision", "no",
              "--dynamo_backend", "no", "--rdzv_backend", "static"]
    return subprocess.Popen([*launch, str(REPO / "scripts" / script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=node_env(home), cwd=REPO)


def run_two_nodes(script: str, args_per_node: list[list[str]], homes: list[Path], timeout: int = 300):
    port = free_port()
    nodes = [start_node(rank, port, script, args, home) for rank, (args, home) in enumerate(zip(args_per_node, homes))]
    outputs = [node.communicate(timeout=timeout)[0] for node in nodes]
    return [node.returncode for node in nodes], outputs


def eval_loss(folder: Path) -> float:
    return json.loads((folder / "all_results.json").read_text())["eval_loss"]


# ---------------------------------------------------------------------------------------------------------
# Several machines
# ---------------------------------------------------------------------------------------------------------


@heavy
def test_two_nodes_with_node_local_caches_match_a_single_node_run(corpus_file, labeled_files, tmp_path):
    """Stage 1 from scratch (tokenizer training included), then stage 2, as 2 machines x 1 process, each with
    its own TLNLP_HOME and a shared --output_dir: the same vocabulary everywhere and the same result as one
    machine with 2 processes."""
    homes = [tmp_path / "node0-home", tmp_path / "node1-home"]
    stage1 = tmp_path / "stage1-2nodes"
    codes, logs = run_two_nodes("pretrain_mlm.py", [scratch_args(corpus_file, stage1)] * 2, homes)
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    # Only the main process trained a vocabulary; node 1 was sent it and cached none of its own.
    assert list((homes[0] / "tokenizers").iterdir()) and not (homes[1] / "tokenizers").exists()
    assert (homes[1] / "tokenized").exists()  # node 1 tokenized once, into its own cache
    # The same run on one machine with 2 processes, which trains its own vocabulary: the same one.
    single = tmp_path / "stage1-single"
    done = run_script("pretrain_mlm.py", scratch_args(corpus_file, single), processes=2,
                      env={"TLNLP_HOME": str(tmp_path / "single-home")})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (stage1 / "tokenizer.json").read_text() == (single / "tokenizer.json").read_text()
    assert abs(eval_loss(stage1) - eval_loss(single)) < 1e-3

    stage2 = tmp_path / "stage2-2nodes"
    codes, logs = run_two_nodes("finetune_cls.py", [finetune_args(stage1, labeled_files, stage2)] * 2, homes)
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    single2 = tmp_path / "stage2-single"
    done = run_script("finetune_cls.py", finetune_args(stage1, labeled_files, single2), processes=2,
                      env={"TLNLP_HOME": str(tmp_path / "single-home")})
    assert done.returncode == 0, done.stderr[-3000:]
    two, one = json.loads((stage2 / "all_results.json").read_text()), json.loads((single2 / "all_results.json").read_text())
    assert two["eval_accuracy"] == one["eval_accuracy"] and two["test_accuracy"] == one["test_accuracy"]
    assert two["train_loss"] == pytest.approx(one["train_loss"], abs=1e-3)


@heavy
def test_data_is_prepared_first_by_the_main_process_then_once_per_machine(tmp_path):
    """2 machines x 2 processes: rank 0 alone first, then machine 1's first process alone, then the other two.
    (Accelerate's `main_process_first` lets all three others in at once: with node-local caches the two
    processes of machine 1 would prepare the same data together and race on one temporary folder.)"""
    port = free_port()
    launch = [*LAUNCH, "--multi_gpu", "--num_machines", "2", "--num_processes", "4", "--main_process_ip", "127.0.0.1",
              "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
              "--rdzv_backend", "static"]
    nodes = [subprocess.Popen([*launch, "--machine_rank", str(rank), str(REPO / "tests" / "node_order_probe.py"),
                               str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=node_env(tmp_path / f"home{rank}"), cwd=REPO) for rank in range(2)]
    logs = [node.communicate(timeout=180)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    spans = {r["rank"]: r for r in (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(4))}
    assert spans[2]["local_main"] and not spans[1]["local_main"] and not spans[3]["local_main"]
    assert spans[0]["left"] <= spans[2]["entered"]  # the main process first
    assert spans[2]["left"] <= min(spans[1]["entered"], spans[3]["entered"])  # then machine 1's first process


@heavy
def test_two_nodes_without_a_shared_output_dir_fail_fast(corpus_file, tmp_path):
    homes = [tmp_path / "node0-home", tmp_path / "node1-home"]
    args = [scratch_args(corpus_file, tmp_path / f"out-node{rank}") for rank in range(2)]
    started = time.time()
    codes, logs = run_two_nodes("pretrain_mlm.py", args, homes, timeout=120)
    assert codes[0] != 0 and codes[1] != 0
    assert "is not shared by the 2 machines" in logs[0] + logs[1]
    assert time.time() - started < 90
    assert not (tmp_path / "out-node0" / "model.safetensors").exists()


@heavy
def test_a_killed_rank_stops_the_survivor_and_the_run_resumes_bit_identically(corpus_file, tmp_path):
    """Machine 1's process is SIGKILLed after the first checkpoint: machine 0's process must exit (well within
    --ddp_timeout) with a message, and `--resume_from_checkpoint latest` ends with the weights of an unbroken run."""
    homes = [tmp_path / "node0-home", tmp_path / "node1-home"]
    common = scratch_args(corpus_file, tmp_path / "killed", "--max_train_steps", "30", "--checkpointing_steps", "10",
                          "--ddp_timeout", "60")
    port = free_port()
    nodes = [start_node(rank, port, "pretrain_mlm.py", common, home) for rank, home in enumerate(homes)]
    deadline = time.time() + 240
    checkpoints = tmp_path / "killed" / "checkpoints"
    while time.time() < deadline and not any((p / "trainer_state.json").exists() for p in checkpoints.glob("step_*")):
        assert nodes[0].poll() is None and nodes[1].poll() is None, "a node ended before the first checkpoint"
        time.sleep(0.05)
    workers = [p for p in psutil.Process(nodes[1].pid).children(recursive=True) if "pretrain_mlm.py" in " ".join(p.cmdline())]
    assert workers, "machine 1's training process was not found"
    killed_at = time.time()
    for worker in workers:
        worker.send_signal(signal.SIGKILL)
    survivor_log = nodes[0].communicate(timeout=120)[0]
    nodes[1].communicate(timeout=60)
    assert nodes[0].returncode != 0
    assert time.time() - killed_at < 60  # well within --ddp_timeout
    assert "another process of this run failed" in survivor_log, survivor_log[-3000:]
    assert not (tmp_path / "killed" / "model.safetensors").exists()

    straight = tmp_path / "straight"
    done = run_script("pretrain_mlm.py", scratch_args(corpus_file, straight, "--max_train_steps", "30",
                                                      "--tokenizer_name", str(next((homes[0] / "tokenizers").iterdir()))),
                      processes=2, env={"TLNLP_HOME": str(homes[0])})
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = run_script("pretrain_mlm.py", [*common, "--resume_from_checkpoint", "latest"], processes=2,
                         env={"TLNLP_HOME": str(homes[0])})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = load_file(straight / "model.safetensors"), load_file(tmp_path / "killed" / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


# ---------------------------------------------------------------------------------------------------------
# FSDP2 and DeepSpeed ZeRO-2 on 2 gloo processes
# ---------------------------------------------------------------------------------------------------------


def run_engine(config: str, script: str, args: list[str], wrapper: str, use_cpu: bool, precision: str = "no",
               timeout: int = 300) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file configs/accelerate/<config>` on 2 CPU processes, through a test-side
    wrapper that lets Accelerate take its FSDP or DeepSpeed path without a GPU (see the wrapper's docstring)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    if use_cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    launch = [*LAUNCH, "--config_file", str(ACCELERATE_CONFIGS / config), "--num_processes", "2",
              "--mixed_precision", precision, "--main_process_port", str(free_port())]
    return subprocess.run([*launch, str(REPO / "tests" / wrapper), str(REPO / "scripts" / script), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def check_classifier_output(out: Path, checkpoint: Path, frozen_layers: int) -> dict:
    """The saved classifier loads with stock classes, its frozen layers equal the checkpoint's, and its
    pipeline predicts one of the labels."""
    results = json.loads((out / "all_results.json").read_text())
    AutoModelForSequenceClassification.from_pretrained(out)  # loads with the stock class
    saved, original = load_file(out / "model.safetensors"), load_file(checkpoint / "model.safetensors")
    frozen = [k for k in original if any(f"encoder.layer.{i}." in k for i in range(frozen_layers))]
    assert frozen
    for name in frozen:  # (DeepSpeed bf16 keeps the weights themselves in bf16: compare at the saved precision)
        assert torch.equal(saved[name], original[name].to(saved[name].dtype)), name
    classify = pipeline("text-classification", model=str(out))
    assert classify("ball team goal match")[0]["label"] in results["label_names"]
    return results


@heavy
def test_fsdp_finetune_restores_the_best_model_and_saves_the_full_one(tiny_mlm_dir, labeled_files, tmp_path):
    out = tmp_path / "fsdp"
    # Evaluations every 3 steps and a high learning rate: the best is an early one, so the restore path runs.
    args = finetune_args(tiny_mlm_dir, labeled_files, out, "--freeze_layers", "1", "--learning_rate", "3e-3",
                         "--eval_steps", "3", "--restore_best_model", "true", "--cache_dir", str(tmp_path / "cache"))
    done = run_engine("fsdp.yaml", "finetune_cls.py", args, "fsdp_on_cpu.py", use_cpu=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "engine: FSDP" in done.stderr and "FSDP shard units: BertLayer" in done.stderr
    results = check_classifier_output(out, tiny_mlm_dir, frozen_layers=1)
    assert results["best_step"] < results["optimizer_steps"] and "Restored the best model" in done.stderr
    # The saved model is the restored best one (gathered at the best step), not the weights training ended with
    # (training went on after the best step, so those differ).
    saved, best = load_file(out / "model.safetensors"), load_file(out / "checkpoints" / "best" / "model.safetensors")
    assert saved.keys() <= best.keys()
    for name in saved:
        assert torch.equal(saved[name], best[name]), name


@heavy
def test_fsdp_pretrains_modernbert(corpus_file, tmp_path):
    out = tmp_path / "fsdp-mlm"
    args = scratch_args(corpus_file, out, "--architecture", "modernbert", "--cache_dir", str(tmp_path / "cache"))
    done = run_engine("fsdp.yaml", "pretrain_mlm.py", args, "fsdp_on_cpu.py", use_cpu=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FSDP shard units: ModernBertEncoderLayer" in done.stderr
    model, info = AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "ModernBertForMaskedLM" and not info["missing_keys"]
    assert torch.isfinite(torch.tensor(eval_loss(out)))


def needs_deepspeed():
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        pytest.skip("deepspeed is not installed: pip install -e .[deepspeed]")


@heavy
def test_deepspeed_zero2_follows_the_flags_and_saves_a_loadable_model(tiny_mlm_dir, labeled_files, tmp_path):
    needs_deepspeed()
    out = tmp_path / "zero2"
    args = finetune_args(tiny_mlm_dir, labeled_files, out, "--freeze_embeddings", "--freeze_layers", "1",
                         "--cache_frozen_features", "--gradient_accumulation_steps", "2", "--max_grad_norm", "0.5",
                         "--cache_dir", str(tmp_path / "cache"))
    # bf16: DeepSpeed casts the weights themselves, so the cached fp32 features must be cast to meet them.
    done = run_engine("deepspeed_zero2.yaml", "finetune_cls.py", args, "deepspeed_on_cpu.py", use_cpu=False,
                      precision="bf16")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "engine: DEEPSPEED" in done.stderr and "mismatch" not in done.stderr
    results = check_classifier_output(out, tiny_mlm_dir, frozen_layers=1)
    # 180 examples over 2 processes in batches of 8: 12 batches per process per epoch, 2 per optimizer step.
    assert results["optimizer_steps"] == 3 * 6 and results["global_batch_size"] == 32

    refused = run_engine("deepspeed_zero2.yaml", "finetune_cls.py", finetune_args(
        tiny_mlm_dir, labeled_files, tmp_path / "refused", "--unfreeze_schedule", "epoch"), "deepspeed_on_cpu.py",
        use_cpu=False)
    assert refused.returncode != 0 and "--unfreeze_schedule does not work under DeepSpeed" in refused.stderr
    assert not (tmp_path / "refused" / "model.safetensors").exists()
    averaged = run_engine("deepspeed_zero2.yaml", "finetune_cls.py", finetune_args(
        tiny_mlm_dir, labeled_files, tmp_path / "averaged", "--average_last_epochs", "1"), "deepspeed_on_cpu.py",
        use_cpu=False)
    assert averaged.returncode != 0 and "--average_last_epochs is not supported under DeepSpeed" in averaged.stderr
    assert not (tmp_path / "averaged" / "model.safetensors").exists()


def test_deepspeed_config_takes_the_flags_or_refuses_a_conflict(tmp_path):
    cfg = FinetuneConfig(output_dir=str(tmp_path), gradient_accumulation_steps=4, max_grad_norm=0.5,
                         per_device_train_batch_size=8)
    ds_config = {"gradient_accumulation_steps": "auto", "zero_optimization": {"stage": 2}}
    fill_deepspeed_config(cfg, ds_config, num_processes=2)
    assert ds_config["gradient_accumulation_steps"] == 4 and ds_config["gradient_clipping"] == 0.5
    assert ds_config["train_micro_batch_size_per_gpu"] == 8 and ds_config["train_batch_size"] == 64
    with pytest.raises(UserInputError, match=r"sets gradient_accumulation_steps: 1, but --gradient_accumulation_steps "
                                             r"is 4.*Set gradient_accumulation_steps: auto"):
        fill_deepspeed_config(cfg, {"gradient_accumulation_steps": 1}, num_processes=2)
    with pytest.raises(UserInputError, match=r"sets gradient_clipping: 1.0, but --max_grad_norm is 0.5"):
        fill_deepspeed_config(cfg, {"gradient_clipping": 1.0}, num_processes=2)


# ---------------------------------------------------------------------------------------------------------
# torch.compile and CPU threads
# ---------------------------------------------------------------------------------------------------------


@heavy
def test_compiled_model_with_cached_features_saves_a_plain_classifier(tiny_mlm_dir, labeled_files, tmp_path):
    out = tmp_path / "compiled"
    done = run_script("finetune_cls.py", finetune_args(
        tiny_mlm_dir, labeled_files, out, "--freeze_embeddings", "--freeze_layers", "1", "--cache_frozen_features",
        "--torch_compile", "--num_train_epochs", "1", "--cache_dir", str(tmp_path / "cache")), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(model).__name__ == "BertForSequenceClassification"


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to tell 1 thread from all")
def test_accelerate_launch_on_cpu_uses_every_core(tiny_mlm_dir, labeled_files, tmp_path):
    """Without --cpu and a GPU, `accelerate launch` gives each process OMP_NUM_THREADS=1; tlnlp restores
    cores / local processes unless the user set OMP_NUM_THREADS."""
    cores = len(os.sched_getaffinity(0))

    def args(out: str) -> list[str]:
        return finetune_args(tiny_mlm_dir, labeled_files, tmp_path / out, "--max_train_steps", "2",
                             "--cache_dir", str(tmp_path / "cache"))

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "ACCELERATE_USE_CPU")}
    launch = [*LAUNCH, "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    done = subprocess.run([*launch, str(REPO / "scripts" / "finetune_cls.py"), *args("threads")], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"CPU threads per process: {cores}" in done.stderr
    chosen = subprocess.run([*launch, str(REPO / "scripts" / "finetune_cls.py"), *args("chosen")], capture_output=True,
                            text=True, env={**env, "OMP_NUM_THREADS": "1"}, cwd=REPO, timeout=300)
    assert chosen.returncode == 0, chosen.stderr[-3000:]
    assert "CPU threads per process" not in chosen.stderr  # the user's own OMP_NUM_THREADS=1 is kept


def test_a_one_thread_choice_outside_a_launcher_is_kept():
    """`OMP_NUM_THREADS=1 python scripts/...` is the user's own choice: only a launcher's default is undone."""
    code = ("from accelerate import Accelerator; from tlnlp.core.engines import set_cpu_threads; import torch; "
            "print(set_cpu_threads(Accelerator(cpu=True)), torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "TORCHELASTIC_"))}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**env, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["None", "1"]
