"""Entry points: parse the configuration, run a stage, turn user errors into a clear message and exit 2."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

from tlnlp.core.config import parse_config
from tlnlp.core.errors import TrainingError, UserInputError

# What gloo and NCCL say when the process at the other end of a collective died or stopped answering.
PEER_FAILURE_MARKERS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Timed out",
                        "NCCL communicator was aborted", "NCCL error", "Socket Timeout")


def is_peer_failure(error: BaseException) -> bool:
    """A collective failed because another process of the run is gone (killed, crashed, out of memory)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    if isinstance(error, torch.distributed.DistError):
        return True
    return isinstance(error, RuntimeError) and any(marker in str(error) for marker in PEER_FAILURE_MARKERS)


def run(main: Callable[[Any], Any], config_class: type, argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(config_class, argv)
        main(cfg)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingError as error:
        print(f"training stopped: {error}", file=sys.stderr)
        return 3
    except RuntimeError as error:
        if not is_peer_failure(error):
            raise
        first_line = str(error).strip().splitlines()[0][:300]
        print(f"training stopped: another process of this run failed or stopped answering ({first_line}). Its own "
              "log says why. Checkpoints already written are intact: fix the cause, then run the same command with "
              "--resume_from_checkpoint latest.", file=sys.stderr)
        return 3
    return 0
