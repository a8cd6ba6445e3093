"""`python -m tlnlp.finetune`: one fine-tuning run, or a recipe (search, self-training) built on the phases."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tlnlp.core.config import FinetuneConfig
from tlnlp.core.errors import UserInputError
from tlnlp.core.run import check_output_dir, end_run, start_run
from tlnlp.data import builtin
from tlnlp.recipes import continued_pretraining, search, self_training


def main(cfg: FinetuneConfig) -> dict[str, Any]:
    """The `python -m tlnlp.finetune` command: one fine-tuning run (tlnlp.stage2.phases), or a recipe (search,
    self-training) built on the same phases; with --continued_pretraining, stage 1 on the task's or a
    domain's text first, kept unless the gate finds it damaged (tlnlp.recipes.continued_pretraining)."""
    if not cfg.model_name_or_path:
        raise UserInputError(
            "--model_name_or_path is required: a stage 1 output folder, a local encoder, a built-in model "
            f"({', '.join(builtin.MODELS)}) or a Hub id. Add --from_scratch for the no-transfer baseline."
        )
    adaptation, kept_run = None, None
    if cfg.continued_pretraining:
        # Checked here, once, before stage 1 writes anything; the recipes and the gate then continue their own
        # work in the folder when the same command is run again.
        if not continuing(cfg):
            check_output_dir(cfg)
        cfg, adaptation, kept_run = continued_pretraining.adapt(cfg, check_output=False)
    if cfg.search_trials or cfg.self_training_rounds:
        check_output = adaptation is None  # else checked above
        # The finetune gate's kept fine-tuning is self-training's teacher as it would train it: on the labels
        # alone (self-training's round 0 never reads --pseudo_labeled_file, the gate's runs do).
        teacher = kept_run if not cfg.pseudo_labeled_file else None
        results = (search.run_search(cfg, check_output) if cfg.search_trials
                   else self_training.run_self_training(cfg, check_output, teacher))
        if adaptation:
            results["continued_pretraining"] = adaptation
            continued_pretraining.record_in_run(Path(cfg.output_dir), adaptation, cfg.hub_model_id)
        return results
    accelerator, hub_repo = start_run(cfg, check_output=adaptation is None)  # adapt checked it
    results = continued_pretraining.finetune_kept(cfg, accelerator, kept_run)
    if cfg.preprocess_only:
        return results
    if adaptation:
        results["continued_pretraining"] = adaptation
    end_run(cfg, accelerator, results, "finetune", hub_repo)
    return results


def continuing(cfg: FinetuneConfig) -> bool:
    """Whether --output_dir holds this command's own unfinished work, which the same command continues: the
    finetune gate's fine-tunings, a search's journal or self-training's rounds."""
    output_dir = Path(cfg.output_dir)
    return ((output_dir / continued_pretraining.GATE_FOLDER).exists()
            or bool(cfg.search_trials) and (output_dir / search.SEARCH_DIR / search.JOURNAL).exists()
            or bool(cfg.self_training_rounds) and (output_dir / self_training.FOLDER).exists())


if __name__ == "__main__":
    from tlnlp.core.cli import run

    sys.exit(run(main, FinetuneConfig))
