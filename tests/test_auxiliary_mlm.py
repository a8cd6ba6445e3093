"""MLM as an auxiliary loss during fine-tuning (--auxiliary_mlm): what it reads, what it trains, what it saves,
and the bad input refused before any training."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, run_script
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, GPT2Config, GPT2Model

from tlnlp.core.config import FinetuneConfig, parse_config
from tlnlp.core.errors import UserInputError
from tlnlp.finetune import main
from tlnlp.stage2.auxiliary_mlm import UnlabeledBatches


def finetune_args(labeled_files, source, out, cache_dir, *extra):
    return ["--model_name_or_path", str(source), "--train_file", str(labeled_files["train"]),
            "--validation_file", str(labeled_files["validation"]), "--test_file", str(labeled_files["test"]),
            "--output_dir", str(out), "--cache_dir", str(cache_dir), "--num_train_epochs", "1",
            "--per_device_train_batch_size", "16", "--max_seq_length", "32", "--mixed_precision", "no",
            "--min_train_steps", "0", *extra]


def first_texts(path, n=1):
    return [row.split(",", 1)[0] for row in path.read_text().splitlines()[1:n + 1]]


def test_auxiliary_mlm_reads_no_held_out_text_trains_the_encoder_and_saves_the_classifier_alone(
        tmp_path, labeled_files, headless_dir, corpus_file, cache_dir):
    # A corpus with one validation and one test text among its lines: both are dropped.
    corpus = tmp_path / "unlabeled.txt"
    lines = corpus_file.read_text().splitlines()
    corpus.write_text("\n".join(lines + first_texts(labeled_files["validation"]) + first_texts(labeled_files["test"]))
                      + "\n")
    plain = main(parse_config(FinetuneConfig, finetune_args(labeled_files, headless_dir, tmp_path / "plain", cache_dir)))
    results = main(parse_config(FinetuneConfig, finetune_args(labeled_files, headless_dir, tmp_path / "aux", cache_dir,
                                                              "--auxiliary_mlm", str(corpus))))
    record = results["auxiliary_mlm"]
    assert record["corpus_texts"] == len(lines)  # the two held-out texts were dropped
    assert record["head"] == "new" and record["head_learning_rate"] == pytest.approx(20 * 1e-4)
    assert 0 < record["mean_mlm_loss"] < 20
    assert results["optimizer_steps"] == plain["optimizer_steps"]  # the labeled batches set the length
    # The MLM loss reached the encoder: same seed, same labeled batches, other weights.
    saved = load_file(str(tmp_path / "aux" / "model.safetensors"))
    baseline = load_file(str(tmp_path / "plain" / "model.safetensors"))
    assert set(saved) == set(baseline)  # the classifier alone: no MLM head saved
    assert not any(k.startswith("cls.") for k in saved)
    layer = next(k for k in saved if "layer.0.attention.self.query.weight" in k)
    assert not torch.equal(saved[layer], baseline[layer])
    # It loads with the stock Auto class, and the test split was scored by the classifier.
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "aux")
    assert model.config.num_labels == 3 and 0 <= results["test_accuracy"] <= 1
    on_disk = json.loads((tmp_path / "aux" / "all_results.json").read_text())
    assert on_disk["auxiliary_mlm"]["corpus_texts"] == len(lines)
    assert "Auxiliary MLM loss" in (tmp_path / "aux" / "README.md").read_text()


def test_a_checkpoint_with_an_mlm_head_uses_it_at_the_encoders_rate_and_task_reads_the_training_texts(
        tmp_path, labeled_files, tiny_mlm_dir, cache_dir):
    results = main(parse_config(FinetuneConfig, finetune_args(labeled_files, tiny_mlm_dir, tmp_path / "t", cache_dir,
                                                              "--auxiliary_mlm", "task", "--auxiliary_mlm_weight", "0.5")))
    record = results["auxiliary_mlm"]
    train_rows = len(labeled_files["train"].read_text().splitlines()) - 1
    assert record["corpus_texts"] == train_rows and record["corpus"].startswith("the task's training texts")
    assert record["head"] == "checkpoint" and record["head_learning_rate"] == pytest.approx(1e-4)
    assert record["weight"] == 0.5


def test_each_process_reads_its_own_share_of_the_unlabeled_texts_in_a_seeded_order(tiny_tokenizer):
    rows = [{"input_ids": [2, 10 + i, 3], "special_tokens_mask": [1, 0, 1]} for i in range(8)]
    seen = []
    for rank in (0, 1):
        batches = UnlabeledBatches(rows, tiny_tokenizer, seed=5, process_index=rank, num_processes=2)
        seen.append([row["input_ids"][1] for row in batches.next_rows(4)])
    assert sorted(seen[0] + seen[1]) == list(range(10, 18))  # one pass, split between the processes
    again = UnlabeledBatches(rows, tiny_tokenizer, seed=5, process_index=0, num_processes=2)
    assert [row["input_ids"][1] for row in again.next_rows(4)] == seen[0]
    batch = again({"input_ids": torch.zeros(3, 4, dtype=torch.long), "attention_mask": torch.ones(3, 4)})
    assert batch["mlm_input_ids"].shape == batch["mlm_labels"].shape == (3, 3)
    assert (batch["mlm_labels"][:, [0, 2]] == -100).all()  # special tokens are never masked


def test_bad_input_is_refused_before_any_training(tmp_path, labeled_files, headless_dir, cache_dir):
    def run(source, *extra):
        return main(parse_config(FinetuneConfig, finetune_args(labeled_files, source, tmp_path / "x", cache_dir, *extra)))

    with pytest.raises(UserInputError, match="no such file"):
        run(headless_dir, "--auxiliary_mlm", str(tmp_path / "nowhere.txt"))
    held_out_only = tmp_path / "held_out.txt"
    held_out_only.write_text("\n".join(first_texts(labeled_files["test"], 3)) + "\n")
    with pytest.raises(UserInputError, match="validation or test"):
        run(headless_dir, "--auxiliary_mlm", str(held_out_only))
    with pytest.raises(UserInputError, match="--auxiliary_mlm_weight must be greater than 0"):
        run(headless_dir, "--auxiliary_mlm", "task", "--auxiliary_mlm_weight", "0")
    with pytest.raises(UserInputError, match="--cache_frozen_features"):
        run(headless_dir, "--auxiliary_mlm", "task", "--freeze_embeddings", "--cache_frozen_features")
    no_mlm = tmp_path / "gpt2"
    GPT2Model(GPT2Config(vocab_size=200, n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(no_mlm)
    with pytest.raises(UserInputError, match="masked-language-model class"):
        run(no_mlm, "--auxiliary_mlm", "task", "--tokenizer_name", str(headless_dir))
    assert not (tmp_path / "x").exists()


def test_two_processes_under_accelerate_launch_end_with_the_same_classifier(tiny_mlm_dir, labeled_files, tmp_path,
                                                                           cache_dir):
    out, reports = tmp_path / "ddp", tmp_path / "reports"
    reports.mkdir()
    args = finetune_args(labeled_files, tiny_mlm_dir, out, cache_dir, "--auxiliary_mlm", "task")
    done = run_script("", [str(reports), "finetune", *args], processes=2, wrapper=REPO / "tests" / "rank_report.py")
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((reports / f"rank{i}.json").read_text()) for i in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["digest"] == ranks[1]["digest"]
    results = json.loads((out / "all_results.json").read_text())
    assert results["num_processes"] == 2 and results["auxiliary_mlm"]["head"] == "checkpoint"
    assert 0 < results["auxiliary_mlm"]["mean_mlm_loss"] < 20
    assert AutoModelForSequenceClassification.from_pretrained(out).config.num_labels == 3


def test_self_training_adds_it_to_the_teacher_and_every_student(tmp_path, labeled_files, headless_dir, corpus_file,
                                                                cache_dir):
    out = tmp_path / "st"
    main(parse_config(FinetuneConfig, finetune_args(labeled_files, headless_dir, out, cache_dir, "--auxiliary_mlm",
                                                    str(corpus_file), "--unlabeled_file", str(corpus_file),
                                                    "--self_training_rounds", "1")))
    for run in ("round0", "round1"):
        record = json.loads((out / "self_training" / run / "all_results.json").read_text())["auxiliary_mlm"]
        assert record["corpus_texts"] == len(corpus_file.read_text().splitlines()) and record["mean_mlm_loss"] > 0
