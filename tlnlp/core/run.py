"""A run's start and end: the checks before any work, Accelerate and logging, and at the end the results,
model card, Hub push and a clean teardown."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from tlnlp.core import engines
from tlnlp.core.checkpoints import CHECKPOINTS, STATE_FILE, latest_checkpoint
from tlnlp.core.config import TrainingConfig
from tlnlp.core.errors import UserInputError
from tlnlp.core.outputs import setup_logging, write_run_files
from tlnlp.core.precision import make_accelerator
from tlnlp.hub import repo as hub

logger = logging.getLogger(__name__)


def check_output_dir(cfg: TrainingConfig) -> None:
    """Refuse to write over an earlier run unless asked to, before anything is loaded or written."""
    if cfg.preprocess_only:
        return  # writes only tokenized data
    output_dir = Path(cfg.output_dir)
    existing = next((p for p in (output_dir, *output_dir.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UserInputError(
            f"--output_dir {output_dir}: {existing} is a file, not a folder. Give a folder path (it is created if "
            "missing), or move the file."
        )
    if cfg.resume_from_checkpoint:
        if cfg.resume_from_checkpoint == "latest":
            if latest_checkpoint(output_dir) is None:
                raise UserInputError(
                    f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir / CHECKPOINTS}. "
                    "Start without --resume_from_checkpoint, or point it at a checkpoint folder."
                )
        elif not (Path(cfg.resume_from_checkpoint) / STATE_FILE).exists():
            raise UserInputError(
                f"--resume_from_checkpoint {cfg.resume_from_checkpoint} is not a complete tlnlp checkpoint "
                f"(no {STATE_FILE}). Use 'latest' or a folder under {output_dir / CHECKPOINTS}."
            )
        return
    if output_dir.exists() and any(output_dir.iterdir()) and not cfg.overwrite_output_dir:
        raise UserInputError(
            f"--output_dir {output_dir} already holds files from an earlier run. Use another folder, "
            "--overwrite_output_dir to replace it, or --resume_from_checkpoint latest to continue it."
        )


def start_run(cfg: TrainingConfig, check_output: bool = True) -> tuple[Accelerator, str | None]:
    """What every stage does first: the checks that must pass before any work (output folder, Hub
    access), then Accelerate, logging and seeds. Returns the accelerator and the Hub repo (or None).
    `check_output` False: a recipe continuing its own earlier run in the folder."""
    if check_output:
        check_output_dir(cfg)
    accelerator = make_accelerator(cfg)
    setup_logging(accelerator)
    engines.set_cpu_threads(accelerator)
    engines.check_engine(cfg, accelerator)
    if not cfg.preprocess_only:
        engines.check_shared_output_dir(accelerator, Path(cfg.output_dir))
    hub_repo = None if cfg.preprocess_only else hub.preflight(cfg, accelerator)
    set_seed(cfg.seed)  # the same on every rank: model initialisation must agree
    return accelerator, hub_repo


def preprocessing_done(accelerator: Accelerator, tokenized) -> dict[str, Any]:
    """--preprocess_only: the tokenized data is on disk; stop before any model training."""
    sizes = {name: len(split) for name, split in tokenized.items()}
    logger.info("Preprocessing done (%s). Run again without --preprocess_only to train on it.",
                ", ".join(f"{k}: {v:,} rows" for k, v in sizes.items()))
    finish(accelerator)
    return {"preprocessed_rows": sizes}


def end_run(cfg: TrainingConfig, accelerator: Accelerator, results: dict, stage: str, hub_repo: str | None) -> None:
    """Write the results, configuration and model card, push if asked, and tear down cleanly."""
    write_run_files(accelerator, cfg, results, stage=stage)
    try:
        hub.publish(cfg, accelerator, hub_repo)
    finally:
        finish(accelerator)


def finish(accelerator: Accelerator) -> None:
    """Clean teardown, so no rank aborts at exit under multi-process CPU runs."""
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # first: DeepSpeed's engine needs the process group to tear itself down
    accelerator.end_training()  # finishes the trackers (and, in recent Accelerate, the process group)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
