"""Evaluation metrics as `evaluate` modules defined in the package, so they work offline.

`evaluate.load("accuracy")` fetches its script from the Hub; these subclasses of `evaluate.Metric`
need nothing from the network and are used exactly like loaded modules (`add_batch`, `compute`).
"""

from __future__ import annotations

import logging

import datasets
import evaluate
import numpy as np
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

logger = logging.getLogger(__name__)

_EMPTY = {"citation": "", "inputs_description": "predictions and references"}


class SingleLabelMetrics(evaluate.Metric):
    """Accuracy, macro-F1 and Matthews correlation for single-label classification."""

    def _info(self) -> evaluate.MetricInfo:
        features = datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")})
        return evaluate.MetricInfo(description=self.__doc__, features=features, **_EMPTY)

    def _compute(self, predictions, references) -> dict[str, float]:
        return {name: float(score(references, predictions)) for name, score in SINGLE_LABEL_SCORES.items()}


# Each as a plain function of (references, predictions), also for callers that score many resamples.
SINGLE_LABEL_SCORES = {
    "accuracy": accuracy_score,
    "macro_f1": lambda references, predictions: f1_score(references, predictions, average="macro", zero_division=0),
    "mcc": matthews_corrcoef,
}


class MultiLabelMetrics(evaluate.Metric):
    """Micro- and macro-F1 and exact-match accuracy for multi-label classification (0/1 vectors)."""

    def _info(self) -> evaluate.MetricInfo:
        features = datasets.Features(
            {"predictions": datasets.Sequence(datasets.Value("int64")),
             "references": datasets.Sequence(datasets.Value("int64"))}
        )
        return evaluate.MetricInfo(description=self.__doc__, features=features, **_EMPTY)

    def _compute(self, predictions, references) -> dict[str, float]:
        predictions, references = np.asarray(predictions), np.asarray(references)
        return {
            "micro_f1": float(f1_score(references, predictions, average="micro", zero_division=0)),
            "macro_f1": float(f1_score(references, predictions, average="macro", zero_division=0)),
            "exact_match": float((predictions == references).all(axis=1).mean()),
        }


class RegressionMetrics(evaluate.Metric):
    """Mean squared error, Pearson and Spearman correlation for regression."""

    def _info(self) -> evaluate.MetricInfo:
        features = datasets.Features(
            {"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}
        )
        return evaluate.MetricInfo(description=self.__doc__, features=features, **_EMPTY)

    def _compute(self, predictions, references) -> dict[str, float]:
        predictions, references = np.asarray(predictions), np.asarray(references)
        constant = predictions.std() == 0 or references.std() == 0  # correlation undefined: report 0
        return {
            "mse": float(((predictions - references) ** 2).mean()),
            "pearson": 0.0 if constant else float(stats.pearsonr(predictions, references)[0]),
            "spearman": 0.0 if constant else float(stats.spearmanr(predictions, references)[0]),
        }


METRICS = {"single_label": SingleLabelMetrics, "multi_label": MultiLabelMetrics, "regression": RegressionMetrics}
DEFAULT_BEST = {"single_label": "accuracy", "multi_label": "micro_f1", "regression": "mse"}
LOWER_IS_BETTER = {"loss", "mse"}


def selection_metric(name: str | None, task_type: str) -> tuple[str, bool]:
    """The metric that picks models and recipes (--metric_for_best_model, else the task's default), without
    its `eval_` prefix, and whether higher is better."""
    metric = (name or DEFAULT_BEST[task_type]).removeprefix("eval_")
    return metric, metric not in LOWER_IS_BETTER


def load_metric(task_type: str) -> evaluate.Metric:
    # In memory: every process computes on the gathered predictions, with no shared cache files to race on.
    return METRICS[task_type](keep_in_memory=True)


# Below this many validation examples a choice between models is mostly noise: with 50 examples one example is 2
# points, and the standard error of an accuracy near 0.8 is about 6 points (sqrt(0.8 * 0.2 / 50)).
SMALL_VALIDATION = 200


def decided_on(decision: str, examples: int, fix: str) -> str | None:
    """Log how many validation examples `decision` was made on; below SMALL_VALIDATION, return (and log) a
    warning that names `fix`, the option that gives the decision more examples."""
    logger.info("%s: decided on %d validation examples.", decision, examples)
    if examples >= SMALL_VALIDATION:
        return None
    warning = (f"{decision} was decided on only {examples} validation examples: there one example is "
               f"{100 / max(examples, 1):.1f} points, and differences under a few points are noise. {fix}")
    logger.warning(warning)
    return warning
