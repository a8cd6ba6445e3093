"""The stage-2 defaults on real data, as a user runs them (MiniLM, built-in data; `make test-all` only)."""

import json

import pytest

from tlnlp.data import builtin


def two_topic_task(folder, labels: int = 200, test: int = 200, seed: int = 7):
    """Mathematics against Geography from wiki-topics: `labels` stratified training articles, `test` test ones
    (about 4 Geography articles to 1 Mathematics: a constant classifier scores about 0.8)."""
    files = builtin.dataset_files("wiki-topics")
    keep = {"Mathematics", "Geography"}
    written = {}
    for split, size in (("train", labels), ("test", test)):
        rows = [json.loads(line) for line in open(files[split], encoding="utf-8")]
        rows = [r for r in rows if r["label"] in keep]
        chosen = builtin.stratified_indices([r["label"] for r in rows], size, seed)
        written[split] = folder / f"{split}.jsonl"
        written[split].write_text("".join(json.dumps({"text": rows[i]["text"], "label": rows[i]["label"]}) + "\n"
                                          for i in chosen.tolist()))
    return written


@pytest.mark.heavy
@pytest.mark.usefixtures("one_thread_subprocesses")
def test_a_200_label_frozen_bottom_run_with_an_mlp_head_learns_two_topics_at_the_defaults(tmp_path):
    """The case that used to end as a constant classifier without a warning (3 epochs: 36 optimizer steps at
    batch 16 left the head predicting Geography for everything); TF-IDF + logistic regression scores 0.96."""
    import subprocess
    import sys

    files = two_topic_task(tmp_path)
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "tlnlp.finetune", "--model_name_or_path", "minilm-l6", "--train_file",
                           str(files["train"]), "--test_file", str(files["test"]), "--freeze_layers", "4",
                           "--head_hidden_sizes", "64", "--output_dir", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["test_accuracy"] >= 0.9, results
    assert results["test_mcc"] > 0.5 and "underfitting_warning" not in results
