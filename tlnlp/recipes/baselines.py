"""Non-neural and frozen-feature baselines that fine-tuning has to beat."""

from __future__ import annotations

import time

from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score

from tlnlp.models.modeling import mean_pooled_embeddings
from tlnlp.stage2 import sanity


def _scores(truth, predicted, started: float) -> dict[str, float]:
    return {"test_accuracy": float(accuracy_score(truth, predicted)),
            "test_macro_f1": float(f1_score(truth, predicted, average="macro")),
            "train_runtime_s": time.time() - started}


def tfidf_logistic_regression(train_texts, train_labels, test_texts, test_labels) -> dict[str, float]:
    started = time.time()
    model = sanity.tfidf_logistic_regression(train_texts, train_labels)
    return _scores(test_labels, model.predict(test_texts), started)


def frozen_embedding_logistic_regression(model_dir, train_texts, train_labels, test_texts, test_labels,
                                         max_length: int = 128) -> dict[str, float]:
    """Logistic regression on the encoder's frozen, mean-pooled sentence embeddings."""
    started = time.time()
    train_x = mean_pooled_embeddings(model_dir, train_texts, max_length)
    test_x = mean_pooled_embeddings(model_dir, test_texts, max_length)
    classifier = LogisticRegression(max_iter=3000, C=10.0)
    classifier.fit(train_x, train_labels)
    return _scores(test_labels, classifier.predict(test_x), started)
