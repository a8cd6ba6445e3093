"""`--objective simcse`: unsupervised SimCSE in stage 1, its saved encoder, and
`--continued_pretraining_objective simcse` before fine-tuning."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import run_script, tiny_bert_config
from safetensors.torch import load_file
from test_continued_pretraining import finetune_args
from test_tsdae import masked_batch
from transformers import AutoModel, BertForMaskedLM

from tlnlp.core.config import FinetuneConfig, PretrainConfig, parse_config
from tlnlp.core.errors import UserInputError
from tlnlp.finetune import main
from tlnlp.models.simcse import TEMPERATURE, ContrastiveSentenceLoss
from tlnlp.pretrain import main as pretrain_main


def test_the_loss_finds_each_texts_second_view_among_the_batchs(tiny_tokenizer):
    torch.manual_seed(0)
    mlm = BertForMaskedLM(tiny_bert_config(len(tiny_tokenizer)))
    loss = ContrastiveSentenceLoss(mlm)
    # Only the encoder: the MLM head is not part of the loss (it would get no gradient).
    assert {id(p) for p in loss.parameters()} == {id(p) for p in mlm.bert.parameters()}
    batch = masked_batch(tiny_tokenizer, rows=6, length=10, deleted_share=0.3)
    original = torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])
    mask = batch["attention_mask"]

    # Validation (no dropout): the original against its masked copy, deterministic, and the loss is the
    # cross-entropy of the scaled cosine similarities with each text's own copy as the target.
    loss.eval()
    out = loss(**batch)
    again = loss(**batch)
    assert torch.equal(out.example_loss, again.example_loss)
    first = F.normalize(loss.sentence_vectors(original, mask), dim=-1)
    second = F.normalize(loss.sentence_vectors(batch["input_ids"], mask), dim=-1)
    expected = F.cross_entropy(first @ second.T / TEMPERATURE, torch.arange(6), reduction="none")
    assert torch.allclose(out.example_loss, expected, atol=1e-5)
    assert torch.isclose(out.loss, expected.mean(), atol=1e-6)
    hits = ((first @ second.T).argmax(dim=1) == torch.arange(6)).float()
    assert torch.equal(out.example_found, hits)
    # Unmasked, the two views are the same text: each finds itself.
    unmasked = {**batch, "input_ids": original, "labels": torch.full_like(original, -100)}
    assert loss(**unmasked).example_found.tolist() == [1.0] * 6

    # Training: two dropout passes over the original text (the masks are undone), so the views differ, and
    # the loss reaches the encoder's lowest layer.
    loss.train()
    torch.manual_seed(1)
    trained = loss(**batch)
    torch.manual_seed(1)
    assert torch.equal(loss(**unmasked).example_loss, trained.example_loss)  # what was masked is not read
    assert trained.loss > 0
    trained.loss.backward()
    assert mlm.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in mlm.cls.predictions.transform.parameters())  # (its decoder is the embeddings)


def test_simcse_stage1_trains_the_encoder_alone_without_a_head_warmup(tmp_path, headless_dir, corpus_file,
                                                                      cache_dir, caplog):
    out = tmp_path / "simcse"
    with caplog.at_level("INFO"):
        results = pretrain_main(parse_config(PretrainConfig, [
            "--model_name_or_path", str(headless_dir), "--objective", "simcse", "--train_file", str(corpus_file),
            "--line_by_line", "--max_seq_length", "32", "--per_device_train_batch_size", "8", "--max_train_steps",
            "8", "--learning_rate", "1e-3", "--mixed_precision", "no", "--cache_dir", str(cache_dir),
            "--output_dir", str(out)]))
    assert results["objective"] == "simcse" and 0 <= results["eval_retrieval_accuracy"] <= 1
    assert results["eval_loss"] > 0 and "eval_perplexity" not in results
    # The checkpoint has no MLM head, and SimCSE reads none: no warm-up, no head reported.
    assert "head_warmup_steps" not in results and "Head-only warm-up" not in caplog.text
    assert "has no MLM head weights" not in caplog.text
    saved = load_file(str(out / "model.safetensors"))
    assert not any(k.startswith("cls.") for k in saved)
    encoder = AutoModel.from_pretrained(out)  # the encoder alone, with the stock Auto class
    original = load_file(str(headless_dir / "model.safetensors"))
    assert set(original) - {k for k in original if k.startswith("pooler.")} <= set(saved)
    assert not torch.equal(encoder.encoder.layer[0].attention.self.query.weight,
                           original["encoder.layer.0.attention.self.query.weight"])
    card = (out / "README.md").read_text()
    assert "SimCSE" in card and "retrieval accuracy" in card


def test_simcse_needs_a_checkpoint(tmp_path, corpus_file, cache_dir):
    with pytest.raises(UserInputError, match="Give --model_name_or_path"):
        pretrain_main(parse_config(PretrainConfig, [
            "--objective", "simcse", "--model_size", "tiny", "--train_file", str(corpus_file),
            "--output_dir", str(tmp_path / "out"), "--cache_dir", str(cache_dir)]))
    assert not (tmp_path / "out").exists()


def test_continued_pretraining_with_simcse_is_cached_apart_and_recorded(tmp_path, labeled_files, headless_dir,
                                                                        cache_dir):
    args = ["--continued_pretraining", "task", "--continued_pretraining_gate", "probe", "--keep_adapted_encoder",
            "always"]
    results = main(parse_config(FinetuneConfig, finetune_args(
        labeled_files, headless_dir, tmp_path / "simcse", cache_dir, *args, "--continued_pretraining_objective",
        "simcse")))
    record = results["continued_pretraining"]
    assert record["objective"] == "simcse" and record["kept"] == "adapted" and record["head_warmup_steps"] == 0
    assert json.loads((tmp_path / "simcse" / "all_results.json").read_text())["continued_pretraining"] == record
    assert "SimCSE" in (tmp_path / "simcse" / "README.md").read_text()
    assert f"model_name_or_path: {record['adapted_encoder']}" in (tmp_path / "simcse" / "training_config.yaml").read_text()
    # The MLM encoder of the same corpus and options is another one.
    mlm = main(parse_config(FinetuneConfig, finetune_args(
        labeled_files, headless_dir, tmp_path / "mlm", cache_dir, *args)))["continued_pretraining"]
    assert mlm["objective"] == "mlm" and mlm["adapted_encoder"] != record["adapted_encoder"]


@pytest.mark.slow
def test_simcse_stage1_under_two_processes(tmp_path, headless_dir, corpus_file, cache_dir):
    """As users launch it: the encoder alone is wrapped for data parallelism, so no parameter goes unused."""
    out = tmp_path / "ddp"
    done = run_script("pretrain_mlm.py", [
        "--model_name_or_path", str(headless_dir), "--objective", "simcse", "--train_file", str(corpus_file),
        "--line_by_line", "--max_seq_length", "32", "--per_device_train_batch_size", "4", "--max_train_steps", "4",
        "--mixed_precision", "no", "--cache_dir", str(cache_dir), "--output_dir", str(out)], processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["num_processes"] == 2 and results["objective"] == "simcse"
    assert AutoModel.from_pretrained(out).config.model_type == "bert"
