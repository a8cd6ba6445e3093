"""Stage 2: head surgery, freezing, learning rates, early stopping, round trips and bad input."""

import json
import logging
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import REPO, make_documents, run_script, tiny_bert_config, write_labeled
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification, pipeline

from tlnlp.core.config import HEAD_LR_MULTIPLIER, FinetuneConfig, PretrainConfig, parse_config
from tlnlp.core.errors import UserInputError
from tlnlp.data.prepare import LengthGroupedSampler
from tlnlp.finetune import main
from tlnlp.models.classifier import TlnlpForSequenceClassification
from tlnlp.models.modeling import learning_rate_scales
from tlnlp.pretrain import main as pretrain_main
from tlnlp.stage2.transfer import (
    CachedFeatureClassifier,
    HeadSpec,
    UnfreezeSchedule,
    build_classifier,
    freeze,
    pad_features,
)

LABELS = {0: "music", 1: "science", 2: "sports"}


def surgery(source, head=HeadSpec([], None, "gelu", "cls"), **kwargs):
    return build_classifier(str(source), num_labels=3, id2label=LABELS, task_type="single_label", head=head, **kwargs)


def test_surgery_keeps_every_encoder_weight_and_only_the_head_is_new(tiny_mlm_dir):
    checkpoint = load_file(tiny_mlm_dir / "model.safetensors")
    for head in (HeadSpec([], None, "gelu", "cls"), HeadSpec([16, 8], 0.2, "relu", "mean")):
        model, report = surgery(tiny_mlm_dir, head)
        prefix = model.base_model_prefix + "."
        state = model.state_dict()
        encoder_keys = [k for k in state if k.startswith(prefix) and not k.startswith(prefix + "pooler")]
        assert encoder_keys and sorted(encoder_keys) == sorted(report.loaded)
        for key in encoder_keys:
            assert torch.equal(state[key], checkpoint["bert." + key[len(prefix):]]), key
        assert sorted(report.new) == sorted(set(state) - set(encoder_keys))
        assert all(k.startswith(("classifier.", "head.", prefix + "pooler.")) for k in report.new)
        assert any(k.startswith("cls.predictions") for k in report.dropped)  # the MLM head is gone
        assert isinstance(model, BertForSequenceClassification if head.is_stock else TlnlpForSequenceClassification)


def test_surgery_refuses_a_checkpoint_that_lacks_encoder_weights(tmp_path, tiny_mlm_dir):
    from transformers import BertModel

    BertModel(tiny_bert_config(200, layers=1)).save_pretrained(tmp_path)
    tiny_bert_config(200, layers=2).save_pretrained(tmp_path)  # the config promises a second layer
    with pytest.raises(UserInputError, match=r"lacks encoder weights: encoder\.layer\.1\..*Refusing to initialise"):
        surgery(tmp_path)
    with pytest.raises(UserInputError, match="is not a model folder, built-in model or reachable Hub id"):
        surgery(tmp_path / "nowhere")


def test_from_scratch_loads_nothing(tiny_mlm_dir):
    model, report = surgery(tiny_mlm_dir, from_scratch=True)
    checkpoint = load_file(tiny_mlm_dir / "model.safetensors")
    assert report.loaded == []
    weight = model.state_dict()["bert.encoder.layer.0.attention.self.query.weight"]
    assert not torch.equal(weight, checkpoint["bert.encoder.layer.0.attention.self.query.weight"])


def test_layerwise_learning_rates(tiny_mlm_dir):
    model, _ = surgery(tiny_mlm_dir, HeadSpec([8], None, "gelu", "mean"))
    scales = learning_rate_scales(model, decay=0.5, head_scale=4.0)
    assert scales["encoder.embeddings.word_embeddings.weight"] == 0.5**3
    assert scales["encoder.encoder.layer.0.output.dense.weight"] == 0.5**2
    assert scales["encoder.encoder.layer.1.output.dense.weight"] == 0.5
    assert scales["head.1.weight"] == 4.0 and scales["head.4.bias"] == 4.0


def test_freeze_and_gradual_unfreezing(tiny_mlm_dir):
    model, _ = surgery(tiny_mlm_dir, HeadSpec([], None, "gelu", "mean"))
    with pytest.raises(UserInputError, match="--freeze_layers 3 is more than the encoder's 2 layers"):
        freeze(model, embeddings=False, layers=3)
    freeze(model, embeddings=False, layers=1)
    assert not any(p.requires_grad for p in model.encoder.encoder.layer[0].parameters())
    assert all(p.requires_grad for p in model.encoder.encoder.layer[1].parameters())
    schedule = UnfreezeSchedule(model, "epoch")
    assert len(schedule.units) == 2  # layer 1, then the embeddings; layer 0 stays frozen for good
    assert [schedule.trainable_units(0, epoch) for epoch in range(4)] == [0, 1, 2, 2]
    for p in model.parameters():
        p.grad = torch.ones_like(p) if p.requires_grad else None
    schedule(step=0, epoch=0)
    assert all(p.grad is None for p in model.encoder.encoder.layer[1].parameters())
    assert all(p.grad is not None for p in model.head.parameters())
    assert UnfreezeSchedule(model, "5").trainable_units(12, 0) == 2


@pytest.mark.parametrize("head", [HeadSpec([], None, "gelu", "cls"), HeadSpec([16], 0.3, "gelu", "mean")])
@pytest.mark.parametrize("frozen_layers", [0, 1, 2])
def test_cached_features_give_the_plain_models_logits(tiny_mlm_dir, tiny_tokenizer, head, frozen_layers):
    from datasets import Dataset

    model, _ = surgery(tiny_mlm_dir, head)
    freeze(model, embeddings=True, layers=frozen_layers)
    texts = [text for _, text in make_documents(12, seed=3)]
    encoded = tiny_tokenizer([t[: 20 + 9 * i] for i, t in enumerate(texts)], truncation=True, max_length=40)
    dataset = Dataset.from_dict({**encoded, "labels": [i % 3 for i in range(len(texts))]})
    assert len({len(ids) for ids in dataset["input_ids"]}) > 3  # real padding inside batches
    cached = CachedFeatureClassifier(model, frozen_layers)
    items = cached.cache(dataset, batch_size=5, device=torch.device("cpu"), pad_token_id=tiny_tokenizer.pad_token_id,
                         desc="test")
    model.eval()
    with torch.no_grad():
        plain = tiny_tokenizer.pad({k: dataset[k] for k in ("input_ids", "attention_mask", "token_type_ids")},
                                   return_tensors="pt")
        expected = model(**plain).logits
        batch = pad_features(items)
        labels = batch.pop("labels")
        found = cached(**batch).logits
        assert torch.allclose(expected, found, atol=1e-5), (expected - found).abs().max()
        assert labels.tolist() == dataset["labels"]
        assert cached(**batch, labels=labels).loss.item() == pytest.approx(model(**plain, labels=labels).loss.item(),
                                                                          abs=1e-5)
    assert set(cached.model.state_dict()) == set(model.state_dict())  # the wrapped model is left as it was
    cached.train()
    frozen = [model.base_model.embeddings, *model.base_model.encoder.layer[:frozen_layers]]
    assert all(not m.training for m in frozen)
    assert all(m.training for m in model.base_model.encoder.layer[frozen_layers:])


def test_cache_refuses_a_trainable_bottom(tiny_mlm_dir):
    model, _ = surgery(tiny_mlm_dir)
    freeze(model, embeddings=False, layers=1)
    with pytest.raises(UserInputError, match="frozen"):
        CachedFeatureClassifier(model, 1)


def test_length_grouped_batches():
    lengths = [int(x) for x in torch.randint(5, 120, (203,), generator=torch.Generator().manual_seed(0))]
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=3, mega_batches=5)
    epoch0 = list(sampler)
    assert sorted(epoch0) == list(range(203)) and list(sampler) == epoch0  # a permutation, repeatable
    sampler.set_epoch(1)
    assert list(sampler) != epoch0  # a fresh grouping every epoch
    batches = [epoch0[i: i + 8] for i in range(0, 203, 8)]
    assert len(batches[-1]) == 203 % 8  # the short batch comes last, so DataLoader batching keeps the groups
    padded = sum(8 * max(lengths[i] for i in b) for b in batches[:-1])
    random_order = torch.randperm(203, generator=torch.Generator().manual_seed(1)).tolist()
    random_padded = sum(8 * max(lengths[i] for i in random_order[j: j + 8]) for j in range(0, 200, 8))
    assert padded < 0.8 * random_padded


def run_main(args):
    AcceleratorState._reset_state(reset_partial_state=True)
    return main(parse_config(FinetuneConfig, args))


def ft_args(model_dir, files, out, cache_dir, *extra):
    args = ["--model_name_or_path", str(model_dir), "--train_file", str(files["train"]), "--output_dir", str(out),
            "--cache_dir", str(cache_dir), "--per_device_train_batch_size", "16", "--learning_rate", "3e-3",
            "--num_train_epochs", "3", "--max_seq_length", "48", "--seed", "1", "--logging_steps", "5",
            "--min_train_steps", "0"]  # the epochs each test names, not the default floor of 100 steps
    if "validation" in files:
        args += ["--validation_file", str(files["validation"])]
    if "test" in files:
        args += ["--test_file", str(files["test"])]
    return args + list(extra)


# The second case trains under bf16 autocast: the test split is still evaluated in fp32, so the written
# predictions equal the stock pipeline's to 1e-5.
@pytest.mark.parametrize("head_args", [["--mixed_precision", "no"],
                                       ["--head_hidden_sizes", "16,8", "--pooling", "mean", "--mixed_precision", "bf16"]])
def test_round_trip_through_pipeline_matches_tlnlp(tiny_mlm_dir, labeled_files, tmp_path, cache_dir, head_args):
    out = tmp_path / "model"
    results = run_main(ft_args(tiny_mlm_dir, labeled_files, out, cache_dir, *head_args, "--num_train_epochs", "6",
                               "--seed", "2"))
    assert results["mixed_precision"] == head_args[-1]
    assert results["test_accuracy"] > 0.6  # three clearly separable topics
    predictions = [json.loads(line) for line in (out / "test_predictions.jsonl").read_text().splitlines()]
    texts = [p["text"] for p in predictions]
    classify = pipeline("text-classification", model=str(out))  # stock loader, no trust_remote_code
    for mine, theirs in zip(predictions, classify(texts, top_k=None, truncation=True, max_length=48)):
        assert mine["label"] == max(theirs, key=lambda r: r["score"])["label"]
        for row in theirs:
            assert row["score"] == pytest.approx(mine["probabilities"][row["label"]], abs=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "music", "1": "science", "2": "sports"}
    stock = "--head_hidden_sizes" not in head_args
    assert ("auto_map" in config) is not stock
    saved = json.loads((out / "all_results.json").read_text())
    assert {"eval_accuracy", "eval_macro_f1", "eval_mcc", "test_accuracy", "test_macro_f1", "test_mcc"} <= set(saved)


def test_early_stopping_restores_the_best_model(tiny_mlm_dir, labeled_files, tmp_path, cache_dir):
    # Shuffled training labels make validation accuracy wander, so patience runs out.
    rows = _csv_rows(labeled_files["train"])
    rng = np.random.default_rng(0)
    for row, label in zip(rows, rng.permutation([r["label"] for r in rows])):
        row["label"] = label
    files = {"train": write_labeled(tmp_path / "noisy.csv", rows), "validation": labeled_files["validation"]}
    out = tmp_path / "model"
    results = run_main(ft_args(tiny_mlm_dir, files, out, cache_dir, "--eval_steps", "1", "--early_stopping_patience",
                               "2", "--num_train_epochs", "4", "--learning_rate", "1e-2"))
    history = json.loads((out / "eval_history.json").read_text())
    best = max(history, key=lambda h: h["accuracy"])
    assert results["optimizer_steps"] < 4 * 12  # 4 epochs of 12 steps: it stopped before the end
    assert history[-1]["step"] == best["step"] + 2  # two evaluations without improvement, then stop
    assert results["best_step"] == best["step"] and results["eval_accuracy"] == best["accuracy"]
    # The saved model is the best one: evaluating it again gives the best accuracy.
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    validation = _csv_rows(labeled_files["validation"])
    with torch.no_grad():
        batch = tokenizer([r["text"] for r in validation], padding=True, truncation=True, max_length=48,
                          return_tensors="pt")
        predicted = model(**batch).logits.argmax(-1).tolist()
    accuracy = np.mean([model.config.id2label[p] == r["label"] for p, r in zip(predicted, validation)])
    assert accuracy == pytest.approx(best["accuracy"])


def _csv_rows(path):
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def test_multi_label_and_regression(tiny_mlm_dir, tmp_path, cache_dir):
    docs = make_documents(120, seed=2)
    multi = [{"text": t, "label": [topic] + (["long"] if len(t.split()) > 18 else [])} for topic, t in docs]
    files = {"train": write_labeled(tmp_path / "multi.jsonl", multi)}
    results = run_main(ft_args(tiny_mlm_dir, files, tmp_path / "multi", cache_dir))
    assert results["task_type"] == "multi_label" and "eval_micro_f1" in results
    assert sorted(results["label_names"]) == ["long", "music", "science", "sports"]

    regression = [{"text": t, "label": len(t.split()) / 10} for _, t in docs]
    files = {"train": write_labeled(tmp_path / "reg.jsonl", regression)}
    results = run_main(ft_args(tiny_mlm_dir, files, tmp_path / "reg", cache_dir, "--head_hidden_sizes", "16",
                               "--pooling", "mean"))
    assert results["task_type"] == "regression"
    assert {"eval_mse", "eval_pearson", "eval_spearman"} <= set(results) and math.isfinite(results["eval_mse"])


def bad_rows(kind):
    rows = [{"text": t, "label": topic, "pair": t[:10]} for topic, t in make_documents(60, seed=3)]
    if kind == "empty_text":
        rows[4]["text"] = "   "
    if kind == "missing_label":
        rows[7]["label"] = None
    if kind == "single_class":
        for r in rows:
            r["label"] = "sports"
    if kind == "empty_pair":
        rows[2]["pair"] = ""
    return rows


@pytest.mark.parametrize(
    "kind, extra, message",
    [
        ("empty_text", [], r"The train data has 1 row\(s\) with empty texts \(rows 4"),
        ("missing_label", [], r"The train data has 1 row\(s\) with missing or NaN labels \(rows 7"),
        ("single_class", [], r"a single class \('sports'\); a classifier needs at least two"),
        ("empty_pair", ["--text_pair_column", "pair"], r"1 row\(s\) with an empty 'pair' \(pair\) text \(rows 2"),
        ("ok", ["--text_column", "body"], r"--text_column 'body' is not in the data. Columns found: text, "
                                          r"label, pair"),
        ("ok", ["--max_train_samples", "500"], "--max_train_samples 500 is more than the 57 training examples"),
        ("ok", ["--freeze_layers", "3"], "--freeze_layers 3 is more than the encoder's 2 layers"),
        ("ok", ["--validation_split_percentage", "0", "--restore_best_model", "true"],
         r"Keeping the best epoch \(--restore_best_model true, or --early_stopping_patience\) needs a validation "
         r"split, and --validation_split_percentage 0 holds none out"),
        ("ok", ["--validation_split_percentage", "0", "--early_stopping_patience", "2"], "Give --validation_file"),
        ("ok", ["--validation_split_percentage", "100"], "--validation_split_percentage must be from 0 up to 100"),
    ],
)
def test_bad_input_is_refused_before_training(tiny_mlm_dir, tmp_path, cache_dir, kind, extra, message):
    files = {"train": write_labeled(tmp_path / "train.jsonl", bad_rows(kind))}
    out = tmp_path / "out"
    with pytest.raises(UserInputError, match=message):
        run_main(ft_args(tiny_mlm_dir, files, out, cache_dir, *extra))
    assert not out.exists()


def test_unseen_validation_label_is_refused(tiny_mlm_dir, tmp_path, cache_dir):
    rows = [{"text": t, "label": topic} for topic, t in make_documents(60, seed=3)]
    validation = [dict(r) for r in rows[:10]]
    validation[3]["label"] = "sprots"
    files = {"train": write_labeled(tmp_path / "train.csv", rows),
             "validation": write_labeled(tmp_path / "validation.csv", validation)}
    with pytest.raises(UserInputError, match=r"The validation data has label\(s\) never seen in training: 'sprots'"):
        run_main(ft_args(tiny_mlm_dir, files, tmp_path / "out", cache_dir))
    assert not (tmp_path / "out").exists()


# The cached case also runs with no validation split (every label trained on, nothing evaluated on any rank).
@pytest.mark.parametrize("cache", [[], ["--cache_frozen_features", "--validation_split_percentage", "0"]])
def test_two_process_run_with_frozen_layers(tiny_mlm_dir, labeled_files, tmp_path, cache_dir, cache):
    out, reports = tmp_path / "ddp", tmp_path / "reports"
    reports.mkdir()
    files = {k: v for k, v in labeled_files.items() if not (cache and k == "validation")}
    args = ft_args(tiny_mlm_dir, files, out, cache_dir, "--freeze_embeddings", "--freeze_layers", "1",
                   "--num_train_epochs", "1", "--head_hidden_sizes", "16", *cache)
    done = run_script("", [str(reports), "finetune", *args], processes=2, wrapper=REPO / "tests" / "rank_report.py")
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((reports / f"rank{i}.json").read_text()) for i in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["digest"] == ranks[1]["digest"]
    checkpoint = load_file(tiny_mlm_dir / "model.safetensors")
    frozen = torch.load(reports / "frozen0.pt")
    assert len(frozen) == ranks[0]["frozen"] > 0
    for name, tensor in frozen.items():  # frozen weights are exactly the checkpoint's after training
        assert torch.equal(tensor, checkpoint["bert." + name.removeprefix("model.").removeprefix("encoder.")]), name
    model = AutoModelForSequenceClassification.from_pretrained(out)
    frozen_names = {name.removeprefix("model.") for name in frozen}  # the cache wrapper's prefix
    trainable = sum(p.numel() for n, p in model.named_parameters() if n not in frozen_names)
    assert ranks[0]["trainable_in_optimizer"] == trainable  # the optimizer holds only what trains
    results = json.loads((out / "all_results.json").read_text())
    assert results["num_processes"] == 2 and ("feature_cache_s" in results) == bool(cache)
    assert results["eval_examples"] == (0 if cache else 60) and results["train_set_size"] == 180 and "test_accuracy" in results


@pytest.mark.parametrize("cache", [[], ["--cache_frozen_features"]])
def test_the_head_learns_at_its_own_rate_with_and_without_the_feature_cache(tiny_mlm_dir, labeled_files, tmp_path,
                                                                          cache_dir, cache):
    """An encoder rate too small to move anything and a head rate that learns: the head alone must learn the
    three topics, through the plain model and through the cache wrapper (which renames the parameters)."""
    out = tmp_path / "head"
    run_main(ft_args(tiny_mlm_dir, labeled_files, out, cache_dir, "--freeze_embeddings", "--freeze_layers", "1",
                     "--learning_rate", "1e-12", "--head_learning_rate", "1e-2", "--pooling", "mean", "--num_train_epochs", "4",
                     *cache))
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_predicted_classes"] == 3 and results["eval_accuracy"] > 0.6, results
    checkpoint = load_file(tiny_mlm_dir / "model.safetensors")
    trained = load_file(out / "model.safetensors")
    top = [n for n in checkpoint if n.startswith("bert.encoder.layer.1.")]  # trainable, at the encoder's rate
    assert top and all(torch.allclose(trained["encoder." + n.removeprefix("bert.")], checkpoint[n], atol=1e-8)
                       for n in top)


def test_the_default_head_rate_learns_where_the_encoders_rate_leaves_a_chance_classifier(
        tiny_mlm_dir, labeled_files, tmp_path, cache_dir):
    """Issue 14's underfitting case in small: a frozen bottom, a small learning rate, 3 epochs. At the encoder's
    rate the head learns nothing (flagged); at the default head rate (HEAD_LR_MULTIPLIER x) it learns the topics."""
    frozen = ["--freeze_embeddings", "--freeze_layers", "1", "--learning_rate", "3e-4", "--pooling", "mean"]
    same = run_main(ft_args(tiny_mlm_dir, labeled_files, tmp_path / "same", cache_dir, *frozen,
                            "--head_learning_rate", "3e-4"))
    assert same["eval_mcc"] <= 0.05 and "underfitting_warning" in same, same
    default = run_main(ft_args(tiny_mlm_dir, labeled_files, tmp_path / "default", cache_dir, *frozen))
    assert default["head_learning_rate"] == pytest.approx(HEAD_LR_MULTIPLIER * 3e-4)
    assert default["eval_accuracy"] > 0.8 and "underfitting_warning" not in default, default
    assert f"learning rate {HEAD_LR_MULTIPLIER * 3e-4:g}; frozen" in (tmp_path / "default" / "README.md").read_text()


def test_modernbert_from_scratch_through_both_stages(corpus_file, labeled_files, tmp_path, cache_dir):
    """`--architecture modernbert`: stage 1 learns, and stage 2's freezing and feature cache find its layers."""
    stage1 = tmp_path / "stage1"
    AcceleratorState._reset_state(reset_partial_state=True)
    pretrain_main(parse_config(PretrainConfig, [
        "--train_file", str(corpus_file), "--output_dir", str(stage1), "--cache_dir", str(cache_dir),
        "--architecture", "modernbert", "--model_size", "tiny", "--hidden_size", "32", "--num_attention_heads", "2",
        "--intermediate_size", "48", "--vocab_size", "200", "--max_seq_length", "32",
        "--per_device_train_batch_size", "8", "--learning_rate", "2e-3", "--num_train_epochs", "3", "--seed", "3"]))
    assert json.loads((stage1 / "config.json").read_text())["model_type"] == "modernbert"
    history = json.loads((stage1 / "eval_history.json").read_text())
    vocab = len(json.loads((stage1 / "tokenizer.json").read_text())["model"]["vocab"])
    assert history[-1]["loss"] < history[0]["loss"] < math.log(vocab) - 0.5, history  # untrained: about ln(vocab)
    assert history[-1]["loss"] < math.log(vocab) - 1.0, history

    out = tmp_path / "classifier"
    results = run_main(ft_args(stage1, labeled_files, out, cache_dir, "--freeze_embeddings", "--freeze_layers", "1",
                               "--cache_frozen_features", "--num_train_epochs", "5"))
    assert results["test_accuracy"] > 0.6  # three clearly separable topics
    checkpoint = load_file(stage1 / "model.safetensors")
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(model).__name__ == "ModernBertForSequenceClassification"
    frozen = [n for n in checkpoint if n.startswith(("model.embeddings.", "model.layers.0."))]
    assert frozen and all(torch.equal(model.state_dict()[n], checkpoint[n]) for n in frozen)
    trained = [n for n in checkpoint if n.startswith("model.layers.1.")]
    assert any(not torch.equal(model.state_dict()[n], checkpoint[n]) for n in trained)


def test_copies_of_training_rows_and_a_constant_classifier_are_reported(tiny_mlm_dir, tmp_path, cache_dir, caplog):
    """Test rows copied from training are counted per split; a model that predicts one class for the whole
    validation set gets a warning naming the fixes, and a flag in all_results.json."""
    rows = [{"text": text, "label": topic} for topic, text in make_documents(120, seed=4)]
    files = {"train": write_labeled(tmp_path / "train.csv", rows[:80]),
             "validation": write_labeled(tmp_path / "validation.csv", rows[80:100] + rows[:3]),
             "test": write_labeled(tmp_path / "test.csv", rows[100:] + rows[:5])}
    out = tmp_path / "constant"
    # A learning rate too small to move anything: the random head predicts the same class for everyone.
    run_main(ft_args(tiny_mlm_dir, files, out, cache_dir, "--learning_rate", "1e-9", "--num_train_epochs", "1",
                     "--max_length", "40"))
    results = json.loads((out / "all_results.json").read_text())
    assert results["copies_of_training_rows"] == {"validation": 3, "test": 5}
    assert "5 of the 25 test rows are exact copies of training rows" in caplog.text
    assert results["eval_predicted_classes"] == 1
    assert "predicts one class for every validation example" in results["underfitting_warning"]
    assert "--head_learning_rate" in caplog.text
    assert json.loads(json.dumps(results))["underfitting_warning"]
    config = (out / "training_config.yaml").read_text()
    assert "max_seq_length: 40" in config  # --max_length is the same option
    # The sanity baseline: TF-IDF + logistic regression on the same 80 labels beats a constant classifier.
    baseline = results["sanity_baseline"]
    assert baseline["fine_tuned_below_baseline"] is True and baseline["eval_accuracy"] > results["eval_accuracy"]
    assert "below TF-IDF + logistic regression" in baseline["warning"] and baseline["warning"] in caplog.text
    # By default the last model is kept: nothing was decided on the 23 validation examples.
    assert results["eval_examples"] == 23 and "small_validation_warning" not in results

    healthy = tmp_path / "healthy"
    run_main(ft_args(tiny_mlm_dir, {"train": files["train"], "validation": files["validation"]}, healthy, cache_dir,
                     "--num_train_epochs", "6", "--restore_best_model", "true"))
    results = json.loads((healthy / "all_results.json").read_text())
    assert results["eval_predicted_classes"] > 1 and "underfitting_warning" not in results
    # 23 validation examples picked the best of 6 epochs: the decision says how little that is.
    assert "only 23 validation examples" in results["small_validation_warning"]
    # (TF-IDF separates these keyword topics perfectly, so the tiny model stays below it here too; that the
    # warning stays away above the baseline is test_the_sanity_baseline_warns_only_below_it's part.)
    assert results["sanity_baseline"]["fine_tuned_eval"] == results["eval_accuracy"]


def test_no_validation_split_trains_on_every_label_and_checks_against_the_test_split(
        tiny_mlm_dir, labeled_files, tmp_path, cache_dir, caplog):
    """--validation_split_percentage 0: all 180 labels are trained on (12 steps an epoch at batch 16, where
    the default 5% leaves 171), nothing is evaluated during training, and the sanity baseline and the
    underfitting check read the test split instead."""
    files = {"train": labeled_files["train"], "test": labeled_files["test"]}
    out = tmp_path / "all-labels"
    results = run_main(ft_args(tiny_mlm_dir, files, out, cache_dir, "--validation_split_percentage", "0",
                               "--num_train_epochs", "6", "--seed", "2"))
    assert results["train_set_size"] == 180 and results["optimizer_steps"] == 6 * 12
    assert results["eval_examples"] == 0 and not any(k.startswith("eval_") and k != "eval_examples" for k in results)
    assert json.loads((out / "eval_history.json").read_text()) == []
    assert results["test_accuracy"] > 0.6  # it learned: three clearly separable topics
    baseline = results["sanity_baseline"]
    assert baseline["fine_tuned_test"] == results["test_accuracy"] and "test_accuracy" in baseline
    assert "on the test split" in caplog.text and "underfitting_warning" not in results
    assert AutoModelForSequenceClassification.from_pretrained(out).num_labels == 3  # saved, loadable
    held_out = run_main(ft_args(tiny_mlm_dir, files, tmp_path / "default-share", cache_dir, "--max_train_steps", "1"))
    assert held_out["train_set_size"] == 171 and held_out["eval_examples"] == 9

    # A learning rate too small to move anything: the constant classifier is caught on the test split.
    constant = run_main(ft_args(tiny_mlm_dir, files, tmp_path / "constant", cache_dir, "--validation_split_percentage",
                                "0", "--learning_rate", "1e-9", "--num_train_epochs", "1"))
    assert "has MCC 0.000 on the test split" in constant["underfitting_warning"]
    assert constant["sanity_baseline"]["fine_tuned_below_baseline"] is True
    # The frozen-feature cache checks itself on training examples when there is no validation split.
    cached = run_main(ft_args(tiny_mlm_dir, files, tmp_path / "cached", cache_dir, "--validation_split_percentage",
                              "0", "--cache_frozen_features", "--freeze_embeddings", "--freeze_layers", "1",
                              "--max_train_steps", "2"))
    assert cached["feature_cache_s"] > 0 and cached["eval_examples"] == 0 and cached["optimizer_steps"] == 2


def test_eval_history_counts_epochs_by_the_optimizer_steps(tiny_mlm_dir, labeled_files, tmp_path, cache_dir):
    """180 rows at batch 16 are 12 optimizer steps an epoch. The last evaluation of a 3-epoch run is at step
    36, epoch 3 (it was written as epoch 2: the run stops before the epoch counter moves on)."""
    out = tmp_path / "model"
    run_main(ft_args(tiny_mlm_dir, labeled_files, out, cache_dir, "--num_train_epochs", "3"))
    history = json.loads((out / "eval_history.json").read_text())
    assert [(h["step"], h["epoch"]) for h in history] == [(12, 1), (24, 2), (36, 3)]
    steps = tmp_path / "by_steps"
    run_main(ft_args(tiny_mlm_dir, labeled_files, steps, cache_dir, "--num_train_epochs", "1", "--eval_steps", "6"))
    history = json.loads((steps / "eval_history.json").read_text())
    assert [(h["step"], h["epoch"]) for h in history] == [(6, 0.5), (12, 1)]


def test_cut_texts_are_counted_and_warned_of_only_when_most_are_cut_and_the_model_reads_more(caplog):
    from tlnlp.stage2.phases import report_cut_texts

    caplog.set_level(logging.INFO)
    mostly_short = [10, 10, 10, 128]
    assert report_cut_texts(mostly_short, 128, 512) is None
    assert "1 of 4 training texts (25%) reach --max_seq_length 128" in caplog.text and "WARNING" not in caplog.text
    mostly_long = [10, 128, 128]
    warning = report_cut_texts(mostly_long, 128, 512)
    assert warning.startswith("67% of the training texts are longer than --max_seq_length 128")
    assert "--max_seq_length 512 reads more of them" in warning and warning in caplog.text
    assert "--max_seq_length 256 reads more" in report_cut_texts(mostly_long, 128, 256)  # at most the model's limit
    assert "--max_seq_length 512 reads more" in report_cut_texts(mostly_long, 128, 8192)  # the length measured
    assert report_cut_texts(mostly_long, 128, 128) is None  # the model reads no more: nothing to offer
    assert report_cut_texts([512] * 3, 512, 8192) is None  # all cut, but already at the longer length


def test_a_decision_on_few_validation_examples_warns_and_names_the_fix(caplog):
    from tlnlp.stage2.metrics import SMALL_VALIDATION, decided_on

    caplog.set_level(logging.INFO)  # on its own, before any run has set up logging, INFO is below the root's level
    assert decided_on("The best epoch", SMALL_VALIDATION, "Use more.") is None
    assert "decided on 200 validation examples" in caplog.text and "WARNING" not in caplog.text
    warning = decided_on("The best epoch", 50, "Give a --validation_file.")
    assert "only 50 validation examples" in warning and "one example is 2.0 points" in warning
    assert warning.endswith("Give a --validation_file.") and warning in caplog.text


def test_the_sanity_baseline_warns_only_below_it():
    from tlnlp.stage2.sanity import sanity_baseline

    texts = [f"goal match team {i}" for i in range(20)] + [f"atom energy cell {i}" for i in range(20)]
    labels = ["sports"] * 20 + ["science"] * 20
    args = (texts[::2], labels[::2], texts[1::2], labels[1::2])
    low = sanity_baseline(*args, {"eval_accuracy": 0.5}, "accuracy", seed=0)
    assert low["eval_accuracy"] == 1.0 and low["fine_tuned_below_baseline"] and "warning" in low
    high = sanity_baseline(*args, {"eval_accuracy": 1.0, "eval_macro_f1": 1.0}, "macro_f1", seed=0)
    assert high["compared_by"] == "macro_f1" and not high["fine_tuned_below_baseline"] and "warning" not in high


def test_the_sanity_baseline_is_fitted_once_for_the_same_labels(monkeypatch):
    from datasets import Dataset

    from tlnlp.stage2 import sanity

    fitted = []
    fit = sanity.tfidf_logistic_regression
    monkeypatch.setattr(sanity, "tfidf_logistic_regression", lambda *a: fitted.append(1) or fit(*a))
    texts = [f"goal match team {i}" for i in range(10)] + [f"atom energy cell {i}" for i in range(10)]
    labels = ["sports"] * 10 + ["science"] * 10
    first = sanity.sanity_baseline(texts[::2], labels[::2], texts[1::2], labels[1::2], {"eval_accuracy": 0.5},
                                   "accuracy", seed=7)
    # As phases passes them: columns of a datasets.Dataset.
    train = Dataset.from_dict({"text": texts[::2], "label": labels[::2]})
    again = sanity.sanity_baseline(train["text"], train["label"], texts[1::2], labels[1::2], {"eval_accuracy": 0.9},
                                   "accuracy", seed=7)
    assert len(fitted) == 1 and again["eval_accuracy"] == first["eval_accuracy"]
    assert again["fine_tuned_eval"] == 0.9  # the model's own score is never cached
    other_labels = labels[::2][:-1] + ["sports"]
    sanity.sanity_baseline(texts[::2], other_labels, texts[1::2], labels[1::2], {"eval_accuracy": 0.5},
                           "accuracy", seed=7)
    assert len(fitted) == 2


@pytest.mark.slow
@pytest.mark.parametrize("module", ["tlnlp.pretrain", "tlnlp.finetune"])
def test_accelerate_launch_runs_the_installed_modules(module, corpus_file, labeled_files, tiny_mlm_dir, tmp_path):
    """`scripts/` is not in the wheel: a pip user runs `accelerate launch -m tlnlp.pretrain` / `-m tlnlp.finetune`."""
    import os
    import subprocess
    import sys

    if module == "tlnlp.pretrain":
        args = ["--train_file", str(corpus_file), "--model_size", "tiny", "--hidden_size", "32", "--num_attention_heads",
                "2", "--intermediate_size", "64", "--vocab_size", "200", "--max_seq_length", "32", "--max_train_steps", "2"]
    else:
        args = ["--model_name_or_path", str(tiny_mlm_dir), "--train_file", str(labeled_files["train"]),
                "--max_length", "32", "--max_train_steps", "2"]
    out = tmp_path / "out"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", module]
    done = subprocess.run([*launch, *args, "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "model.safetensors").exists() and (out / "all_results.json").exists()


def test_predictions_carry_the_text_of_an_auto_detected_text_column(tiny_mlm_dir, tmp_path, cache_dir):
    """No --text_column and no 'text' column: the column found is used for training and for the predictions."""
    rows = [{"sentence": text, "label": topic} for topic, text in make_documents(90, seed=4)]
    files = {"train": write_labeled(tmp_path / "train.jsonl", rows[:60]),
             "test": write_labeled(tmp_path / "test.jsonl", rows[60:])}
    out = tmp_path / "out"
    run_main(ft_args(tiny_mlm_dir, files, out, cache_dir, "--num_train_epochs", "1"))
    predictions = [json.loads(line) for line in (out / "test_predictions.jsonl").read_text().splitlines()]
    assert [p["text"] for p in predictions] == [r["sentence"] for r in rows[60:]]


def test_a_log_without_a_terminal_has_progress_lines_not_bar_frames(tiny_mlm_dir, labeled_files, tmp_path, cache_dir):
    """A batch job's output file: every tqdm redraw used to be kept, joined by carriage returns."""
    env = {**os.environ, "TLNLP_PROGRESS_SECONDS": "0", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "tlnlp.finetune",
                           *ft_args(tiny_mlm_dir, labeled_files, tmp_path / "out", cache_dir, "--num_train_epochs", "1",
                                    "--mixed_precision", "no")],
                          capture_output=True, text=True, env=env, timeout=300)  # stderr is a pipe, not a terminal
    assert done.returncode == 0, done.stderr[-2000:]
    assert "\r" not in done.stderr and "it/s]" not in done.stderr
    assert re.search(r"progress: step \d+ of \d+ \(\d+%\)", done.stderr)


def test_a_run_resumed_after_early_stopping_stops_where_the_unbroken_run_did(tiny_mlm_dir, labeled_files, tmp_path,
                                                                              cache_dir):
    """Whether to stop is read from the checkpointed state (the evaluations without improvement), so a
    resume from the step early stopping chose does not train on; it once did, past the unbroken run's end."""
    rows = _csv_rows(labeled_files["train"])
    rng = np.random.default_rng(0)
    for row, label in zip(rows, rng.permutation([r["label"] for r in rows])):
        row["label"] = label
    files = {"train": write_labeled(tmp_path / "noisy.csv", rows), "validation": labeled_files["validation"]}
    args = ["--eval_steps", "1", "--early_stopping_patience", "2", "--num_train_epochs", "4", "--learning_rate", "1e-2",
            "--checkpointing_steps", "1"]
    out = tmp_path / "model"
    unbroken = run_main(ft_args(tiny_mlm_dir, files, out, cache_dir, *args))
    stopped_at = unbroken["optimizer_steps"]
    assert stopped_at < 4 * 12  # early stopping ended it
    checkpoint = out / "checkpoints" / f"step_{stopped_at:08d}"
    resumed = run_main(ft_args(tiny_mlm_dir, files, out, cache_dir, *args, "--resume_from_checkpoint", str(checkpoint)))
    assert resumed["optimizer_steps"] == stopped_at
    assert resumed["best_step"] == unbroken["best_step"] and resumed["eval_accuracy"] == unbroken["eval_accuracy"]



def test_a_small_training_set_trains_whole_epochs_up_to_the_minimum_steps(tiny_mlm_dir, labeled_files, tmp_path,
                                                                          cache_dir, caplog):
    # 180 rows at batch 16: 12 steps an epoch, so 3 epochs are 36 steps; a minimum of 50 makes 5 epochs (60).
    out = tmp_path / "model"
    results = run_main(ft_args(tiny_mlm_dir, labeled_files, out, cache_dir, "--num_train_epochs", "3",
                               "--min_train_steps", "50"))
    assert results["optimizer_steps"] == 60 and results["epochs"] == 5
    assert "fewer than the 50 a small training set needs" in caplog.text
    history = json.loads((out / "eval_history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    # --max_train_steps is the user's own choice: never lengthened.
    capped = run_main(ft_args(tiny_mlm_dir, labeled_files, tmp_path / "capped", cache_dir, "--max_train_steps", "20",
                              "--min_train_steps", "50"))
    assert capped["optimizer_steps"] == 20


def assert_the_model_is_the_mean_of_checkpoints(out, steps) -> dict:
    """The saved model's weights are the mean of those in the checkpoints of `steps`, not the last step's."""
    saved = load_file(out / "model.safetensors")
    checkpoints = [load_file(out / "checkpoints" / f"step_{step:08d}" / "model.safetensors") for step in steps]
    compared = [name for name in saved if name in checkpoints[0]]
    assert len(compared) > 10
    for name in compared:
        mean = torch.stack([checkpoint[name].float() for checkpoint in checkpoints]).mean(0)
        assert torch.allclose(saved[name].float(), mean, atol=1e-6), name
    assert any(not torch.equal(saved[name], checkpoints[-1][name]) for name in compared)
    return saved


def test_averaging_the_last_epoch_saves_the_mean_of_its_steps_and_resumes_to_the_same_model(
        tiny_mlm_dir, labeled_files, tmp_path, cache_dir):
    # 180 rows at batch 16: 12 steps an epoch; 2 epochs, the second averaged (steps 13 to 24).
    args = ["--num_train_epochs", "2", "--average_last_epochs", "1", "--checkpointing_steps", "1"]
    out = tmp_path / "model"
    results = run_main(ft_args(tiny_mlm_dir, labeled_files, out, cache_dir, *args))
    assert results["optimizer_steps"] == 24 and results["averaged_steps"] == 12
    saved = assert_the_model_is_the_mean_of_checkpoints(out, range(13, 25))
    history = json.loads((out / "eval_history.json").read_text())
    assert [h["step"] for h in history] == [12, 24] and history[-1]["averaged_steps"] == 12
    assert results["eval_accuracy"] == history[-1]["accuracy"]  # the averaged model is the one reported
    # A resume inside the averaging window picks the running mean up from the checkpoint: the same model.
    resumed = run_main(ft_args(tiny_mlm_dir, labeled_files, out, cache_dir, *args, "--resume_from_checkpoint",
                               str(out / "checkpoints" / "step_00000018")))
    assert resumed["averaged_steps"] == 12
    again = load_file(out / "model.safetensors")
    assert all(torch.equal(saved[name], again[name]) for name in saved)


def test_averaging_and_restoring_the_best_model_are_refused_together(tiny_mlm_dir, labeled_files, tmp_path, cache_dir):
    out = tmp_path / "model"
    for extra in (["--restore_best_model", "true"], ["--early_stopping_patience", "2"]):
        with pytest.raises(UserInputError, match="choose one"):
            run_main(ft_args(tiny_mlm_dir, labeled_files, out, cache_dir, "--average_last_epochs", "1", *extra))
    assert not out.exists()


@pytest.mark.slow
def test_averaging_under_two_processes_is_the_mean_of_the_steps_both_ranks_took(tiny_mlm_dir, labeled_files, tmp_path,
                                                                                cache_dir):
    # 180 rows over 2 processes in batches of 8: 12 steps an epoch; the second epoch's 12 steps are averaged.
    out = tmp_path / "model"
    args = [*ft_args(tiny_mlm_dir, labeled_files, out, cache_dir, "--num_train_epochs", "2", "--average_last_epochs",
                     "1", "--checkpointing_steps", "1", "--per_device_train_batch_size", "8")]
    done = run_script("finetune_cls.py", args, processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["num_processes"] == 2 and results["averaged_steps"] == 12
    assert_the_model_is_the_mean_of_checkpoints(out, range(13, 25))


def test_fine_tuning_reads_128_tokens_unless_told_even_where_the_model_has_more_positions(tmp_path, tiny_tokenizer):
    """The stage-2 defaults were all chosen at 128 tokens; an encoder with 512 positions (MiniLM's) must not
    silently fine-tune at 4 times the length."""
    from tlnlp.stage2 import phases

    folder = tmp_path / "positions512"
    config = tiny_bert_config(len(tiny_tokenizer))
    config.max_position_embeddings = 512
    BertForSequenceClassification(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    rows = [{"text": text, "label": topic} for topic, text in make_documents(40, seed=3)]
    raw = phases.read_labeled_splits(train_file=str(write_labeled(tmp_path / "train.jsonl", rows)))

    def length(*extra):
        cfg = parse_config(FinetuneConfig, ["--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "o"),
                                            *extra])
        return phases.make_classifier(cfg, phases.prepare_labeled_data(cfg, raw)).max_seq_length

    assert length() == 128 and length("--max_seq_length", "512") == 512
