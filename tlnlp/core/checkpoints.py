"""Checkpoint I/O: atomic, rotated saves, and loads that refuse a damaged or unsafe checkpoint."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import safetensors.torch
import torch
from accelerate import Accelerator

from tlnlp.core.errors import UserInputError

logger = logging.getLogger(__name__)


CHECKPOINTS = "checkpoints"
BEST = "best"
STATE_FILE = "trainer_state.json"
STREAM_STATE = "stream_state_{rank}.json"
AVERAGE_STATE = "weight_average_{rank}.safetensors"


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint; folders without a state file (a save that was killed) are ignored."""
    folder = output_dir / CHECKPOINTS
    complete = [p for p in folder.glob("step_*") if (p / STATE_FILE).exists() and not p.name.endswith(".tmp")]
    return max(complete, key=lambda p: int(p.name.split("_")[1]), default=None)


# What tlnlp's checkpoints pickle besides tensors: numpy arrays and the random-number generators' states.
SAFE_PICKLE_GLOBALS = {
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype",
    "numpy.dtypes.UInt32DType", "_codecs.encode",
}


def check_checkpoint_is_safe(folder: Path) -> None:
    """Refuse a checkpoint whose pickled files would run code when loaded.

    Accelerate loads the training state with torch.load(weights_only=True) already; this check runs first,
    over every pickle in the folder, so a tampered or foreign checkpoint gets a clear refusal instead of a
    deep unpickling error, and nothing in it is ever executed.
    """
    for file in sorted(folder.iterdir()):
        if file.suffix not in (".bin", ".pkl", ".pt", ".pth"):
            continue
        try:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(file))) - SAFE_PICKLE_GLOBALS
        except Exception as error:  # noqa: BLE001  (any failure to parse means a damaged file)
            raise UserInputError(
                f"Checkpoint file {file} is damaged ({type(error).__name__}: {error}). Resume from an earlier "
                f"checkpoint: --resume_from_checkpoint {folder.parent}/step_..."
            ) from None
        if unsafe:
            raise UserInputError(
                f"Refusing to resume from {folder}: {file.name} holds pickled objects that would run code when "
                f"loaded ({', '.join(sorted(unsafe))}). tlnlp checkpoints hold only tensors, numbers and numpy "
                "arrays; this file was altered or comes from elsewhere. Delete it or resume from another checkpoint."
            )


def load_checkpoint(accelerator: Accelerator, folder: Path) -> None:
    check_checkpoint_is_safe(folder)
    try:
        accelerator.load_state(str(folder))
    except Exception as error:  # noqa: BLE001  (safetensors, torch and OS errors all mean the same to the user)
        raise UserInputError(
            f"Could not load checkpoint {folder} ({type(error).__name__}: {error}). It is damaged or from another "
            f"model or configuration; resume from an earlier checkpoint under {folder.parent}, or start afresh."
        ) from None


class Checkpoints:
    """Atomic, rotated checkpoints: a killed save never leaves a folder that `latest` would pick."""

    def __init__(self, accelerator: Accelerator, output_dir: Path, limit: int | None):
        self.accelerator, self.folder, self.limit = accelerator, output_dir / CHECKPOINTS, limit

    def save(self, step: int, state: dict, stream_state: dict | None = None,
             average: dict[str, torch.Tensor] | None = None) -> None:
        final = self.folder / f"step_{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp), safe_serialization=True)
        if stream_state is not None:  # each process's position in its share of the stream
            tmp.mkdir(parents=True, exist_ok=True)
            (tmp / STREAM_STATE.format(rank=self.accelerator.process_index)).write_text(json.dumps(stream_state))
        if average is not None:  # each process's running mean of the weights (--average_last_epochs)
            tmp.mkdir(parents=True, exist_ok=True)
            safetensors.torch.save_file({k: v.cpu() for k, v in average.items()},
                                        str(tmp / AVERAGE_STATE.format(rank=self.accelerator.process_index)))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))  # written last: marks the save complete
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self._rotate()
            logger.info("Saved checkpoint %s", final)
        self.accelerator.wait_for_everyone()

    def _rotate(self) -> None:
        if not self.limit:
            return
        done = sorted((p for p in self.folder.glob("step_*") if not p.name.endswith(".tmp")), key=lambda p: p.name)
        for old in done[: -self.limit]:
            shutil.rmtree(old, ignore_errors=True)
