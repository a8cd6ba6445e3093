"""`python -m tlnlp.finetune`: one fine-tuning run, or a recipe (search, self-training) built on the phases."""

from __future__ import annotations

import sys
from typing import Any

from tlnlp.core.config import FinetuneConfig
from tlnlp.core.errors import UserInputError
from tlnlp.core.run import end_run, start_run
from tlnlp.data import builtin
from tlnlp.recipes import search, self_training
from tlnlp.stage2.phases import finetune_as_configured


def main(cfg: FinetuneConfig) -> dict[str, Any]:
    """The `python -m tlnlp.finetune` command: one fine-tuning run (tlnlp.stage2.phases), or a recipe (search,
    self-training) built on the same phases."""
    if not cfg.model_name_or_path:
        raise UserInputError(
            "--model_name_or_path is required: a stage 1 output folder, a local encoder, a built-in model "
            f"({', '.join(builtin.MODELS)}) or a Hub id. Add --from_scratch for the no-transfer baseline."
        )
    if cfg.search_trials:
        return search.run_search(cfg)
    if cfg.self_training_rounds:
        return self_training.run_self_training(cfg)
    accelerator, hub_repo = start_run(cfg)
    results = finetune_as_configured(cfg, accelerator)
    if cfg.preprocess_only:
        return results
    end_run(cfg, accelerator, results, "finetune", hub_repo)
    return results


if __name__ == "__main__":
    from tlnlp.core.cli import run

    sys.exit(run(main, FinetuneConfig))
