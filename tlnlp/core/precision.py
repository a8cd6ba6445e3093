"""The precision policy and the Accelerator: bf16 where the hardware computes it fast, else fp32."""

from __future__ import annotations

import datetime
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, TorchDynamoPlugin

from tlnlp.core.config import TrainingConfig
from tlnlp.core.errors import UserInputError


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX). Elsewhere oneDNN emulates
    bf16 through fp32 conversions, slower than plain fp32, so autocast would cost time instead of saving it."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # a torch without the probes: assume emulation
        return False


def resolve_mixed_precision(choice: str) -> str:
    """--mixed_precision auto: the launcher's choice if it made one, else bf16 where the hardware computes it
    fast (a GPU that supports it, or a CPU with AVX512-BF16/AMX when no GPU is used), else fp32."""
    if choice != "auto":
        return choice
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launched != "no":
        return launched
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if not use_cpu and (torch.cuda.is_available() or torch.backends.mps.is_available()):
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_has_fast_bf16() else "no"


def make_accelerator(cfg: TrainingConfig) -> Accelerator:
    """Devices come from `accelerate config`/`accelerate launch`; nothing is needed for CPU."""
    return Accelerator(
        mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=cfg.report_to if cfg.with_tracking else None,
        project_dir=cfg.output_dir,
        # Seeded shuffling: the same seed gives the same data order, also after a resume.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # The loop steps the schedule once per optimizer step itself. A prepared scheduler is saved in
        # checkpoints as plain numbers (loaded with weights_only=True), unlike a registered custom object.
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.ddp_timeout))],
        # Dynamic shapes: batches vary in length (dynamic padding), which would otherwise recompile per length.
        dynamo_plugin=TorchDynamoPlugin(backend="inductor", dynamic=True) if cfg.torch_compile else None,
    )


def fit_accelerator_to(accelerator: Accelerator, cfg: TrainingConfig) -> None:
    """A recipe's later run on the process's one Accelerator: its own gradient accumulation; a precision or
    compilation other than the Accelerator's is refused (they are fixed when it is made)."""
    accelerator.gradient_accumulation_steps = cfg.gradient_accumulation_steps
    precision = resolve_mixed_precision(cfg.mixed_precision)
    compiled = accelerator.state.dynamo_plugin.backend.value.lower() != "no"
    if precision != accelerator.mixed_precision or cfg.torch_compile != compiled:
        raise UserInputError(
            f"Runs that share one process share its precision and compilation: this run asks for --mixed_precision "
            f"{precision} and torch_compile {cfg.torch_compile}, the first run used {accelerator.mixed_precision} "
            f"and {compiled}. Give every run the same --mixed_precision and --torch_compile."
        )
