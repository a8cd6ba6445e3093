"""The sanity baseline: TF-IDF + logistic regression on the same training labels, scored on the same
validation split. It takes seconds, and a fine-tuned model that scores below it has gone wrong (too short
a run, too high a rate, a frozen encoder that does not fit the task): the run says so, with both numbers."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from sklearn.pipeline import Pipeline, make_pipeline

logger = logging.getLogger(__name__)

# A larger training split is subsampled (seeded): the baseline is a floor to compare with, not a contender,
# and fitting it must stay a matter of seconds (1,000 wiki-topics paragraphs: about 5 s on one core; 18,000
# speech passages: 26 s).
MAX_BASELINE_TRAIN_ROWS = 5_000


def tfidf_logistic_regression(texts: list[str], labels: list) -> Pipeline:
    """Word uni- and bigram TF-IDF (sublinear counts) + logistic regression, fitted."""
    model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True),
                          LogisticRegression(max_iter=2000, C=10.0))
    return model.fit(texts, labels)


# Scores by the hash of their inputs: a study's arms, a search's trials and self-training's rounds fit the
# baseline on the same labels again and again (4 arms of `make demo`: 4 x 6 s).
_scores_by_inputs: dict[str, dict[str, float]] = {}


def baseline_scores(train_texts: list[str], train_labels: list, eval_texts: list[str], eval_labels: list,
                    seed: int) -> dict[str, float]:
    """Accuracy, macro-F1 and MCC of the baseline on the evaluation texts, computed once per process for the
    same inputs."""
    key = hashlib.sha256(json.dumps([list(train_texts), list(map(str, train_labels)), list(eval_texts),
                                     list(map(str, eval_labels)), seed]).encode()).hexdigest()
    if key not in _scores_by_inputs:
        if len(train_texts) > MAX_BASELINE_TRAIN_ROWS:
            keep = np.random.default_rng(seed).choice(len(train_texts), MAX_BASELINE_TRAIN_ROWS, replace=False)
            train_texts, train_labels = [train_texts[i] for i in keep], [train_labels[i] for i in keep]
        predicted = tfidf_logistic_regression(train_texts, [str(y) for y in train_labels]).predict(eval_texts)
        truth = [str(y) for y in eval_labels]
        _scores_by_inputs[key] = {"accuracy": float(accuracy_score(truth, predicted)),
                                  "macro_f1": float(f1_score(truth, predicted, average="macro", zero_division=0)),
                                  "mcc": float(matthews_corrcoef(truth, predicted))}
    return dict(_scores_by_inputs[key])


def sanity_baseline(train_texts: list[str], train_labels: list, eval_texts: list[str], eval_labels: list,
                    fine_tuned: dict[str, Any], metric: str, seed: int, split: str = "validation") -> dict[str, Any]:
    """The baseline's scores on `split` (validation, or test when there is no validation split) beside the
    fine-tuned model's, and a warning when the model scores below it on `metric` (accuracy, macro_f1 or
    mcc; any other metric is compared by accuracy)."""
    if len(set(map(str, train_labels))) < 2:
        return {}
    prefix = "eval" if split == "validation" else split  # as the run's own results name the split's scores
    baseline = baseline_scores(train_texts, train_labels, eval_texts, eval_labels, seed)
    compared = metric if metric in baseline else "accuracy"
    model_score = fine_tuned.get(f"{prefix}_{compared}")
    record = {"model": "TF-IDF (word 1-2-grams) + logistic regression on the same training labels",
              **{f"{prefix}_{k}": v for k, v in baseline.items()}, "compared_by": compared,
              f"fine_tuned_{prefix}": model_score, "fine_tuned_below_baseline": None}
    if model_score is None:
        return record
    record["fine_tuned_below_baseline"] = below = model_score < baseline[compared]
    if below:
        record["warning"] = (
            f"The fine-tuned model scores {compared} {model_score:.4f} on the {split} split, below TF-IDF + "
            f"logistic regression on the same labels ({baseline[compared]:.4f}). The run likely underfits or "
            "diverged: train longer (--num_train_epochs), check --learning_rate and --head_learning_rate, or "
            "freeze fewer layers (--freeze_layers).")
        logger.warning(record["warning"])
    else:
        logger.info("Sanity baseline: TF-IDF + logistic regression scores %s %.4f on the %s split, the "
                    "fine-tuned model %.4f.", compared, baseline[compared], split, model_score)
    return record
