"""What each way of launching needs: CPU threads under `accelerate launch`, DeepSpeed and FSDP settings
reconciled with tlnlp's flags, and multi-node runs (data prepared once per machine, one vocabulary for
every rank, an output folder that all machines share)."""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list
from torch import nn
from transformers import PreTrainedModel

from tlnlp.core.config import TrainingConfig
from tlnlp.core.errors import UserInputError
from tlnlp.models.modeling import encoder_parts

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# CPU threads
# ---------------------------------------------------------------------------------------------------


def _launcher_environment() -> dict[str, str] | None:
    """The environment the launcher itself started with (what the user set), or None if unknown.

    `accelerate launch` (and torchrun) set OMP_NUM_THREADS=1 in the children when the user set nothing;
    the parent's initial environment, which /proc keeps unchanged, tells a forced 1 from a chosen one.
    """
    try:
        raw = Path(f"/proc/{os.getppid()}/environ").read_bytes()
    except OSError:
        return None
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {key.decode(errors="replace"): value.decode(errors="replace") for key, value in pairs}


def set_cpu_threads(accelerator: Accelerator) -> int | None:
    """On CPU, undo the launcher's one-thread default: cores / processes on this machine.

    Without a GPU, `accelerate launch` gives every process OMP_NUM_THREADS=1: fine-tuning ran at 0.61x plain
    `python` on 2 cores (benchmarks/launch_threads.py). An OMP_NUM_THREADS the user set (or TLNLP_NUM_THREADS) wins.
    Returns the thread count set, or None when nothing was changed.
    """
    if accelerator.device.type != "cpu":
        return None
    if "TLNLP_NUM_THREADS" in os.environ:
        threads = int(os.environ["TLNLP_NUM_THREADS"])
    else:
        launched = "ACCELERATE_DYNAMO_BACKEND" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ
        if os.environ.get("OMP_NUM_THREADS") != "1" or not launched:
            return None  # (`OMP_NUM_THREADS=1 python ...` from a shell is the user's own choice)
        launcher = _launcher_environment()
        if launcher is None or "OMP_NUM_THREADS" in launcher:
            return None  # the user asked for one thread, or we cannot tell
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        threads = max(1, len(os.sched_getaffinity(0)) // max(local_processes, 1))
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
        logger.info("CPU threads per process: %d (cores / processes on this machine; set TLNLP_NUM_THREADS to "
                    "choose).", threads)
    return threads


# ---------------------------------------------------------------------------------------------------
# DeepSpeed and FSDP
# ---------------------------------------------------------------------------------------------------


def uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def uses_fsdp(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def check_engine(cfg: TrainingConfig, accelerator: Accelerator) -> None:
    """Refuse option combinations an engine cannot honour, and make DeepSpeed follow the flags."""
    if uses_deepspeed(accelerator):
        if getattr(cfg, "unfreeze_schedule", None):
            raise UserInputError(
                "--unfreeze_schedule does not work under DeepSpeed: DeepSpeed takes the optimizer step inside "
                "backward(), before tlnlp could drop the gradients of layers still waiting to thaw. Use DDP or "
                "FSDP (configs/accelerate/ddp_gpus.yaml, fsdp.yaml), or freeze with --freeze_layers instead."
            )
        fill_deepspeed_config(cfg, accelerator.state.deepspeed_plugin.deepspeed_config, accelerator.num_processes)
    if uses_fsdp(accelerator) and accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise UserInputError(
            "tlnlp runs FSDP as FSDP2 (PyTorch's fully_shard), which Accelerate recommends; this config asks for "
            "fsdp_version 1. Set fsdp_version: 2 in the Accelerate config (see configs/accelerate/fsdp.yaml)."
        )
    if (uses_deepspeed(accelerator) or uses_fsdp(accelerator)) and getattr(cfg, "average_last_epochs", 0):
        raise UserInputError(
            f"--average_last_epochs is not supported under {'DeepSpeed' if uses_deepspeed(accelerator) else 'FSDP'}: "
            "the engine shards the weights (or keeps them in low precision) where the average would be taken. "
            "Use DDP (configs/accelerate/ddp_gpus.yaml) or one process, or drop --average_last_epochs."
        )
    if uses_fsdp(accelerator) and getattr(cfg, "cache_frozen_features", False):
        raise UserInputError(
            "--cache_frozen_features does not work under FSDP: the cached features bypass the sharded embedding "
            "and bottom layers that FSDP gathers. Drop --cache_frozen_features (freezing still works), or use "
            "DDP (configs/accelerate/ddp_gpus.yaml)."
        )


def fill_deepspeed_config(cfg: TrainingConfig, ds_config: dict[str, Any], num_processes: int) -> None:
    """DeepSpeed reads accumulation, clipping and micro-batch size from its own config; tlnlp sizes the
    schedule and batches from the flags. 'auto' (or absent) takes the flag; a different number is refused.
    (Left to Accelerate, clipping 'auto' became 1.0 whatever --max_grad_norm said.)"""
    wanted = {
        "gradient_accumulation_steps": ("--gradient_accumulation_steps", cfg.gradient_accumulation_steps),
        "gradient_clipping": ("--max_grad_norm", float(cfg.max_grad_norm)),
        "train_micro_batch_size_per_gpu": ("--per_device_train_batch_size", cfg.per_device_train_batch_size),
    }
    for key, (flag, value) in wanted.items():
        found = ds_config.get(key, "auto")
        if found == "auto":
            ds_config[key] = value
        elif float(found) != float(value):
            raise UserInputError(
                f"The DeepSpeed config sets {key}: {found}, but {flag} is {value}. DeepSpeed would use its own "
                f"value while tlnlp sizes the schedule and batches from {flag}. Set {key}: auto in the DeepSpeed "
                f"config (tlnlp then fills in {flag}), or make the two equal."
            )
    ds_config["train_batch_size"] = (  # what DeepSpeed checks the three above against
        cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * num_processes
    )


def prepare_for_engine(accelerator: Accelerator, model: nn.Module) -> None:
    """FSDP shards each encoder layer as its own unit: name the model's layer class (BertLayer,
    ModernBertEncoderLayer, ...), so one FSDP config serves every encoder. Not the embeddings, which
    Accelerate already shards apart (wrapping them twice fails)."""
    if not uses_fsdp(accelerator) or accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap:
        return
    encoder = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    try:
        _, layers = encoder_parts(encoder)
    except (UserInputError, AttributeError):  # another layout: Accelerate's own default applies
        return
    accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = sorted({type(layer).__name__ for layer in layers})
    logger.info("FSDP shard units: %s", ", ".join(accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap))


# ---------------------------------------------------------------------------------------------------
# Several machines
# ---------------------------------------------------------------------------------------------------


def machines(accelerator: Accelerator) -> int:
    local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    return max(1, accelerator.num_processes // max(local, 1))


@contextlib.contextmanager
def first_on_each_node(accelerator: Accelerator) -> Iterator[None]:
    """The global main process runs the block first, then the first process of every other machine, then
    the rest. Caches may then be node-local (each machine prepares its own once) or shared (later
    machines find the main process's result); no two processes of a machine write the same folder.

    Accelerate's `main_process_first` waits only for global rank 0: with node-local caches every process
    of the other machines would prepare the data at once and race on the same temporary folder.
    """
    if accelerator.num_processes == 1:
        yield
    elif accelerator.is_main_process:  # two barriers each, in this order: main, other machines' first, rest
        yield
        accelerator.wait_for_everyone()
        accelerator.wait_for_everyone()
    elif accelerator.is_local_main_process:
        accelerator.wait_for_everyone()
        yield
        accelerator.wait_for_everyone()
    else:
        accelerator.wait_for_everyone()
        accelerator.wait_for_everyone()
        yield


def from_main_process(accelerator: Accelerator, value: Any) -> Any:
    """The main process's `value` on every rank (e.g. a tokenizer trained once, as JSON)."""
    if accelerator.num_processes == 1:
        return value
    box = [value if accelerator.is_main_process else None]
    broadcast_object_list(box, from_process=0)
    return box[0]


def check_shared_output_dir(accelerator: Accelerator, output_dir: Path) -> None:
    """Several machines: --output_dir must be storage they all see (checkpoints and the final model are
    written once, by the main process, and every rank reads checkpoints on resume). Caches may be local."""
    if machines(accelerator) == 1:
        return
    name = None
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        name = f".tlnlp-shared-{uuid.uuid4().hex}"
        (output_dir / name).write_text(name)
    probe = output_dir / from_main_process(accelerator, name)  # each rank looks in its own --output_dir
    sees = torch.tensor([float(probe.exists() and probe.read_text() == probe.name)], device=accelerator.device)
    all_see = accelerator.reduce(sees, "sum").item() == accelerator.num_processes
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        probe.unlink()
    if not all_see:
        raise UserInputError(
            f"--output_dir {output_dir} is not shared by the {machines(accelerator)} machines of this run: some "
            "processes cannot see a file the main process wrote there. Checkpoints and the final model are "
            "written once, by the main process, and read by every process on resume, so put --output_dir on "
            "storage every machine mounts (NFS, Lustre, ...). Caches (--cache_dir, TLNLP_HOME) may stay local."
        )


# ---------------------------------------------------------------------------------------------------
# Whole-model weights, whatever the engine
# ---------------------------------------------------------------------------------------------------


def unwrap(accelerator: Accelerator, model: nn.Module) -> nn.Module:
    """The plain module: no DDP/DeepSpeed wrapper and no torch.compile wrapper (whose state-dict keys
    carry an `_orig_mod.` prefix and which has no `save_pretrained`)."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def gather_state_dict(accelerator: Accelerator, model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict. Every rank must call it (FSDP gathers the shards); with FSDP only the main
    process's copy is complete."""
    if uses_fsdp(accelerator) or uses_deepspeed(accelerator):
        return accelerator.get_state_dict(model)
    return unwrap(accelerator, model).state_dict()


def load_full_state_dict(accelerator: Accelerator, model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a full (unsharded) state dict into the prepared model on every rank. Under FSDP2 each rank cuts
    its own shard out of the full tensor (every rank holds it, so no communication is needed)."""
    if uses_fsdp(accelerator):
        from torch.distributed.tensor import DTensor, distribute_tensor

        current = model.state_dict()
        state_dict = {
            key: distribute_tensor(value.to(current[key].device), current[key].device_mesh, current[key].placements,
                                   src_data_rank=None) if isinstance(current.get(key), DTensor) else value
            for key, value in state_dict.items()
        }
        model.load_state_dict(state_dict)
        return
    unwrap(accelerator, model).load_state_dict(state_dict)
