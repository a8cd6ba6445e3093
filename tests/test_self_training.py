"""Self-training: pseudo-labels from a teacher, chosen on held-out labels, class-balanced, never test texts."""

import json

import pytest
from conftest import make_documents
from test_finetune import ft_args, run_main

from tlnlp.core.config import FinetuneConfig, parse_config
from tlnlp.core.errors import UserInputError
from tlnlp.recipes.self_training import (
    confidence_floor,
    confidence_threshold,
    select_pseudo_labels,
    student_below_teacher,
)


def test_threshold_is_the_lowest_confidence_that_keeps_the_held_out_precision():
    confidences = [0.99, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5]
    correct = [True, True, True, True, True, False, True, False]
    threshold, precision = confidence_threshold(confidences, correct, 0.85)
    assert threshold == 0.6 and precision == pytest.approx(6 / 7)
    threshold, precision = confidence_threshold(confidences, correct, 1.0)
    assert threshold == 0.8 and precision == 1.0
    # Fewer than 5 held-out predictions never set a threshold on their own.
    assert confidence_threshold([0.9, 0.8], [True, True], 0.5) == (float("inf"), 0.0)


def test_the_threshold_never_goes_below_halfway_between_chance_and_certainty():
    assert confidence_floor(2) == 0.75 and confidence_floor(4) == 0.625
    # 50 held-out examples, two classes: 90% precision is met at a confidence barely above chance.
    confidences = [0.99] * 30 + [0.6] * 15 + [0.534] * 5
    correct = [True] * 30 + [True] * 14 + [False] + [True] * 4 + [False]
    assert confidence_threshold(confidences, correct, 0.9)[0] == 0.534 < confidence_floor(2)


def test_selection_keeps_only_confident_rows_and_caps_each_class():
    rows = [{"text": f"t{i}", "label": label, "probabilities": {label: p, "other": 1 - p}}
            for i, (label, p) in enumerate([("a", 0.99), ("a", 0.97), ("a", 0.95), ("a", 0.5), ("b", 0.96),
                                            ("b", 0.6)])]
    chosen = select_pseudo_labels(rows, threshold=0.9, per_class=2)
    assert [r["text"] for r in chosen] == ["t0", "t1", "t4"]  # a: the two most confident; b: the one above 0.9


def test_a_student_below_its_teacher_on_validation_is_flagged_and_warned(caplog):
    accuracy, loss = None, "loss"  # --metric_for_best_model: the default (accuracy), or the loss
    with caplog.at_level("WARNING"):
        assert student_below_teacher(accuracy, {"eval_accuracy": 0.82}, {"eval_accuracy": 0.80}) is True
    assert "pseudo-labels did not help" in caplog.text and "round0" in caplog.text
    assert student_below_teacher(accuracy, {"eval_accuracy": 0.80}, {"eval_accuracy": 0.80}) is False
    assert student_below_teacher(loss, {"eval_loss": 0.5}, {"eval_loss": 0.4}) is False  # lower loss is better
    assert student_below_teacher(loss, {"eval_loss": 0.4}, {"eval_loss": 0.5}) is True
    assert student_below_teacher(accuracy, {}, {"eval_accuracy": 0.8}) is None


@pytest.fixture()
def unlabeled_file(tmp_path, labeled_files):
    """Unlabeled text of the same topics, plus every test text, which must never be pseudo-labeled."""
    import csv

    with open(labeled_files["test"], newline="") as f:
        test_texts = [row["text"] for row in csv.DictReader(f)]
    path = tmp_path / "unlabeled.txt"
    path.write_text("\n".join([text for _, text in make_documents(300, seed=7)] + test_texts) + "\n")
    return path, set(test_texts)


def test_self_training_adds_confident_class_balanced_pseudo_labels(tiny_mlm_dir, labeled_files, unlabeled_file,
                                                                   tmp_path, cache_dir):
    path, test_texts = unlabeled_file
    out = tmp_path / "student"
    results = run_main(ft_args(tiny_mlm_dir, labeled_files, out, cache_dir, "--num_train_epochs", "6", "--seed", "2",
                               "--unlabeled_file", str(path), "--pseudo_labels_per_class", "40",
                               "--pseudo_label_precision", "0.8"))
    report = results["self_training"]
    (round1,) = report["rounds"]
    assert round1["held_out_precision"] >= 0.8 and round1["unlabeled_texts"] == 300  # the test texts were dropped
    assert 0 < round1["pseudo_labels"] <= 3 * 40
    assert all(0 < n <= 40 for n in round1["pseudo_labels_per_class"].values())
    rows = [json.loads(line) for line in open(round1["file"])]
    assert len(rows) == round1["pseudo_labels"] and not test_texts & {row["text"] for row in rows}
    # Every kept row was at or above the threshold when the teacher labeled it.
    from tlnlp.stage2.inference import predict_texts

    teacher = out / "self_training" / "round0"
    confidences = [max(p["probabilities"].values()) for p in predict_texts(str(teacher), [r["text"] for r in rows],
                                                                           max_length=48, progress=False)]
    assert min(confidences) >= round1["threshold"] - 1e-5 and round1["threshold"] >= round1["threshold_floor"]
    assert round1["threshold_floor"] == confidence_floor(3) and round1["validation_examples"] == 60
    assert report["validation_examples"] == 60 and "only 60 validation examples" in report["small_validation_warning"]
    student = json.loads((out / "self_training" / "round1" / "all_results.json").read_text())
    assert student["pseudo_labeled_rows"] == len(rows) and student["train_set_size"] == 180 + len(rows)
    assert "Pseudo-labels" in (out / "self_training" / "round1" / "README.md").read_text()
    assert results["test_accuracy"] is not None and report["teacher_test_accuracy"] is not None
    assert report["student_below_teacher"] == (student["eval_accuracy"] < report["teacher_eval_accuracy"])
    # The run's model is the round that does best on validation (the student on a tie), weights and results.
    kept = 0 if report["teacher_eval_accuracy"] > student["eval_accuracy"] else 1
    assert report["kept_round"] == kept and results["eval_accuracy"] == max(student["eval_accuracy"],
                                                                              report["teacher_eval_accuracy"])
    assert (out / "model.safetensors").read_bytes() == (out / "self_training" / f"round{kept}" / "model.safetensors").read_bytes()
    assert ("Pseudo-labels" in (out / "README.md").read_text()) == (kept == 1)

    # Again (after a stop, say): the finished rounds are reused, not trained again, and the teacher labels the
    # same rows. With --restore_best_model false the run's model is the last student, whatever its score.
    teacher_weights = teacher / "model.safetensors"
    written = teacher_weights.stat().st_mtime_ns
    again = run_main(ft_args(tiny_mlm_dir, labeled_files, out, cache_dir, "--num_train_epochs", "6", "--seed", "2",
                             "--unlabeled_file", str(path), "--pseudo_labels_per_class", "40",
                             "--pseudo_label_precision", "0.8", "--restore_best_model", "false"))
    assert teacher_weights.stat().st_mtime_ns == written
    assert again["self_training"]["rounds"][0]["pseudo_labels_per_class"] == round1["pseudo_labels_per_class"]
    assert again["self_training"]["kept_round"] == 1 and again["eval_accuracy"] == student["eval_accuracy"]
    assert (out / "model.safetensors").read_bytes() == (out / "self_training" / "round1" / "model.safetensors").read_bytes()
    assert "Pseudo-labels" in (out / "README.md").read_text()


def test_the_best_round_on_validation_is_kept_and_a_tie_keeps_the_student():
    from tlnlp.recipes.self_training import best_round

    assert best_round(None, [{"eval_accuracy": 0.82}, {"eval_accuracy": 0.80}]) == 0  # the teacher
    assert best_round(None, [{"eval_accuracy": 0.80}, {"eval_accuracy": 0.80}]) == 1
    assert best_round(None, [{"eval_accuracy": 0.7}, {"eval_accuracy": 0.9}, {"eval_accuracy": 0.8}]) == 1
    assert best_round("loss", [{"eval_loss": 0.4}, {"eval_loss": 0.5}]) == 0  # lower loss is better
    assert best_round(None, [{"eval_accuracy": 0.8}, {}]) == 0


def test_bad_self_training_input_is_refused_before_training(tiny_mlm_dir, labeled_files, tmp_path, cache_dir):
    base = ft_args(tiny_mlm_dir, labeled_files, tmp_path / "never", cache_dir)
    with pytest.raises(UserInputError, match="--self_training_rounds 2 needs unlabeled text"):
        parse_config(FinetuneConfig, base + ["--self_training_rounds", "2"])
    with pytest.raises(UserInputError, match=r"--unlabeled_pool_size \(50\) must be at least --max_unlabeled_samples"):
        parse_config(FinetuneConfig, base + ["--unlabeled_file", "u.txt", "--unlabeled_pool_size", "50",
                                             "--max_unlabeled_samples", "100"])
    with pytest.raises(UserInputError, match="cannot be combined"):
        parse_config(FinetuneConfig, base + ["--unlabeled_file", "u.txt", "--search_trials", "2"])
    numbers = tmp_path / "numbers.csv"
    numbers.write_text("id,score\n1,2\n3,4\n")
    with pytest.raises(UserInputError, match=r"unlabeled data \(--unlabeled_file .*numbers.csv\)"):
        run_main(base + ["--unlabeled_file", str(numbers)])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(UserInputError, match=r"unlabeled data \(--unlabeled_file .*empty.txt\)"):
        run_main(base + ["--unlabeled_file", str(empty)])
    without_validation = ft_args(tiny_mlm_dir, {"train": labeled_files["train"]}, tmp_path / "never", cache_dir)
    with pytest.raises(UserInputError, match=r"Self-training \(its confidence threshold and the round it keeps\) "
                                             "needs a validation split"):
        run_main(without_validation + ["--unlabeled_file", str(numbers), "--validation_split_percentage", "0"])
    assert not (tmp_path / "never").exists()


def test_the_unlabeled_texts_most_like_the_labeled_ones_are_chosen(tiny_mlm_dir, labeled_files, tmp_path,
                                                                    cache_dir, monkeypatch):
    """Exact copies of training texts are the nearest of all (cosine 1 with any encoder), so they are what
    --unlabeled_selection similar keeps, in corpus order; 'first', the default, keeps the corpus's first N."""
    import csv

    from tlnlp.models import modeling
    from tlnlp.recipes.self_training import prepare

    with open(labeled_files["train"], newline="") as f:
        copies = [row["text"] for row in csv.DictReader(f)][:10]
    others = [text for _, text in make_documents(60, seed=11)]
    path = tmp_path / "unlabeled.txt"
    path.write_text("\n".join(others[:30] + copies + others[30:]) + "\n")
    args = ft_args(tiny_mlm_dir, labeled_files, tmp_path / "out", cache_dir, "--unlabeled_file", str(path),
                   "--max_unlabeled_samples", "10", "--unlabeled_selection", "similar")
    data = prepare(parse_config(FinetuneConfig, args), tmp_path / "data")
    assert data.unlabeled == copies and data.unlabeled_pool == 70

    # The pool's embeddings do not depend on the labels: a second run embeds only its labeled texts.
    embedded = []

    def counting(model_dir, texts, *args, **kwargs):
        embedded.append(len(texts))
        return original(model_dir, texts, *args, **kwargs)

    original = modeling.mean_pooled_embeddings
    monkeypatch.setattr(modeling, "mean_pooled_embeddings", counting)
    assert prepare(parse_config(FinetuneConfig, args), tmp_path / "data").unlabeled == copies
    assert embedded == [180]
    first = prepare(parse_config(FinetuneConfig, args[:-2]), tmp_path / "data")  # the default: 'first'
    assert first.unlabeled == others[:10]
    assert embedded == [180]  # 'first' embeds nothing
    # Only the first --unlabeled_pool_size texts are embedded and chosen from: here, none of the copies.
    pool = prepare(parse_config(FinetuneConfig, args + ["--unlabeled_pool_size", "30"]), tmp_path / "data")
    assert pool.unlabeled_pool == 30 and len(pool.unlabeled) == 10 and not set(copies) & set(pool.unlabeled)


def test_rounds_report_the_selection_metric_and_the_card_keeps_the_built_in_data_set(tiny_mlm_dir, tmp_path,
                                                                                      cache_dir):
    """The result keys name --metric_for_best_model, the metric that picks the kept round (they once said
    accuracy whatever picked it); each round's card and the run's card name the built-in data set and its
    licence (the rounds were once recorded as "local files")."""
    unlabeled = tmp_path / "unlabeled.txt"
    unlabeled.write_text("\n".join(text for _, text in make_documents(60, seed=7)) + "\n")
    out = tmp_path / "out"
    results = run_main(["--model_name_or_path", str(tiny_mlm_dir), "--dataset_name", "wiki-uncertainty",
                        "--max_train_samples", "60", "--output_dir", str(out), "--cache_dir", str(cache_dir),
                        "--num_train_epochs", "1", "--max_seq_length", "32", "--learning_rate", "3e-3",
                        "--unlabeled_file", str(unlabeled), "--pseudo_label_precision", "0.5",
                        "--metric_for_best_model", "macro_f1"])
    report = results["self_training"]
    assert {"teacher_eval_macro_f1", "teacher_test_macro_f1"} <= set(report)
    assert {"student_eval_macro_f1", "student_test_macro_f1"} <= set(report["rounds"][0])
    assert not [key for key in json.dumps(report).split('"') if key.endswith("_accuracy")]
    for card in (out / "README.md", out / "self_training" / "round0" / "README.md",
                 out / "self_training" / "round1" / "README.md"):
        text = card.read_text()
        assert "`wiki-uncertainty` (built into tlnlp)" in text and "Licence:" in text, card
