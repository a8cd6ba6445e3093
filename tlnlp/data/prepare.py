"""Reading text data (local files, built-in sets, Hub datasets) and turning it into model inputs."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import datasets
import torch
from datasets import Dataset, DatasetDict, IterableDataset, load_dataset, load_from_disk
from transformers import PreTrainedTokenizerBase

from tlnlp.core.errors import UserInputError
from tlnlp.data import builtin

logger = logging.getLogger(__name__)

BUILDERS = {".txt": "text", ".csv": "csv", ".json": "json", ".jsonl": "json"}
STREAMING_VALIDATION_DOCS = 500  # a streamed corpus has no length, so hold out a fixed number of documents


def _check_csv_header(option: str, path: str, head: bytes, delimiter: str | None) -> None:
    """A CSV read with the wrong separator becomes one column of joined fields: catch it by its header."""
    header = head.decode("utf-8", errors="replace").splitlines()[0] if head.strip() else ""
    separator = delimiter or ","
    if separator in header:
        return
    for other in ("\t", ";", "|", ","):
        if other != separator and other in header:
            raise UserInputError(
                f"{option} {path}: the header {header[:80]!r} has no {separator!r} but contains {other!r}: the "
                f"file looks {other!r}-separated. Pass --csv_delimiter {other!r}."
            )


def _check_file(option: str, path: str, csv_delimiter: str | None = None) -> str:
    file = Path(path)
    if not file.is_file():
        raise UserInputError(f"{option} {path}: no such file. Check the path.")
    if file.stat().st_size == 0:
        raise UserInputError(f"{option} {path} is empty. Give a file with at least one example.")
    if file.suffix.lower() not in BUILDERS:
        raise UserInputError(
            f"{option} {path}: unsupported extension {file.suffix!r}. Use one of {', '.join(BUILDERS)}."
        )
    with file.open("rb") as f:
        head = f.read(1 << 16)
    if b"\x00" in head:
        raise UserInputError(f"{option} {path} looks binary (it holds NUL bytes). Give a UTF-8 text file.")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 4:  # not just a multi-byte character cut at the read boundary
            raise UserInputError(
                f"{option} {path} is not UTF-8 (byte {error.start}). Convert it, e.g. `iconv -t utf-8`."
            ) from None
    if file.suffix.lower() == ".csv":
        _check_csv_header(option, path, head, csv_delimiter)
    if file.suffix.lower() == ".csv" and len(head) == file.stat().st_size:  # the whole file was read
        if len([line for line in head.splitlines() if line.strip()]) <= 1:
            raise UserInputError(f"{option} {path} holds a header but no rows. Give a file with at least one example.")
    return str(file)


def load_raw_datasets(
    *,
    train_file: str | None,
    validation_file: str | None,
    test_file: str | None = None,
    dataset_name: str | None,
    dataset_config_name: str | None,
    streaming: bool = False,
    csv_delimiter: str | None = None,
    train_option: str = "--train_file",
) -> DatasetDict | dict[str, IterableDataset]:
    """Load the train (and validation, test) splits from files, a built-in set or the Hub. `train_option` is
    the flag that named the training file, for messages."""
    if dataset_name is None and train_file is None:
        raise UserInputError(
            "No training data: give --train_file, or --dataset_name with a built-in set "
            f"({', '.join(builtin.DATASETS)}) or a Hub dataset id."
        )
    try:
        if builtin.is_builtin_dataset(dataset_name):
            raw = load_dataset("json", data_files=builtin.dataset_files(dataset_name), streaming=streaming)
        elif dataset_name is not None:
            raw = load_dataset(dataset_name, dataset_config_name, streaming=streaming)
        else:
            files = {"train": _check_file(train_option, train_file, csv_delimiter)}
            if validation_file:
                files["validation"] = _check_file("--validation_file", validation_file, csv_delimiter)
            if test_file:
                files["test"] = _check_file("--test_file", test_file, csv_delimiter)
            suffixes = {Path(f).suffix.lower().replace(".jsonl", ".json") for f in files.values()}
            if len(suffixes) > 1:
                raise UserInputError(
                    f"The data files have different formats ({', '.join(sorted(suffixes))}); use one format for all."
                )
            kwargs = {"sep": csv_delimiter} if csv_delimiter else {}
            raw = load_dataset(BUILDERS[suffixes.pop()], data_files=files, streaming=streaming, **kwargs)
    except UserInputError:
        raise
    except (UnicodeDecodeError, datasets.exceptions.DatasetGenerationError, ValueError) as error:
        cause = error.__cause__ or error
        raise UserInputError(f"Could not read the data: {type(cause).__name__}: {cause}") from None
    except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as error:
        raise UserInputError(
            f"Could not load dataset {dataset_name!r}: {error}. Built-in sets are: {', '.join(builtin.DATASETS)}; "
            "anything else must be a Hub dataset id reachable from this machine."
        ) from None

    if "train" not in raw:
        raise UserInputError(f"The data has no 'train' split; found: {', '.join(raw)}.")
    if not streaming:
        for name, split in raw.items():
            if len(split) == 0:
                raise UserInputError(f"The {name} split is empty. Give data with at least one example.")
    return raw


def ensure_validation(raw, validation_split_percentage: float, seed: int, streaming: bool = False,
                      needed_by: str | None = None):
    """Carve a validation split out of train (seeded) when the data has none. A percentage of 0 carves
    none: the data is returned as it is, unless `needed_by` (what reads the split) makes that an error."""
    if "validation" in raw:
        return raw
    if streaming:  # the head of the stream; the training stream leaves it out by position (ShardedStream)
        rest = {k: v for k, v in raw.items() if k != "train"}
        return {"train": raw["train"], "validation": raw["train"].take(STREAMING_VALIDATION_DOCS), **rest}
    if validation_split_percentage == 0:
        if needed_by:
            raise UserInputError(
                f"{needed_by} needs a validation split, and --validation_split_percentage 0 holds none out of the "
                "training data. Give --validation_file, or a percentage above 0."
            )
        return raw
    if len(raw["train"]) < 2:
        raise UserInputError(
            "The training data holds a single example: at least 2 documents (lines, rows) are needed, one to "
            "train on and one held out for validation. Add data, or give --validation_file."
        )
    split = raw["train"].train_test_split(test_size=validation_split_percentage / 100, seed=seed)
    return DatasetDict({**raw, "train": split["train"], "validation": split["test"]})


def count_lines(path: Path) -> int:
    """Rows of a JSON-lines (or one-text-a-line) file: its lines that are not blank."""
    with Path(path).open(encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def write_jsonl(path: Path, rows, columns: list[str]) -> Path:
    """`rows` (dicts) as JSON lines with just `columns`, written whole or not at all (a temporary file, then
    a rename), so processes that write the same file never leave a half-written one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({c: row[c] for c in columns if c in row}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def drop_blank_texts(raw, text_column: str):
    """Blank lines separate documents in plain-text corpora; they are not documents themselves."""

    def keep(batch):
        return [isinstance(text, str) and bool(text.strip()) for text in batch[text_column]]

    kept = {}
    for name, split in raw.items():
        if isinstance(split, IterableDataset):
            kept[name] = split.filter(keep, batched=True)
            continue
        kept[name] = split.filter(keep, batched=True, desc=f"Dropping blank lines ({name})")
        if len(kept[name]) == 0:
            raise UserInputError(
                f"The {name} data holds no text: its {len(split)} line(s) or row(s) are all blank. Check the file."
            )
    return DatasetDict(kept) if isinstance(raw, DatasetDict) else kept


def column_names(dataset: Dataset | IterableDataset) -> list[str]:
    """Column names; a streamed data set may only know them once its first row is read."""
    if dataset.column_names:
        return list(dataset.column_names)
    first = next(iter(dataset), None)
    return list(first) if first else []


def resolve_text_column(dataset: Dataset | IterableDataset, text_column: str | None, option: str = "--text_column") -> str:
    """The text column to use; an error lists the columns that exist."""
    columns = column_names(dataset)
    if text_column is not None:
        if text_column not in columns:
            raise UserInputError(
                f"{option} {text_column!r} is not in the data. Columns found: {', '.join(columns)}. "
                f"Pass {option} with one of them."
            )
        return text_column
    if "text" in columns:
        return "text"
    features = dataset.features or {}
    strings = [c for c in columns if getattr(features.get(c), "dtype", None) in ("string", "large_string")]
    if not strings:
        raise UserInputError(
            f"No text column found (columns: {', '.join(columns)}). Pass {option} with the one holding text."
        )
    return strings[0]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    content = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(content.encode()).hexdigest()[:16]


PREPROCESSING_FILE = "tlnlp_preprocessing.json"


def cached_map(raw: DatasetDict, build, key_parts: dict[str, Any], cache_dir: Path,
               folder: Path | None = None) -> DatasetDict:
    """Run `build(raw)` once and keep its result on disk, keyed by the inputs and the settings.

    A second run with the same data, tokenizer and settings loads the result instead of tokenizing again.
    `folder` (--preprocessed_dataset_dir) names the place instead of a hash; what it holds must match.
    """
    key_parts = {**key_parts, "fingerprints": {k: v._fingerprint for k, v in raw.items()}, "version": 1}
    key_parts = json.loads(json.dumps(key_parts, sort_keys=True, default=str))
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:20]
    explicit = folder is not None
    folder = folder or cache_dir / "tokenized" / key
    if (folder / "dataset_dict.json").exists() and not explicit:
        logger.info("Loading tokenized data from the cache: %s", folder)
        return load_from_disk(str(folder))
    if (folder / "dataset_dict.json").exists():
        stored = folder / PREPROCESSING_FILE
        found = json.loads(stored.read_text()) if stored.exists() else None
        if found != key_parts:
            differ = sorted(k for k in set(key_parts) | set(found or {}) if (found or {}).get(k) != key_parts.get(k))
            raise UserInputError(
                f"--preprocessed_dataset_dir {folder} holds data tokenized from other inputs or settings "
                f"(differing: {', '.join(differ)}). Use another folder, or delete this one to tokenize again."
            )
        logger.info("Loading tokenized data from %s", folder)
        return load_from_disk(str(folder))
    if folder.exists() and any(folder.iterdir()):
        raise UserInputError(
            f"--preprocessed_dataset_dir {folder} exists and is not a tlnlp tokenized data set. Give an empty or new folder."
        )
    result = build(raw)
    tmp = folder.with_name(folder.name + ".tmp")
    result.save_to_disk(str(tmp))
    (tmp / PREPROCESSING_FILE).write_text(json.dumps(key_parts, indent=2, sort_keys=True))
    if folder.exists():
        folder.rmdir()
    tmp.rename(folder)  # atomic: a half-written cache is never loaded
    logger.info("Tokenized data saved in %s", folder)
    return load_from_disk(str(folder))


def pack_texts(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, block_size: int, with_offsets: bool = False
) -> dict[str, list]:
    """Tokenize `texts`, join them with [SEP], and cut the stream into blocks of `block_size` tokens.

    Every block is `[CLS] ... [SEP]`. The last, shorter block is kept (Hugging Face's example drops the
    tail of every map batch, which loses up to block_size-1 tokens per 1,000 documents).
    """
    encoded = tokenizer(
        texts, add_special_tokens=False, return_attention_mask=False, return_offsets_mapping=with_offsets
    )
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    stream: list[int] = []
    offsets: list[tuple[int, int]] = []
    for i, ids in enumerate(encoded["input_ids"]):
        if not ids:
            continue
        stream += ids + [sep_id]
        if with_offsets:
            offsets += list(map(tuple, encoded["offset_mapping"][i])) + [(0, 0)]
    if stream and stream[-1] == sep_id:  # the block's own [SEP] closes the last document
        stream.pop()
        offsets = offsets[:-1] if with_offsets else offsets
    body = block_size - 2
    out: dict[str, list] = {"input_ids": [], "special_tokens_mask": []}
    if with_offsets:
        out["offset_mapping"] = []
    for start in range(0, len(stream), body):
        chunk = stream[start : start + body]
        while chunk and chunk[0] == sep_id:  # a block never starts with a document separator
            chunk = chunk[1:]
            start += 1
        if not chunk:
            continue
        ids = [cls_id] + chunk + [sep_id]
        out["input_ids"].append(ids)
        out["special_tokens_mask"].append([1] + [int(t == sep_id) for t in chunk] + [1])
        if with_offsets:
            out["offset_mapping"].append([(0, 0)] + offsets[start : start + len(chunk)] + [(0, 0)])
    return out


def tokenize_lines(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int, with_offsets: bool = False
) -> dict[str, list]:
    """One sequence per non-empty document, truncated to `max_length` (padding happens per batch)."""
    texts = [t for t in texts if t and t.strip()]
    return dict(
        tokenizer(
            texts,
            truncation=True,
            max_length=max_length,
            return_special_tokens_mask=True,
            return_attention_mask=False,
            return_offsets_mapping=with_offsets,
        )
    )


def mlm_rows(texts: list[str], tokenizer: PreTrainedTokenizerBase, *, max_seq_length: int, line_by_line: bool,
             whole_word_mask: bool) -> dict[str, list]:
    """MLM training rows from a batch of documents: packed blocks, or one sequence per line."""
    texts = [t if isinstance(t, str) else "" for t in texts]
    if line_by_line:
        return tokenize_lines(texts, tokenizer, max_seq_length, whole_word_mask)
    return pack_texts(texts, tokenizer, max_seq_length, whole_word_mask)


def sequence_lengths(dataset: Dataset, column: str = "input_ids") -> list[int]:
    """Token count of every row, read from the Arrow column (no Python lists of ids are built)."""
    import pyarrow.compute as pc

    return pc.list_value_length(dataset.with_format("arrow")[column]).to_pylist()


def tokenizing_processes(rows: int) -> int | None:
    """Every core for a large corpus (tokenizing is the slow part of preparing it); one process for a small
    one, where starting the others costs more than they save."""
    return len(os.sched_getaffinity(0)) if rows >= 20_000 else None


def prepare_mlm_dataset(
    split: Dataset | IterableDataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    text_column: str,
    max_seq_length: int,
    line_by_line: bool,
    whole_word_mask: bool,
    num_proc: int | None = None,
) -> Dataset | IterableDataset:
    def tokenize(batch):
        return mlm_rows(batch[text_column], tokenizer, max_seq_length=max_seq_length, line_by_line=line_by_line,
                        whole_word_mask=whole_word_mask)

    kwargs: dict[str, Any] = {"batched": True, "remove_columns": column_names(split)}
    if isinstance(split, Dataset):
        kwargs.update(num_proc=num_proc, desc="Tokenizing")
    return split.map(tokenize, **kwargs)


class LengthGroupedSampler(torch.utils.data.Sampler[int]):
    """Random batches of similar length: shuffle, cut into mega-batches of `mega_batches` batches, sort each by
    length, split it into batches, then shuffle the order of the batches.

    Padding then costs little while every epoch still sees a fresh random grouping. The order depends only on
    (seed, epoch), which the loop sets through `set_epoch`, so a resumed run replays the same batches.
    transformers' own `LengthGroupedSampler` takes a generator instead and cannot be re-seeded per epoch.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, mega_batches: int = 50):
        self.lengths, self.batch_size, self.seed, self.epoch = list(lengths), batch_size, seed, 0
        self.mega = batch_size * mega_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        batches = []
        for start in range(0, len(order), self.mega):
            chunk = sorted(order[start: start + self.mega], key=lambda i: -self.lengths[i])
            batches += [chunk[i: i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        # Only full batches are shuffled; a short one stays last, so the data loader's own batching (which
        # cuts consecutive indices into batch_size pieces) keeps exactly these groups.
        full = [b for b in batches if len(b) == self.batch_size]
        short = [b for b in batches if len(b) < self.batch_size]
        shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        return iter([i for batch in shuffled + short for i in batch])


def pad_for_masking(tokenizer: PreTrainedTokenizerBase):
    """A collator that pads a batch (and its offset mapping, for whole-word masking) without masking it."""

    def collate(features: list[dict]) -> dict:
        offsets = [f.pop("offset_mapping") for f in features] if "offset_mapping" in features[0] else None
        batch = tokenizer.pad(features, return_tensors="pt")
        if offsets is not None:  # `tokenizer.pad` leaves offsets ragged
            width = batch["input_ids"].shape[1]
            batch["offset_mapping"] = torch.tensor([list(o) + [(0, 0)] * (width - len(o)) for o in offsets])
        return batch

    return collate


def mask_batch(batch: dict, masker) -> dict:
    """MLM-mask a padded batch with `masker` (a DataCollatorForLanguageModeling), from the global RNG."""
    special = batch.pop("special_tokens_mask")
    offsets = batch.pop("offset_mapping", None)
    batch["input_ids"], batch["labels"] = masker.torch_mask_tokens(
        batch["input_ids"], special_tokens_mask=special, offset_mapping=offsets
    )
    return batch


def mask_once(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, masker, seed: int,
              batch_size: int = 256) -> Dataset:
    """Apply MLM masking once, from a fixed seed, so evaluation sees the same masks every run."""
    collate = pad_for_masking(tokenizer)

    def mask(batch):
        lengths = [len(ids) for ids in batch["input_ids"]]
        masked = mask_batch(collate([dict(zip(batch, values)) for values in zip(*batch.values())]), masker)
        return {
            "input_ids": [row[:n].tolist() for row, n in zip(masked["input_ids"], lengths)],
            "labels": [row[:n].tolist() for row, n in zip(masked["labels"], lengths)],
        }

    with torch.random.fork_rng(devices=[]):  # leaves the training random stream untouched
        torch.manual_seed(seed)
        return dataset.map(mask, batched=True, batch_size=batch_size, remove_columns=dataset.column_names,
                           desc="Masking validation", new_fingerprint=f"masked-{seed}-{dataset._fingerprint}")


# ---------------------------------------------------------------------------------------------------
# Labeled data for fine-tuning
# ---------------------------------------------------------------------------------------------------


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)  # NaN


def _label_kind(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, bool):
        return "int"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "int" if value.is_integer() else "float"
    if isinstance(value, str):
        return "str"
    return type(value).__name__


def check_labeled_splits(
    raw: DatasetDict, *, text_column: str, text_pair_column: str | None, label_column: str
) -> None:
    """Columns exist, no text or pair is empty, no label is missing: checked on every split, before training."""
    for name, split in raw.items():
        columns = split.column_names
        needed = [("--text_column", text_column), ("--label_column", label_column)]
        if text_pair_column:
            needed.append(("--text_pair_column", text_pair_column))
        for option, column in needed:
            if column not in columns:
                if option == "--label_column" and name == "test":
                    continue  # an unlabeled test file is fine: predictions are still written
                raise UserInputError(
                    f"{option} {column!r} is not in the {name} data. Columns found: {', '.join(columns)}. "
                    f"Pass {option} with one of them."
                )
        for option, column in needed:
            if column not in columns:
                continue
            values = split[column]
            if option == "--label_column":
                bad = [i for i, v in enumerate(values) if _is_missing(v) or (isinstance(v, str) and not v.strip())]
                what = "missing or NaN labels"
            else:
                bad = [i for i, v in enumerate(values) if not isinstance(v, str) or not v.strip()]
                what = "empty texts" if option == "--text_column" else f"an empty {column!r} (pair) text"
            if bad:
                rows = ", ".join(str(i) for i in bad[:5]) + (" ..." if len(bad) > 5 else "")
                raise UserInputError(
                    f"The {name} data has {len(bad)} row(s) with {what} (rows {rows}, counting data rows from 0). "
                    "Fix or drop those rows."
                )


def load_labeled(cfg: Any) -> tuple[DatasetDict, str, str]:
    """The labeled splits named by a FinetuneConfig, checked as fine-tuning checks them: (splits, text
    column, task type). For the runs that prepare files for fine-tuning runs (search, self-training)."""
    raw = load_raw_datasets(train_file=cfg.train_file, validation_file=cfg.validation_file, test_file=cfg.test_file,
                            dataset_name=cfg.dataset_name, dataset_config_name=cfg.dataset_config_name,
                            csv_delimiter=cfg.csv_delimiter)
    raw = DatasetDict({k: v for k, v in raw.items() if k in ("train", "validation", "test")})
    text_column = resolve_text_column(raw["train"], cfg.text_column)
    check_labeled_splits(raw, text_column=text_column, text_pair_column=cfg.text_pair_column,
                         label_column=cfg.label_column)
    task_type = infer_task_type(raw["train"][cfg.label_column]) if cfg.task_type == "auto" else cfg.task_type
    return raw, text_column, task_type


def stratified_subset(split,  label_column: str, n: int, task_type: str, stratify: bool, seed: int):
    """--max_train_samples: `n` examples, in the class proportions of `split` when `stratify` (seeded)."""
    if n > len(split):
        raise UserInputError(
            f"--max_train_samples {n} is more than the {len(split)} training examples available. "
            f"Use at most {len(split)}."
        )
    if stratify and task_type == "single_label":
        return split.select(builtin.stratified_indices(split[label_column], n, seed).tolist())
    return split.shuffle(seed=seed).select(range(n))


def infer_task_type(labels: list) -> str:
    kinds = {_label_kind(v) for v in labels}
    if kinds == {"list"}:
        return "multi_label"
    if len(kinds) > 1 and kinds != {"int", "float"}:
        raise UserInputError(
            f"The labels mix types ({', '.join(sorted(kinds))}). Use one type: strings or integers for classes, "
            "floats for regression, lists for multi-label."
        )
    return "regression" if "float" in kinds else "single_label"


def label_names(labels: list, task_type: str) -> list[str]:
    """Class names in a stable order (numeric labels sort numerically)."""
    if task_type == "regression":
        return ["score"]
    values = {v for row in labels for v in row} if task_type == "multi_label" else set(labels)
    if all(_label_kind(v) == "int" for v in values):
        return [str(int(v)) for v in sorted(values)]
    return sorted(str(v) for v in values)


def check_label_sets(raw: DatasetDict, label_column: str, names: list[str], task_type: str) -> None:
    if task_type == "regression":
        return
    if task_type == "single_label" and len(names) < 2:
        raise UserInputError(
            f"The training data has a single class ({names[0]!r}); a classifier needs at least two."
        )
    known = set(names)
    for split_name, split in raw.items():
        if split_name == "train" or label_column not in split.column_names:
            continue
        values = split[label_column]
        found = {_label_str(v) for row in values for v in row} if task_type == "multi_label" else {
            _label_str(v) for v in values}
        unseen = sorted(found - known)
        if unseen:
            raise UserInputError(
                f"The {split_name} data has label(s) never seen in training: {', '.join(map(repr, unseen[:10]))}. "
                f"Training labels: {', '.join(map(repr, names))}. Fix typos, or add examples of those classes to train."
            )


def _label_str(value: Any) -> str:
    return str(int(value)) if _label_kind(value) == "int" else str(value)


def encode_label(value: Any, task_type: str, label2id: dict[str, int]) -> Any:
    if task_type == "regression":
        return float(value)
    if task_type == "multi_label":
        row = [0.0] * len(label2id)
        for v in value:
            row[label2id[_label_str(v)]] = 1.0
        return row
    return label2id[_label_str(value)]


def tokenize_labeled(
    split: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    text_column: str,
    text_pair_column: str | None,
    label_column: str,
    max_seq_length: int,
    task_type: str,
    label2id: dict[str, int],
) -> Dataset:
    has_labels = label_column in split.column_names

    def tokenize(batch):
        pairs = batch[text_pair_column] if text_pair_column else None
        out = dict(tokenizer(batch[text_column], pairs, truncation=True, max_length=max_seq_length))
        if has_labels:
            out["labels"] = [encode_label(v, task_type, label2id) for v in batch[label_column]]
        return out

    return split.map(tokenize, batched=True, remove_columns=split.column_names, desc="Tokenizing")
