"""TF-IDF + logistic regression on every built-in labeled set: the floor a neural recipe has to clear.

The labels are the ones `python -m tlnlp.finetune --max_train_samples N --seed S` trains on (stratified,
seeded), tested on the full test split. Seconds on 2 CPU cores:

    python benchmarks/tfidf_baselines.py --labels 1000,2000 --seed 42
"""

from __future__ import annotations

import argparse
import json

from datasets import load_dataset

from tlnlp.data import builtin
from tlnlp.data.prepare import stratified_subset
from tlnlp.recipes.baselines import tfidf_logistic_regression


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", default="1000,2000", help="Comma-separated numbers of training labels.")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    report = {}
    print("| set | labels | accuracy | macro-F1 |\n|---|---:|---:|---:|")
    for name, dataset in builtin.DATASETS.items():
        if not dataset.labeled:
            continue
        splits = load_dataset("json", data_files=builtin.dataset_files(name))
        for n in (int(x) for x in args.labels.split(",")):
            if n > len(splits["train"]):
                continue
            train = stratified_subset(splits["train"], "label", n, "single_label", True, args.seed)
            scores = tfidf_logistic_regression(train["text"], train["label"], splits["test"]["text"],
                                               splits["test"]["label"])
            report[f"{name}/{n}"] = scores
            print(f"| {name} | {n:,} | {scores['test_accuracy']:.3f} | {scores['test_macro_f1']:.3f} |")
    return report


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
