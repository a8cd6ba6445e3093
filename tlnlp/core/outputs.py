"""Logging set-up and the files every run leaves in its output folder."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import datasets
import transformers
import yaml
from accelerate import Accelerator

from tlnlp.core.config import config_to_dict
from tlnlp.core.files import CONFIG_FILE, RESULTS_FILE
from tlnlp.core.terminal import progress_bars
from tlnlp.hub.card import write_card


def setup_logging(accelerator: Accelerator) -> None:
    """Log lines and progress bars from the main process only; other ranks report errors alone."""
    main = accelerator.is_local_main_process
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("tlnlp").setLevel(logging.INFO if main else logging.ERROR)
    transformers.logging.set_verbosity_warning() if main else transformers.logging.set_verbosity_error()
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file checkpoint lines drown the log
    if not main:
        datasets.logging.set_verbosity_error()
    if not main or not progress_bars():
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
        os.environ.setdefault("TQDM_DISABLE", "1")  # tqdm's default for every other bar (tqdm >= 4.66)


def write_run_files(accelerator: Accelerator, cfg: Any, results: dict[str, Any], stage: str,
                    output_dir: Path | None = None) -> None:
    """all_results.json and the resolved configuration, next to the model in `output_dir` (default
    --output_dir), and the model card made from them (main process only)."""
    if not accelerator.is_main_process:
        return
    output_dir = Path(output_dir or cfg.output_dir)
    results = {"stage": stage, **results}
    (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2, default=float))
    (output_dir / CONFIG_FILE).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    write_card(output_dir, cfg.hub_model_id)
    logging.getLogger("tlnlp").info("Results: %s", json.dumps(results, default=float))
    logging.getLogger("tlnlp").info("Model, tokenizer and results saved in %s", output_dir)
