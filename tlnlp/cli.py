"""Entry points: parse the configuration, run a stage, turn user errors into a clear message and exit 2."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from tlnlp.config import parse_config
from tlnlp.errors import TrainingError, UserInputError


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
    return 0
