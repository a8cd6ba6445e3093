"""A tiny end-to-end study: two arms x two label counts, report and plots, finished runs skipped."""

import json

import pytest

from tlnlp.core.errors import UserInputError
from tlnlp.recipes.study import parse_arm, run_study, write_report


def test_parse_arm():
    assert parse_arm("frozen:4@minilm-l6", None).freeze_layers == 4
    assert parse_arm("dapt:movie-reviews", "m").dapt_corpus == "movie-reviews"
    with pytest.raises(UserInputError, match="Unknown arm 'thawed'"):
        parse_arm("thawed", "m")
    with pytest.raises(UserInputError, match="names no model"):
        parse_arm("scratch", None)


def test_tiny_study_report_plots_and_rerun(tiny_mlm_dir, tmp_path, caplog):
    arms = [parse_arm(spec, str(tiny_mlm_dir)) for spec in ("scratch", "frozen:1", "dapt:task")]
    finetune = ["--max_seq_length", "32", "--num_train_epochs", "1", "--per_device_train_batch_size", "16",
                "--cache_dir", str(tmp_path / "cache"), "--continued_pretraining_steps", "4", "--min_train_steps", "0"]
    kwargs = dict(arms=arms, dataset="wiki-uncertainty", label_counts=[40, 80], seeds=[1], output_dir=tmp_path,
                  finetune_args=finetune)
    rows = run_study(**kwargs)
    assert len(rows) == 6 and {r["labels"] for r in rows} == {40, 80}
    # The dapt arm's encoder is pretrained once on the set's training texts, and gated for each label count.
    gates = [json.loads((tmp_path / "runs" / "dapt-task@tiny_mlm0" / f"labels{n}_seed1" / "all_results.json").read_text())
             ["continued_pretraining"] for n in (40, 80)]
    assert [g["reused_from_cache"] for g in gates] == [False, True] and [g["gate_examples"] for g in gates] == [250, 250]
    assert all(0 <= r["test_accuracy"] <= 1 for r in rows)
    results = write_report(tmp_path, rows, None, "tiny", "pytest")
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
    report = (tmp_path / "report.md").read_text()
    assert "| frozen-1@" in report and "| scratch@" in report
    assert json.loads((tmp_path / "results.json").read_text())["summary"] == results["summary"]

    caplog.clear()
    with caplog.at_level("INFO"):
        again = run_study(**kwargs)
    assert caplog.text.count("done earlier, skipped") == 6
    assert again == rows
