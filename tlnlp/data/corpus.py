"""Unlabeled text of the task's kind, for continued pretraining (`--continued_pretraining`) and the auxiliary
MLM loss (`--auxiliary_mlm`): 'task' (the texts of the training split, labeled or not, after fine-tuning's own
validation split is held out), a text file, or a built-in/Hub data set (its train split). Any text that is
exactly a validation or test text is dropped, so nothing is learned from what the run is judged on."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from datasets import DatasetDict

from tlnlp.core.errors import UserInputError
from tlnlp.data import builtin
from tlnlp.data.prepare import drop_blank_texts, ensure_validation, load_raw_datasets, resolve_text_column

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Corpus:
    texts: list[str]
    source: str  # for logs and the card: "the task's training texts (TAPT)", "FILE (DAPT)"


def read_corpus(cfg, value: str, option: str, held_out_texts: set[str]) -> Corpus:
    """The texts `option` (given `value`) names, without any validation or test text, or a clear error.
    `cfg` is the run's configuration (its data options say where the task's own texts are)."""
    if value == "task":
        raw = load_raw_datasets(train_file=cfg.train_file, validation_file=cfg.validation_file, dataset_name=cfg.dataset_name,
                                dataset_config_name=cfg.dataset_config_name, csv_delimiter=cfg.csv_delimiter)
        raw = DatasetDict({k: v for k, v in raw.items() if k in ("train", "validation", "test")})
        # The same held-out validation split as fine-tuning's (same percentage, same seed).
        train = ensure_validation(raw, cfg.validation_split_percentage, cfg.seed)["train"]
        columns = [resolve_text_column(train, cfg.text_column)] + ([cfg.text_pair_column] if cfg.text_pair_column else [])
        source = "the task's training texts (TAPT)"
    else:
        is_file = Path(value).exists()
        looks_like_a_path = bool(Path(value).suffix) or value.startswith((".", "/", "~"))
        if not is_file and not builtin.is_builtin_dataset(value) and looks_like_a_path:
            raise UserInputError(
                f"{option} {value!r}: no such file, and not a built-in data set "
                f"({', '.join(d for d, v in builtin.DATASETS.items())}). Give 'task' (the training texts), a text "
                "file (.txt, .csv, .json, .jsonl) or a data set name."
            )
        train = load_raw_datasets(train_file=value if is_file else None, validation_file=None,
                                  dataset_name=None if is_file else value, dataset_config_name=None,
                                  csv_delimiter=cfg.csv_delimiter, train_option=option)["train"]
        columns = [resolve_text_column(train, None, f"{option}'s text column")]
        source = f"{value} (DAPT)"
    train = drop_blank_texts({"train": train}, columns[0])["train"]
    texts = [t for column in columns for t in train[column] if isinstance(t, str) and t.strip()]
    kept = [t for t in texts if t not in held_out_texts]
    if len(kept) < len(texts):
        logger.info("%s: %d text(s) of the corpus are validation or test texts and were dropped.",
                    "Continued pretraining" if option == "--continued_pretraining" else option, len(texts) - len(kept))
    if not kept:
        raise UserInputError(
            f"{option} {value}: the corpus holds no text to {'pretrain on' if option == '--continued_pretraining' else 'read'} "
            f"({len(texts)} non-blank text(s), {len(texts) - len(kept)} of them validation or test texts). "
            "Give a corpus with unlabeled text of the task's kind."
        )
    return Corpus(kept, source)
