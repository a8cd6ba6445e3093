import collections

import pytest
import torch
from conftest import make_documents
from transformers import AutoTokenizer, DataCollatorForLanguageModeling

from tlnlp.core.errors import UserInputError
from tlnlp.data.builtin import stratified_indices
from tlnlp.data.prepare import load_raw_datasets, pack_texts, resolve_text_column
from tlnlp.models.modeling import train_wordpiece


def load(train_file, **kwargs):
    return load_raw_datasets(train_file=str(train_file), validation_file=None, dataset_name=None,
                             dataset_config_name=None, **kwargs)


def test_tokenizer_training_and_reload_give_identical_ids(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = [text for _, text in make_documents(20, seed=5)] + ["Unseen WORDS, with punctuation!"]
    assert reloaded(texts)["input_ids"] == tiny_tokenizer(texts)["input_ids"]
    assert len(reloaded) == len(tiny_tokenizer)


def test_wordpiece_respects_vocab_size():
    tokenizer = train_wordpiece((text for _, text in make_documents(200)), vocab_size=120)
    assert len(tokenizer) <= 120
    assert tokenizer.mask_token == "[MASK]" and tokenizer.cls_token_id is not None


def test_packing_keeps_every_token_and_the_tail(tiny_tokenizer):
    texts = [text for _, text in make_documents(50, seed=3)]
    packed = pack_texts(texts, tiny_tokenizer, block_size=32)
    content = [t for block in packed["input_ids"] for t in block[1:-1] if t != tiny_tokenizer.sep_token_id]
    expected = [t for text in texts for t in tiny_tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert content == expected  # every token, in order: the short last block is kept
    assert all(len(b) <= 32 for b in packed["input_ids"])
    assert all(b[0] == tiny_tokenizer.cls_token_id and b[-1] == tiny_tokenizer.sep_token_id
               for b in packed["input_ids"])
    assert len(packed["input_ids"][-1]) < 32


def test_masking_rate_and_special_tokens(tiny_tokenizer):
    texts = [text for _, text in make_documents(300, seed=4)]
    packed = pack_texts(texts, tiny_tokenizer, block_size=64)
    collator = DataCollatorForLanguageModeling(tiny_tokenizer, mlm_probability=0.15, seed=0)
    features = [{"input_ids": i, "special_tokens_mask": s}
                for i, s in zip(packed["input_ids"], packed["special_tokens_mask"])]
    batch = collator(features)
    special = torch.zeros_like(batch["labels"], dtype=torch.bool)
    for row, mask in enumerate(packed["special_tokens_mask"]):
        special[row, : len(mask)] = torch.tensor(mask, dtype=torch.bool)
    padding = batch["attention_mask"] == 0
    masked = batch["labels"] != -100
    assert not (masked & special).any()
    assert not (masked & padding).any()
    rate = masked.sum().item() / (~special & ~padding).sum().item()
    assert 0.13 < rate < 0.17


def test_missing_text_column_lists_columns(labeled_files):
    raw = load(labeled_files["train"])
    with pytest.raises(UserInputError, match=r"--text_column 'body' is not in the data. Columns found: text, label"):
        resolve_text_column(raw["train"], "body")


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        (b"", ".txt", "is empty"),
        (b"\x00\x01\x02binary", ".txt", "looks binary"),
        (b"caf\xe9 au lait\n" * 10, ".txt", "is not UTF-8"),
        (b"a,b\n1,2\n", ".parquet", "unsupported extension"),
    ],
)
def test_bad_files(tmp_path, content, suffix, message):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(content)
    with pytest.raises(UserInputError, match=message):
        load(path)


def test_missing_file(tmp_path):
    with pytest.raises(UserInputError, match="no such file"):
        load(tmp_path / "nope.txt")


def test_stratified_indices_keep_proportions_and_are_seeded():
    labels = ["a"] * 600 + ["b"] * 300 + ["c"] * 100
    chosen = stratified_indices(labels, 100, seed=7)
    counts = collections.Counter(labels[i] for i in chosen)
    assert counts == {"a": 60, "b": 30, "c": 10}
    assert (chosen == stratified_indices(labels, 100, seed=7)).all()
    assert not (chosen == stratified_indices(labels, 100, seed=8)).all()
