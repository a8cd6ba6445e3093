"""Continued pretraining before fine-tuning (--continued_pretraining): the head-only warm-up, the corpus,
the cache, the gate and the bad input refused before any training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_script, tiny_bert_config
from safetensors.torch import load_file
from transformers import BertModel, GPT2Config, GPT2Model

from tlnlp.core.config import FinetuneConfig, PretrainConfig, parse_config
from tlnlp.core.errors import UserInputError
from tlnlp.finetune import main
from tlnlp.pretrain import main as pretrain_main
from tlnlp.recipes import continued_pretraining as cp


def finetune_args(labeled_files, source, out, cache_dir, *extra):
    return ["--model_name_or_path", str(source), "--train_file", str(labeled_files["train"]),
            "--validation_file", str(labeled_files["validation"]), "--test_file", str(labeled_files["test"]),
            "--output_dir", str(out), "--cache_dir", str(cache_dir), "--num_train_epochs", "1",
            "--per_device_train_batch_size", "16", "--max_seq_length", "32", "--mixed_precision", "no",
            "--continued_pretraining_steps", "6", "--continued_pretraining_folds", "3", "--min_train_steps", "0", *extra]


def encoder_weights(folder):
    state = load_file(str(folder / "model.safetensors"))
    return {k.removeprefix("bert."): v for k, v in state.items() if not k.startswith("cls.")}


def test_head_warmup_leaves_the_encoder_unchanged_and_is_skipped_with_a_head(tmp_path, headless_dir, tiny_mlm_dir,
                                                                             corpus_file, cache_dir):
    common = ["--train_file", str(corpus_file), "--max_seq_length", "32", "--per_device_train_batch_size", "8",
              "--mixed_precision", "no", "--cache_dir", str(cache_dir), "--learning_rate", "1e-3"]
    # The whole run is warm-up: the encoder must come out exactly as it went in.
    pretrain_main(parse_config(PretrainConfig, ["--model_name_or_path", str(headless_dir), "--output_dir",
                                                str(tmp_path / "warm"), "--max_train_steps", "4",
                                                "--head_warmup_steps", "4", *common]))
    before = {k: v for k, v in load_file(str(headless_dir / "model.safetensors")).items() if not k.startswith("pooler.")}
    after = encoder_weights(tmp_path / "warm")
    assert set(before) <= set(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    results = json.loads((tmp_path / "warm" / "all_results.json").read_text())
    assert results["head_warmup_steps"] == 4
    assert results["new_head_learning_rate"] == 1e-2  # 20 x 1e-3, at the cap
    # Past the warm-up (by default 100 steps, at most half the run) the encoder trains.
    pretrain_main(parse_config(PretrainConfig, ["--model_name_or_path", str(headless_dir), "--output_dir",
                                                str(tmp_path / "both"), "--max_train_steps", "4", *common]))
    assert json.loads((tmp_path / "both" / "all_results.json").read_text())["head_warmup_steps"] == 2
    assert not all(torch.equal(before[k], encoder_weights(tmp_path / "both")[k]) for k in before)
    # A checkpoint with its MLM head gets no warm-up.
    pretrain_main(parse_config(PretrainConfig, ["--model_name_or_path", str(tiny_mlm_dir), "--output_dir",
                                                str(tmp_path / "headed"), "--max_train_steps", "2", *common]))
    headed = json.loads((tmp_path / "headed" / "all_results.json").read_text())
    assert "head_warmup_steps" not in headed and "new_head_learning_rate" not in headed


def test_a_single_process_warmup_skips_the_encoders_backward_and_updates_as_dropping_its_gradients_does(
        tiny_tokenizer):
    from transformers import BertForMaskedLM

    from tlnlp.stage1.pretrain import HeadWarmup

    torch.manual_seed(0)
    first = BertForMaskedLM(tiny_bert_config(len(tiny_tokenizer)))
    second = BertForMaskedLM(tiny_bert_config(len(tiny_tokenizer)))
    second.load_state_dict(first.state_dict())
    head = [name for name, _ in first.named_parameters() if name.startswith("cls.")]
    batches = [{"input_ids": torch.randint(5, len(tiny_tokenizer), (4, 12))} for _ in range(4)]
    for batch in batches:
        batch["labels"] = batch["input_ids"].clone()
    encoder_grad_during_step = {True: [], False: []}
    for model, skip in ((first, True), (second, False)):
        model.train()
        torch.manual_seed(1)  # the same dropout in both
        warmup = HeadWarmup(model, head, steps=2)
        warmup.skip_backward = skip  # as in a single process, and as under data parallelism
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        embeddings = model.bert.embeddings.word_embeddings.weight
        for step, batch in enumerate(batches):
            model(**batch).loss.backward()
            encoder_grad_during_step[skip].append(embeddings.grad is not None)
            warmup(step, 0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    # Dropping the encoder's gradients: computed at every step. Skipping: only at the first warm-up step
    # (the optimizer was built with the encoder in it) and again once the warm-up is over.
    assert encoder_grad_during_step == {False: [True, True, True, True], True: [True, False, True, True]}
    assert all(p.requires_grad for p in first.parameters())
    second_state = second.state_dict()
    assert all(torch.equal(value, second_state[name]) for name, value in first.state_dict().items())


def test_tapt_reads_only_training_texts_caches_and_records_the_gate(tmp_path, labeled_files, headless_dir, cache_dir):
    results = main(parse_config(FinetuneConfig, finetune_args(labeled_files, headless_dir, tmp_path / "a", cache_dir,
                                                              "--continued_pretraining", "task",
                                                              "--continued_pretraining_gate", "probe")))
    record = results["continued_pretraining"]
    folder = cp.Path(record["adapted_encoder"])
    corpus = [json.loads(line)["text"] for line in (folder / cp.CORPUS_FILE).read_text().splitlines()]
    train = [row.split(",", 1)[0] for row in labeled_files["train"].read_text().splitlines()[1:]]
    held_out = {row.split(",", 1)[0] for split in ("validation", "test")
                for row in labeled_files[split].read_text().splitlines()[1:]}
    assert sorted(corpus) == sorted(train)
    assert not set(corpus) & held_out
    assert record["gate_labels"] == len(train) and record["kept"] in ("adapted", "original")
    for key in ("probe_accuracy_original", "probe_accuracy_adapted", "probe_difference_standard_error"):
        assert 0 <= record[key] <= 1
    saved = json.loads((tmp_path / "a" / "all_results.json").read_text())
    assert saved["continued_pretraining"] == json.loads(json.dumps(record))
    assert "Continued pretraining" in (tmp_path / "a" / "README.md").read_text()
    assert not record["reused_from_cache"] and record["head_warmup_steps"] == 3

    # A second seed reuses the adapted encoder: its weights are not written again.
    weights = folder / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    again = main(parse_config(FinetuneConfig, finetune_args(labeled_files, headless_dir, tmp_path / "b", cache_dir,
                                                            "--continued_pretraining", "task", "--seed", "7",
                                                            "--continued_pretraining_gate", "probe")))
    assert again["continued_pretraining"]["reused_from_cache"]
    assert again["continued_pretraining"]["adapted_encoder"] == str(folder)
    # Stage 1's own time travels with the cached encoder (what a benchmark plots as its cost).
    stage1 = json.loads((folder / "all_results.json").read_text())["train_runtime_s"]
    assert again["continued_pretraining"]["stage1_minutes"] == record["stage1_minutes"] == round(stage1 / 60, 2)
    assert weights.stat().st_mtime_ns == mtime


def test_corpora_joined_by_plus_run_in_turn_each_cached_alone(tmp_path, labeled_files, headless_dir, corpus_file,
                                                               cache_dir):
    """DAPT then TAPT: the second phase starts from the first phase's encoder (its MLM head included, so no
    warm-up), reads only the training texts, and a second run reuses both phases."""
    chain = f"{corpus_file}+task"
    record = main(parse_config(FinetuneConfig, finetune_args(labeled_files, headless_dir, tmp_path / "a", cache_dir,
                                                             "--continued_pretraining", chain)))["continued_pretraining"]
    dapt, tapt = record["phases"]
    assert dapt["corpus"].endswith("(DAPT)") and tapt["corpus"] == "the task's training texts (TAPT)"
    assert dapt["head_warmup_steps"] == 3 and tapt["head_warmup_steps"] == 0
    assert record["adapted_encoder"] == tapt["adapted_encoder"] != dapt["adapted_encoder"]
    assert record["steps"] == 12 and record["corpus_texts"] == dapt["corpus_texts"] + tapt["corpus_texts"]
    second_phase = json.loads((cp.Path(tapt["adapted_encoder"]) / "all_results.json").read_text())
    assert second_phase["continued_from"] == dapt["adapted_encoder"]
    corpus = [json.loads(line)["text"] for line in (cp.Path(tapt["adapted_encoder"]) / cp.CORPUS_FILE).read_text().splitlines()]
    assert sorted(corpus) == sorted(row.split(",", 1)[0] for row in labeled_files["train"].read_text().splitlines()[1:])
    assert "then the task's training texts" in (tmp_path / "a" / "README.md").read_text()

    again = main(parse_config(FinetuneConfig, finetune_args(labeled_files, headless_dir, tmp_path / "b", cache_dir,
                                                            "--continued_pretraining", chain, "--seed", "7")))
    assert again["continued_pretraining"]["reused_from_cache"]
    assert [p["adapted_encoder"] for p in again["continued_pretraining"]["phases"]] == [dapt["adapted_encoder"],
                                                                                         tapt["adapted_encoder"]]


@pytest.mark.parametrize("chain", ["task+task", "task+", "+task"])
def test_a_bad_chain_of_corpora_is_refused(tmp_path, labeled_files, headless_dir, cache_dir, chain):
    with pytest.raises(UserInputError, match="joined by '\\+' run in turn"):
        main(parse_config(FinetuneConfig, finetune_args(labeled_files, headless_dir, tmp_path / "x", cache_dir,
                                                        "--continued_pretraining", chain)))
    assert not (tmp_path / "x").exists()


def test_the_gate_keeps_the_original_when_the_adapted_encoder_scores_lower(tmp_path, labeled_files, headless_dir,
                                                                          cache_dir, monkeypatch):
    real = cp.probe_scores
    calls = []

    def adapted_worse(features, labels, folds, seed):
        calls.append(1)
        scores = real(features, labels, folds, seed)
        return scores - 0.2 if len(calls) == 2 else scores  # the second call scores the adapted encoder

    monkeypatch.setattr(cp, "probe_scores", adapted_worse)
    results = main(parse_config(FinetuneConfig, finetune_args(labeled_files, headless_dir, tmp_path / "o", cache_dir,
                                                              "--continued_pretraining", "task",
                                                              "--continued_pretraining_gate", "probe")))
    record = results["continued_pretraining"]
    assert record["kept"] == "original"
    assert record["probe_accuracy_adapted"] == pytest.approx(record["probe_accuracy_original"] - 0.2)
    config = (tmp_path / "o" / "training_config.yaml").read_text()
    assert f"model_name_or_path: {headless_dir}" in config  # fine-tuned from the original
    assert record["gate_rule"] == "unless_worse"
    assert "the original encoder was kept (rule: unless_worse)" in (tmp_path / "o" / "README.md").read_text()


@pytest.mark.parametrize("adapted_kept", [True, False])
def test_the_finetune_gate_fine_tunes_both_alike_and_the_kept_one_is_the_run(tmp_path, labeled_files, headless_dir,
                                                                             cache_dir, monkeypatch, adapted_kept):
    monkeypatch.setattr(cp, "keeps_adapted", lambda rule, difference, spread: adapted_kept)  # the rule: below
    out = tmp_path / "gated"
    args = finetune_args(labeled_files, headless_dir, out, cache_dir, "--continued_pretraining", "task")  # the default gate
    results = main(parse_config(FinetuneConfig, args))
    record = results["continued_pretraining"]
    kept = "adapted" if adapted_kept else "original"
    assert record["gate"] == "finetune" and record["kept"] == kept and record["gate_metric"] == "accuracy"
    runs = out / cp.GATE_FOLDER
    scores = {}
    for name in ("original", "adapted"):
        rows = [json.loads(line) for line in (runs / name / "validation_predictions.jsonl").read_text().splitlines()]
        assert len(rows) == record["gate_examples"] == 60
        scores[name] = np.mean([row["label"] == str(row["true_label"]) for row in rows])
        assert record[f"validation_{name}"] == pytest.approx(scores[name])
        assert record[f"test_{name}"] == json.loads((runs / name / "all_results.json").read_text())["test_accuracy"]
    assert record["difference"] == pytest.approx(scores["adapted"] - scores["original"])
    assert record["difference_standard_error"] >= 0
    # The kept fine-tuning is the run's model, trained from the kept encoder: nothing is fine-tuned a third time.
    assert (out / "model.safetensors").read_bytes() == (runs / kept / "model.safetensors").read_bytes()
    assert results["test_accuracy"] == record[f"test_{kept}"]
    encoder = record["adapted_encoder"] if adapted_kept else str(headless_dir)
    assert f"model_name_or_path: {encoder}" in (out / "training_config.yaml").read_text()
    assert "both encoders fine-tuned alike" in (out / "README.md").read_text()

    # The same command again (after a stop, say) reuses both fine-tunings.
    model = runs / "adapted" / "model.safetensors"
    mtime = model.stat().st_mtime_ns
    again = main(parse_config(FinetuneConfig, args))
    assert model.stat().st_mtime_ns == mtime
    assert again["continued_pretraining"]["difference"] == record["difference"]


@pytest.mark.slow
def test_the_finetune_gate_under_two_processes(tmp_path, labeled_files, headless_dir, cache_dir):
    """As users launch it: stage 1, both fine-tunings and the decision on two data-parallel processes."""
    out = tmp_path / "ddp"
    done = run_script("finetune_cls.py", finetune_args(labeled_files, headless_dir, out, cache_dir,
                                                       "--continued_pretraining", "task",
                                                       "--continued_pretraining_gate", "finetune"), processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    record = results["continued_pretraining"]
    assert results["num_processes"] == 2 and record["gate"] == "finetune" and record["gate_examples"] == 60
    assert (out / "model.safetensors").read_bytes() == (out / cp.GATE_FOLDER / record["kept"] / "model.safetensors").read_bytes()
    rows = (out / cp.GATE_FOLDER / "adapted" / "validation_predictions.jsonl").read_text().splitlines()
    assert len(rows) == 60  # gathered from both processes, no example twice


def write_predictions(folder, truth, predicted):
    folder.mkdir(parents=True)
    with (folder / "validation_predictions.jsonl").open("w") as f:
        for t, p in zip(truth, predicted):
            f.write(json.dumps({"true_label": t, "label": p}) + "\n")


@pytest.mark.parametrize("flips, kept", [(12, "original"), (1, "adapted"), (-5, "adapted")])
def test_the_finetune_gate_refuses_an_adapted_fine_tuning_worse_by_more_than_the_noise(tmp_path, flips, kept):
    rng = np.random.default_rng(0)
    truth = [str(x) for x in rng.integers(0, 3, 300)]
    original = [t if i % 5 else str((int(t) + 1) % 3) for i, t in enumerate(truth)]  # 80% right
    # `flips` more wrong answers (fewer, when negative) in the adapted encoder's fine-tuning.
    right, wrong = [i for i in range(300) if original[i] == truth[i]], [i for i in range(300) if original[i] != truth[i]]
    adapted = list(original)
    for i in (right[:flips] if flips > 0 else wrong[:-flips]):
        adapted[i] = truth[i] if flips < 0 else str((int(truth[i]) + 1) % 3)
    write_predictions(tmp_path / "original", truth, original)
    write_predictions(tmp_path / "adapted", truth, adapted)
    cfg = parse_config(FinetuneConfig, ["--output_dir", str(tmp_path)])
    record = cp.compare_on_validation(cfg, tmp_path, "accuracy", {"original": {}, "adapted": {}})
    assert record["difference"] == pytest.approx(-flips / 300)
    # The paired standard error: about the spread of the per-example differences over the root of their number.
    per_example = np.zeros(300)
    per_example[:abs(flips)] = -np.sign(flips)
    assert record["difference_standard_error"] == pytest.approx(per_example.std() / np.sqrt(300), rel=0.25)
    assert record["kept"] == kept and record["validation_original"] == pytest.approx(0.8)
    assert "small_validation_warning" not in record


@pytest.mark.parametrize("difference, if_better, unless_worse", [
    (0.02, True, True),     # ahead by more than the noise
    (0.005, False, True),   # ahead, within the noise
    (-0.005, False, True),  # behind, within the noise
    (-0.02, False, False),  # behind by more than the noise
])
def test_the_gate_rules_read_the_probe_difference_against_its_standard_error(difference, if_better, unless_worse):
    assert cp.keeps_adapted("if_better", difference, 0.01) is if_better
    assert cp.keeps_adapted("unless_worse", difference, 0.01) is unless_worse
    assert cp.keeps_adapted("always", difference, 0.01)
    # One fold (no standard error): the sign decides.
    assert cp.keeps_adapted("unless_worse", 0.0, float("nan")) and not cp.keeps_adapted("if_better", 0.0, float("nan"))


def test_probe_scores_separate_separable_classes():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 50)
    informative = rng.normal(size=(100, 8)) + labels[:, None] * 3
    noise = rng.normal(size=(100, 8))
    assert cp.probe_scores(informative, labels, 5, 0).mean() > 0.9
    assert cp.probe_scores(noise, labels, 5, 0).mean() < 0.75


def test_bad_input_is_refused_before_any_training(tmp_path, labeled_files, headless_dir, cache_dir, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("trained despite bad input")

    monkeypatch.setattr(cp, "run_pretraining", no_training)

    def run(source, *extra):
        return main(parse_config(FinetuneConfig, finetune_args(labeled_files, source, tmp_path / "x", cache_dir, *extra)))

    missing = tmp_path / "nowhere.txt"
    with pytest.raises(UserInputError, match="no such file"):
        run(headless_dir, "--continued_pretraining", str(missing))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(UserInputError, match="no text|empty|no rows"):
        run(headless_dir, "--continued_pretraining", str(empty))
    held_out_only = tmp_path / "held_out.txt"
    held_out_only.write_text(labeled_files["test"].read_text().splitlines()[1].split(",", 1)[0] + "\n")
    with pytest.raises(UserInputError, match="validation or test"):
        run(headless_dir, "--continued_pretraining", str(held_out_only))
    with pytest.raises(UserInputError, match="--from_scratch"):
        run(headless_dir, "--continued_pretraining", "task", "--from_scratch")
    with pytest.raises(UserInputError, match="tokens but the model.s embeddings"):
        other = tmp_path / "other_vocab"
        torch.manual_seed(0)
        BertModel(tiny_bert_config(50)).save_pretrained(other)
        run(other, "--continued_pretraining", "task", "--tokenizer_name", str(headless_dir))
    no_mlm = tmp_path / "gpt2"
    GPT2Model(GPT2Config(vocab_size=200, n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(no_mlm)
    with pytest.raises(UserInputError, match="masked-language-model class"):
        run(no_mlm, "--continued_pretraining", "task")
    no_validation = [a for a in finetune_args(labeled_files, headless_dir, tmp_path / "x", cache_dir)
                     if a not in ("--validation_file", str(labeled_files["validation"]))]
    with pytest.raises(UserInputError, match="here 'loss'; it takes one of accuracy, macro_f1, mcc"):
        run(headless_dir, "--continued_pretraining", "task", "--metric_for_best_model", "loss")
    with pytest.raises(UserInputError, match="validation split.*has none"):
        main(parse_config(FinetuneConfig, [*no_validation, "--validation_split_percentage", "0",
                                           "--continued_pretraining", "task", "--continued_pretraining_gate",
                                           "finetune"]))
    assert not (tmp_path / "x").exists()
    # Another run's folder is refused before stage 1, also when a recipe (which may be resuming) follows.
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "model.safetensors").write_text("someone else's")
    for recipe in ([], ["--self_training_rounds", "1", "--unlabeled_file", str(labeled_files["train"])]):
        with pytest.raises(UserInputError, match="already holds files"):
            main(parse_config(FinetuneConfig, finetune_args(labeled_files, headless_dir, taken, cache_dir,
                                                            "--continued_pretraining", "task", *recipe)))
    assert [p.name for p in taken.iterdir()] == ["model.safetensors"]


def test_it_composes_with_self_training_whose_teacher_is_the_gates_fine_tuning(tmp_path, labeled_files, headless_dir,
                                                                               corpus_file, cache_dir, caplog):
    out = tmp_path / "st"
    self_training = ["--unlabeled_file", str(corpus_file), "--self_training_rounds", "1"]
    with caplog.at_level("INFO"):
        results = main(parse_config(FinetuneConfig, finetune_args(
            labeled_files, headless_dir, out, cache_dir, "--continued_pretraining", "task", "--keep_adapted_encoder",
            "always", *self_training)))
    log = caplog.text
    record = results["continued_pretraining"]
    assert record["kept"] == "adapted" and record["gate"] == "finetune"
    saved = json.loads((out / "all_results.json").read_text())
    assert saved["continued_pretraining"]["adapted_encoder"] == record["adapted_encoder"]
    assert len(saved["self_training"]["rounds"]) == 1  # a round with no confident pseudo-label still completes
    assert "Continued pretraining" in (out / "README.md").read_text()
    # The gate's fine-tuning of the kept encoder is the teacher: copied, not trained a third time.
    gate_run = out / cp.GATE_FOLDER / "adapted"
    assert saved["self_training"]["teacher_from"] == str(gate_run)
    assert "round0: the teacher" not in log and "copied, not trained again" in log
    teacher = (out / "self_training" / "round0" / "model.safetensors").read_bytes()
    assert teacher == (gate_run / "model.safetensors").read_bytes()
    # ... and that is the teacher self-training trains from the adapted encoder, byte for byte.
    alone = tmp_path / "alone"
    main(parse_config(FinetuneConfig, finetune_args(labeled_files, record["adapted_encoder"], alone, cache_dir,
                                                    *self_training)))
    assert (alone / "self_training" / "round0" / "model.safetensors").read_bytes() == teacher
    assert saved["self_training"]["teacher_eval_accuracy"] == json.loads(
        (alone / "all_results.json").read_text())["self_training"]["teacher_eval_accuracy"]


def test_it_composes_with_a_search(tmp_path, labeled_files, headless_dir, cache_dir):
    pytest.importorskip("optuna")
    import yaml

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"learning_rate": {"low": 1e-3, "high": 5e-3, "log": True},
                                     "num_train_epochs": [1], "max_seq_length": 32}))
    out = tmp_path / "searched"
    results = main(parse_config(FinetuneConfig, finetune_args(
        labeled_files, headless_dir, out, cache_dir, "--continued_pretraining", "task", "--search_trials", "1",
        "--search_folds", "2", "--search_space", str(space))))
    record = results["continued_pretraining"]
    assert record["gate"] == "finetune" and (out / cp.GATE_FOLDER / "adapted" / "model.safetensors").exists()
    assert results["search_trials"] == 1 and (out / "search" / "trials.csv").exists()
    saved = json.loads((out / "all_results.json").read_text())
    assert saved["continued_pretraining"]["kept"] == record["kept"] and "test_accuracy" in saved
