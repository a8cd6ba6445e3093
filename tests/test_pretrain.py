"""Stage 1 end to end: in-process runs of `main`, and the real script through `accelerate launch`."""

import json
import math
import subprocess
import sys

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import REPO, run_script
from safetensors.torch import load_file
from transformers import pipeline

import tlnlp.core.checkpoints
from tlnlp.core.config import PretrainConfig, parse_config
from tlnlp.core.errors import UserInputError
from tlnlp.pretrain import main


def tiny_args(corpus_file, output_dir, cache_dir, *extra):
    return ["--train_file", str(corpus_file), "--output_dir", str(output_dir), "--cache_dir", str(cache_dir),
            "--model_size", "tiny", "--hidden_size", "32", "--num_attention_heads", "2", "--intermediate_size", "64",
            "--vocab_size", "200", "--max_seq_length", "32", "--per_device_train_batch_size", "8",
            "--learning_rate", "2e-3", "--logging_steps", "5", "--seed", "3", *extra]


def run_main(args):
    AcceleratorState._reset_state(reset_partial_state=True)
    return main(parse_config(PretrainConfig, args))


def test_loss_falls_and_output_loads_with_stock_transformers(corpus_file, tmp_path, cache_dir):
    out = tmp_path / "run"
    results = run_main(tiny_args(corpus_file, out, cache_dir, "--num_train_epochs", "4"))
    history = json.loads((out / "eval_history.json").read_text())
    vocab = len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"])
    # An untrained model scores about ln(vocab); the synthetic text's own entropy is about 3.3 nats.
    assert history[-1]["loss"] < history[0]["loss"] < math.log(vocab) - 0.5, history
    assert history[-1]["loss"] < math.log(vocab) - 1.0, history
    saved = json.loads((out / "all_results.json").read_text())
    for key in ("train_loss", "eval_loss", "eval_perplexity", "train_tokens", "train_tokens_per_s", "train_runtime_s"):
        assert key in saved
    assert saved["eval_loss"] == pytest.approx(results["eval_loss"])
    assert (out / "model.safetensors").exists() and (out / "training_config.yaml").exists()
    fill = pipeline("fill-mask", model=str(out))
    assert len(fill("the ball [MASK] team")) == 5


def test_tokenization_is_cached(corpus_file, tmp_path, cache_dir, caplog):
    run_main(tiny_args(corpus_file, tmp_path / "a", cache_dir, "--max_train_steps", "2"))
    entries = sorted(p.name for p in (cache_dir / "tokenized").iterdir())
    caplog.clear()
    with caplog.at_level("INFO"):
        run_main(tiny_args(corpus_file, tmp_path / "b", cache_dir, "--max_train_steps", "2"))
    assert "Loading tokenized data from the cache" in caplog.text
    assert sorted(p.name for p in (cache_dir / "tokenized").iterdir()) == entries


@pytest.mark.parametrize("objective", ["mlm", "electra"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(objective, corpus_file, tmp_path, cache_dir,
                                                               monkeypatch):
    common = ["--max_train_steps", "12", "--checkpointing_steps", "4", "--objective", objective]
    run_main(tiny_args(corpus_file, tmp_path / "straight", cache_dir, *common))

    original_save = tlnlp.core.checkpoints.Checkpoints.save

    def save_then_die(self, step, *args):
        original_save(self, step, *args)
        if step == 8:
            raise KeyboardInterrupt("simulated kill after the step-8 checkpoint")

    monkeypatch.setattr(tlnlp.core.checkpoints.Checkpoints, "save", save_then_die)
    interrupted = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        run_main(tiny_args(corpus_file, interrupted, cache_dir, *common))
    monkeypatch.setattr(tlnlp.core.checkpoints.Checkpoints, "save", original_save)
    assert not (interrupted / "model.safetensors").exists()
    run_main(tiny_args(corpus_file, interrupted, cache_dir, *common, "--resume_from_checkpoint", "latest"))

    saved = ["model.safetensors"] + (["generator/model.safetensors"] if objective == "electra" else [])
    for file in saved:
        straight = load_file(tmp_path / "straight" / file)
        resumed = load_file(interrupted / file)
        assert straight.keys() == resumed.keys()
        for name in straight:
            assert torch.equal(straight[name], resumed[name]), (file, name)
    history = [json.loads((folder / "eval_history.json").read_text()) for folder in (tmp_path / "straight", interrupted)]
    assert history[0][-1] == history[1][-1]


def test_output_dir_with_an_earlier_run_is_refused_and_untouched(corpus_file, tmp_path, cache_dir):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"precious")
    with pytest.raises(UserInputError, match="already holds files from an earlier run"):
        run_main(tiny_args(corpus_file, out, cache_dir, "--max_train_steps", "1"))
    assert (out / "model.safetensors").read_bytes() == b"precious"
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]


def test_bad_inputs_fail_before_training_and_write_nothing(corpus_file, tmp_path, cache_dir, tiny_mlm_dir):
    out = tmp_path / "never"
    with pytest.raises(UserInputError, match="--text_column 'body' is not in the data. Columns found: text"):
        run_main(tiny_args(corpus_file, out, cache_dir, "--text_column", "body"))
    args = ["--train_file", str(corpus_file), "--output_dir", str(out), "--cache_dir", str(cache_dir),
            "--model_name_or_path", str(tiny_mlm_dir)]
    with pytest.raises(UserInputError, match="--max_seq_length 512 is longer than the model's 128 position"):
        run_main(args + ["--max_seq_length", "512"])
    with pytest.raises(UserInputError, match="belongs to another model"):
        run_main(args + ["--tokenizer_name", "minilm-l6"])
    with pytest.raises(UserInputError, match="--architecture modernbert applies to the --model_size presets"):
        run_main(args + ["--architecture", "modernbert"])
    with pytest.raises(UserInputError, match=r"Stage 1 \(its validation loss and perplexity\) needs a validation split"):
        run_main(args + ["--validation_split_percentage", "0"])
    assert not out.exists()


def test_script_single_process_and_bad_input_exit_codes(corpus_file, tmp_path, cache_dir):
    out = tmp_path / "one"
    done = run_script("pretrain_mlm.py", tiny_args(corpus_file, out, cache_dir, "--max_train_steps", "3"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "all_results.json").read_text())["num_processes"] == 1

    # Plain python: `accelerate launch` turns any failure into exit 1 and adds its own traceback.
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "pretrain_mlm.py"),
                          *tiny_args(tmp_path / "missing.txt", tmp_path / "x", cache_dir)], capture_output=True,
                         text=True)
    assert bad.returncode == 2
    assert "error: --train_file" in bad.stderr and "no such file" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert not (tmp_path / "x").exists()


def test_two_process_data_parallel_run(corpus_file, tmp_path, cache_dir):
    out, reports = tmp_path / "ddp", tmp_path / "reports"
    reports.mkdir()
    done = run_script("", [str(reports), "pretrain", *tiny_args(corpus_file, out, cache_dir, "--max_train_steps",
                                                                   "6", "--checkpointing_steps", "3")],
                      processes=2, wrapper=REPO / "tests" / "rank_report.py")
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((reports / f"rank{i}.json").read_text()) for i in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["digest"] == ranks[1]["digest"]  # data parallel: identical parameters on both ranks
    # Each rank draws its own masks: with one seed for all, equal-shaped packed batches got equal masks.
    masks = [json.loads((reports / f"masks{i}.json").read_text()) for i in range(2)]
    assert len(masks[0]) == len(masks[1]) == 6
    assert all(a != b for a, b in zip(masks[0], masks[1]))
    results = json.loads((out / "all_results.json").read_text())
    assert results["num_processes"] == 2 and results["global_batch_size"] == 16


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_checkpoint(corpus_file, tmp_path, cache_dir,
                                                                        monkeypatch):
    import tlnlp.models.modeling
    from tlnlp.core.errors import TrainingError

    forward = tlnlp.models.modeling.MaskedLMLoss.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls["n"] += 1
        if self.training and calls["n"] == 5:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(tlnlp.models.modeling.MaskedLMLoss, "forward", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(TrainingError, match="The loss became nan at optimizer step 5 .*The last saved checkpoint is intact"):
        run_main(tiny_args(corpus_file, out, cache_dir, "--max_train_steps", "8", "--checkpointing_steps", "2"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]

    calls["n"] = 0
    results = run_main(tiny_args(corpus_file, tmp_path / "skip", cache_dir, "--max_train_steps", "8",
                                 "--on_nonfinite_loss", "skip"))
    assert results["optimizer_steps"] == 8 and math.isfinite(results["train_loss"])


@pytest.mark.parametrize("extra", [["--whole_word_mask"], ["--line_by_line"], ["--streaming", "--validation_file"]])
def test_masking_and_data_variants_train(corpus_file, tmp_path, cache_dir, extra):
    if extra[-1] == "--validation_file":
        extra = extra + [str(corpus_file)]
    results = run_main(tiny_args(corpus_file, tmp_path / "run", cache_dir, "--max_train_steps", "6", *extra))
    assert results["optimizer_steps"] == 6 and math.isfinite(results["eval_loss"])


def test_streaming_with_too_few_documents_is_an_error(corpus_file, tmp_path, cache_dir):
    with pytest.raises(UserInputError, match=r"holds 400 document\(s\); it needs at least 501"):
        run_main(tiny_args(corpus_file, tmp_path / "run", cache_dir, "--max_train_steps", "6", "--streaming"))


def test_dataset_folder_like_a_hub_dataset_and_tracking(corpus_file, tmp_path, cache_dir):
    folder = tmp_path / "my_dataset"  # `load_dataset(name)` reads a folder of data files exactly like a Hub repo
    folder.mkdir()
    (folder / "train.txt").write_text(corpus_file.read_text())
    out = tmp_path / "run"
    args = tiny_args(corpus_file, out, cache_dir, "--max_train_steps", "4", "--with_tracking", "--report_to",
                     "tensorboard")
    args[args.index("--train_file"): args.index("--train_file") + 2] = ["--dataset_name", str(folder)]
    run_main(args)
    assert list(out.rglob("events.out.tfevents.*")), "tensorboard wrote no event file"
