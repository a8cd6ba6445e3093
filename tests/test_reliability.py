"""Bad input for both scripts, safe checkpoint loading, tokenize-once preprocessing, 1 vs 2 processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from conftest import REPO, make_documents, run_script, write_labeled
from transformers import AutoTokenizer

import tlnlp.finetune
import tlnlp.pretrain
from tlnlp.core.checkpoints import latest_checkpoint
from tlnlp.core.cli import run
from tlnlp.core.config import FinetuneConfig, PretrainConfig
from tlnlp.models.modeling import train_wordpiece

STAGES = {"pretrain": (tlnlp.pretrain.main, PretrainConfig), "finetune": (tlnlp.finetune.main, FinetuneConfig)}


def run_cli(stage: str, args: list[str]) -> int:
    AcceleratorState._reset_state(reset_partial_state=True)
    main, config = STAGES[stage]
    return run(main, config, args)


def pretrain_args(train: Path, out: Path, cache: Path, *extra) -> list[str]:
    scratch = [] if "--model_name_or_path" in extra else [
        "--model_size", "tiny", "--hidden_size", "32", "--num_attention_heads", "2", "--intermediate_size", "64",
        "--vocab_size", "200"]
    return ["--train_file", str(train), "--output_dir", str(out), "--cache_dir", str(cache), *scratch,
            "--max_seq_length", "32", "--per_device_train_batch_size", "8", "--max_train_steps", "4", *extra]


def finetune_args(model: Path, train: Path, out: Path, cache: Path, *extra) -> list[str]:
    return ["--model_name_or_path", str(model), "--train_file", str(train), "--output_dir", str(out),
            "--cache_dir", str(cache), "--max_seq_length", "32", "--per_device_train_batch_size", "8",
            "--max_train_steps", "4", *extra]


def labeled_rows(n: int = 60) -> list[dict]:
    return [{"text": text, "label": topic} for topic, text in make_documents(n, seed=7)]


# ----------------------------------------------------------------------------------------------------------
# The bad-input table: every case must end with a clear message, exit status 2, no traceback, no output.
# Each builder gets a scratch folder and the tiny model folder, and returns (stage, args, expected message).
# ----------------------------------------------------------------------------------------------------------


def binary_file(tmp: Path, model: Path):
    (tmp / "corpus.txt").write_bytes(b"some text\n\x00\x01\x02\x89PNG binary\n" * 50)
    return "pretrain", [str(tmp / "corpus.txt")], "looks binary"


def not_utf8(tmp: Path, model: Path):
    (tmp / "corpus.txt").write_bytes("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1") * 50)
    return "pretrain", [str(tmp / "corpus.txt")], "is not UTF-8"


def blank_lines(tmp: Path, model: Path):
    (tmp / "corpus.txt").write_text("\n   \n\t\n" * 40)
    return "pretrain", [str(tmp / "corpus.txt")], "no text"


def one_huge_line(tmp: Path, model: Path):
    (tmp / "corpus.txt").write_text("word " * 400_000)  # 2 MB, no line break: one document
    return "pretrain", [str(tmp / "corpus.txt")], "at least 2 documents"


def csv_wrong_delimiter_pretrain(tmp: Path, model: Path):
    (tmp / "corpus.csv").write_text("text;source\n" + "".join(f"{t};web\n" for _, t in make_documents(40)))
    return "pretrain", [str(tmp / "corpus.csv")], "--csv_delimiter ';'"


def csv_wrong_delimiter_finetune(tmp: Path, model: Path):
    (tmp / "train.csv").write_text("text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in labeled_rows()))
    return "finetune", [str(tmp / "train.csv")], "--csv_delimiter '\\t'"


def mixed_label_types(tmp: Path, model: Path):
    rows = [{"text": r["text"], "label": r["label"] if i % 3 else i} for i, r in enumerate(labeled_rows())]
    return "finetune", [str(write_labeled(tmp / "train.jsonl", rows))], "The labels mix types"


def label_typo_between_splits(tmp: Path, model: Path):
    rows = labeled_rows()
    write_labeled(tmp / "validation.csv", [{**r, "label": "sprots" if r["label"] == "sports" else r["label"]}
                                           for r in rows[:20]])
    return "finetune", [str(write_labeled(tmp / "train.csv", rows)), "--validation_file",
                        str(tmp / "validation.csv")], "never seen in training: 'sprots'"


def missing_label_column(tmp: Path, model: Path):
    rows = [{"text": r["text"], "category": r["label"]} for r in labeled_rows()]
    return "finetune", [str(write_labeled(tmp / "train.csv", rows))], "Columns found: text, category"


def tokenizer_of_another_model(vocab_size: int):
    def build(tmp: Path, model: Path):  # more tokens than the embeddings hold, or fewer but other ids
        other = train_wordpiece((t.upper() for _, t in make_documents(300, seed=9)), vocab_size=vocab_size,
                                lowercase=False)
        other.save_pretrained(tmp / "other_tokenizer")
        return "finetune", [str(write_labeled(tmp / "train.csv", labeled_rows())), "--tokenizer_name",
                            str(tmp / "other_tokenizer")], "belongs to another model"
    return build


def truncated_safetensors(tmp: Path, model: Path):
    broken = tmp / "broken_model"
    shutil.copytree(model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return "finetune", [str(write_labeled(tmp / "train.csv", labeled_rows())), "--model_name_or_path",
                        str(broken)], "model.safetensors"


def truncated_safetensors_continued_pretraining(tmp: Path, model: Path):
    _, args, message = truncated_safetensors(tmp, model)
    (tmp / "corpus.txt").write_text("\n".join(t for _, t in make_documents(80)))
    return "pretrain", [str(tmp / "corpus.txt"), "--model_name_or_path", str(tmp / "broken_model")], message


def header_only_test_file(tmp: Path, model: Path):
    train = write_labeled(tmp / "train.csv", labeled_rows())
    (tmp / "test.csv").write_text("text,label\n")
    return "finetune", [str(train), "--test_file", str(tmp / "test.csv")], "test.csv holds a header but no rows"


def output_dir_is_a_file(tmp: Path, model: Path):
    train = write_labeled(tmp / "train.csv", labeled_rows())
    (tmp / "results.txt").write_text("not a folder")
    return "finetune", [str(train), "--output_dir", str(tmp / "results.txt")], "results.txt is a file, not a folder"


def yaml_config(stage: str, text: str, message: str):
    def build(tmp: Path, model: Path):
        (tmp / "run.yaml").write_text(text)
        data = tmp / "data.csv"
        write_labeled(data, labeled_rows())
        return stage, [str(data), "--config", str(tmp / "run.yaml")], message
    return build


def bad_number(stage: str, option: str, value: str, message: str):
    def build(tmp: Path, model: Path):
        data = tmp / "data.csv"
        write_labeled(data, labeled_rows())
        return stage, [str(data), option, value], message
    return build


BAD_INPUTS = {
    "binary file": binary_file,
    "non-UTF-8 file": not_utf8,
    "only blank lines": blank_lines,
    "one huge line": one_huge_line,
    "CSV with ';' (pretrain)": csv_wrong_delimiter_pretrain,
    "CSV with tabs (finetune)": csv_wrong_delimiter_finetune,
    "mixed label types": mixed_label_types,
    "label typo between splits": label_typo_between_splits,
    "missing label column": missing_label_column,
    "tokenizer of another model (larger)": tokenizer_of_another_model(400),
    "tokenizer of another model (smaller)": tokenizer_of_another_model(120),
    "truncated safetensors (finetune)": truncated_safetensors,
    "truncated safetensors (pretrain)": truncated_safetensors_continued_pretraining,
    "header-only test file": header_only_test_file,
    "output_dir is a file": output_dir_is_a_file,
    **{f"YAML unknown key ({s})": yaml_config(s, "learning_rte: 0.1\n", "unknown option(s) learning_rte")
       for s in STAGES},
    **{f"YAML wrong type ({s})": yaml_config(s, "num_train_epochs: three\n", "num_train_epochs") for s in STAGES},
    **{f"{option} {value} ({s})": bad_number(s, option, value, f"{option} must be greater than 0")
       for s in STAGES for option, value in (("--per_device_train_batch_size", "0"), ("--learning_rate", "-0.001"),
                                              ("--max_train_steps", "0"))},
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_a_clear_message_and_leaves_no_output(case, tmp_path, tiny_mlm_dir, capsys):
    stage, (data, *extra), message = BAD_INPUTS[case](tmp_path, tiny_mlm_dir)
    out = tmp_path / "out"
    if stage == "pretrain":
        args = pretrain_args(Path(data), out, tmp_path / "cache", *extra)
    else:
        args = finetune_args(tiny_mlm_dir, Path(data), out, tmp_path / "cache", *extra)
    status = run_cli(stage, args)
    err = capsys.readouterr().err
    assert status == 2, err[-2000:]
    assert message in err, err[-2000:]
    assert "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


def test_bad_input_through_the_real_script_exits_cleanly(tmp_path, tiny_mlm_dir):
    """The same through the real script: one line of error, no traceback. Directly the status is 2; under
    `accelerate launch --quiet` the launcher reports any failure as 1 (without --quiet it adds a traceback)."""
    _, (data, *_), message = not_utf8(tmp_path, tiny_mlm_dir)
    args = pretrain_args(Path(data), tmp_path / "out", tmp_path / "cache")
    script = str(REPO / "scripts" / "pretrain_mlm.py")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    for command, status in (([sys.executable, script], 2),
                            ([sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--num_processes", "1",
                              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", script], 1)):
        done = subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == status, done.stderr[-2000:]
        assert f"error: --train_file {data} {message}" in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------
# Safe loading
# ----------------------------------------------------------------------------------------------------------


class Exploit:
    """Pickles to a call of `Path.touch` on a marker file: what a malicious checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def checkpointed_finetune(tiny_mlm_dir: Path, labeled_files: dict, tmp_path: Path) -> tuple[list[str], Path]:
    args = finetune_args(tiny_mlm_dir, labeled_files["train"], tmp_path / "out", tmp_path / "cache",
                         "--checkpointing_steps", "2", "--validation_file", str(labeled_files["validation"]))
    assert run_cli("finetune", args) == 0
    checkpoints = sorted((tmp_path / "out" / "checkpoints").glob("step_*"))
    assert checkpoints and (tmp_path / "out" / "model.safetensors").exists()
    return args, checkpoints[-1]


@pytest.mark.parametrize("target", ["random_states_0.pkl", "optimizer.bin", "scheduler.bin"])
def test_a_checkpoint_holding_a_malicious_pickle_is_refused(target, tiny_mlm_dir, labeled_files, tmp_path, capsys):
    args, checkpoint = checkpointed_finetune(tiny_mlm_dir, labeled_files, tmp_path)
    assert (checkpoint / target).exists(), sorted(p.name for p in checkpoint.iterdir())
    marker = tmp_path / "code_ran"
    torch.save({"state": Exploit(marker)}, checkpoint / target)
    capsys.readouterr()
    status = run_cli("finetune", [*args, "--resume_from_checkpoint", str(checkpoint)])
    err = capsys.readouterr().err
    assert status == 2 and "Refusing to resume" in err and "pathlib" in err, err[-2000:]
    assert not marker.exists()  # nothing in the file was executed


def test_a_damaged_checkpoint_is_a_clear_error(tiny_mlm_dir, labeled_files, tmp_path, capsys):
    args, checkpoint = checkpointed_finetune(tiny_mlm_dir, labeled_files, tmp_path)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()
    assert run_cli("finetune", [*args, "--resume_from_checkpoint", str(checkpoint)]) == 2
    err = capsys.readouterr().err
    assert "Could not load checkpoint" in err and "Traceback" not in err, err[-2000:]


def test_checkpoints_pickle_nothing_beyond_tensors_and_numbers(tiny_mlm_dir, labeled_files, tmp_path):
    _, checkpoint = checkpointed_finetune(tiny_mlm_dir, labeled_files, tmp_path)
    for file in checkpoint.iterdir():
        if file.suffix in (".bin", ".pkl"):  # every pickle loads under weights_only=True (numpy arrays allowed)
            import numpy as np

            with torch.serialization.safe_globals([np._core.multiarray._reconstruct, np.ndarray, np.dtype,
                                                   np.dtypes.UInt32DType]):
                torch.load(file, weights_only=True)
    assert not list(checkpoint.glob("custom_checkpoint_*"))  # no arbitrary registered objects


def test_checkpoints_rotate_and_a_save_killed_half_way_is_never_resumed_from(corpus_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = pretrain_args(corpus_file, out, tmp_path / "cache", "--max_train_steps", "8", "--checkpointing_steps", "2",
                         "--save_total_limit", "2")
    original_save = Accelerator.save_state

    def killed_while_saving_step_6(self, output_dir, **kwargs):
        result = original_save(self, output_dir, **kwargs)
        if output_dir.endswith("step_00000006.tmp"):  # the files are written, the state file is not
            raise KeyboardInterrupt("killed during the save")
        return result

    monkeypatch.setattr(Accelerator, "save_state", killed_while_saving_step_6)
    with pytest.raises(KeyboardInterrupt):
        run_cli("pretrain", args)
    folder = out / "checkpoints"
    assert (folder / "step_00000006.tmp").exists() and not (folder / "step_00000006.tmp" / "trainer_state.json").exists()
    assert latest_checkpoint(out) == folder / "step_00000004"
    monkeypatch.setattr(Accelerator, "save_state", original_save)
    assert run_cli("pretrain", [*args, "--resume_from_checkpoint", "latest"]) == 0
    assert sorted(p.name for p in folder.glob("step_*")) == ["step_00000006", "step_00000008"]  # rotated to 2


# ----------------------------------------------------------------------------------------------------------
# Tokenize once, reuse
# ----------------------------------------------------------------------------------------------------------


def test_preprocess_only_then_train_reuses_the_tokenized_data(corpus_file, tmp_path, capsys, caplog):
    folder = tmp_path / "tokenized"
    base = pretrain_args(corpus_file, tmp_path / "run", tmp_path / "cache", "--preprocessed_dataset_dir", str(folder))
    without_output = [a for i, a in enumerate(base) if a != "--output_dir" and base[i - 1] != "--output_dir"]
    assert run_cli("pretrain", [*without_output, "--preprocess_only"]) == 0
    assert (folder / "dataset_dict.json").exists() and not (tmp_path / "run").exists()
    caplog.clear()
    assert run_cli("pretrain", base) == 0
    assert f"Loading tokenized data from {folder}" in caplog.text
    # Other settings than the ones it was made with: refused, not silently reused.
    assert run_cli("pretrain", [*base, "--max_seq_length", "24", "--output_dir", str(tmp_path / "run2")]) == 2
    assert "(differing: max_seq_length)" in capsys.readouterr().err


def test_a_foreign_folder_is_not_taken_for_preprocessed_data(corpus_file, tmp_path, capsys):
    folder = tmp_path / "something"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    args = pretrain_args(corpus_file, tmp_path / "run", tmp_path / "cache", "--preprocessed_dataset_dir", str(folder))
    assert run_cli("pretrain", args) == 2
    assert "is not a tlnlp tokenized data set" in capsys.readouterr().err
    assert (folder / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------------------------------------
# One process vs two
# ----------------------------------------------------------------------------------------------------------

LOSS_TOLERANCE = 0.03  # relative; the two runs differ only in masks and dropout drawn per process


def test_two_processes_follow_the_one_process_loss_curve(corpus_file, tmp_path):
    """Same global batch (1 x 16 vs 2 x 8), same seed: the validation loss curves agree within 3%."""
    curves = {}
    for processes, batch in ((1, "16"), (2, "8")):
        out = tmp_path / f"p{processes}"
        args = pretrain_args(corpus_file, out, tmp_path / f"cache{processes}", "--max_train_steps", "30",
                             "--eval_steps", "10", "--per_device_train_batch_size", batch, "--learning_rate", "2e-3",
                             "--seed", "4")
        done = run_script("pretrain_mlm.py", args, processes=processes)
        assert done.returncode == 0, done.stderr[-3000:]
        curves[processes] = [h["loss"] for h in json.loads((out / "eval_history.json").read_text())]
        assert json.loads((out / "all_results.json").read_text())["global_batch_size"] == 16
    assert len(curves[1]) == len(curves[2]) == 3
    assert curves[1][-1] < curves[1][0]  # it learns at all
    for one, two in zip(curves[1], curves[2]):
        assert abs(one - two) / one < LOSS_TOLERANCE, curves
    assert curves[1] != curves[2]  # really two different runs, not one result read twice
    print("validation loss, 1 vs 2 processes:", curves)


def test_streaming_over_two_processes_trains_on_every_document_once(tmp_path):
    """A streamed corpus is split between processes: over one pass, each document is seen once, by one rank."""
    docs = [f"document {i}: {text}" for i, (_, text) in enumerate(make_documents(96, seed=11))]
    (tmp_path / "train.txt").write_text("\n".join(docs) + "\n")
    (tmp_path / "validation.txt").write_text("\n".join(t for _, t in make_documents(20, seed=12)) + "\n")
    out, reports = tmp_path / "out", tmp_path / "reports"
    reports.mkdir()
    # 96 documents, 2 processes x 4 per batch: exactly one pass in 12 steps.
    args = pretrain_args(tmp_path / "train.txt", out, tmp_path / "cache", "--validation_file",
                         str(tmp_path / "validation.txt"), "--streaming", "--line_by_line", "--max_seq_length", "64",
                         "--per_device_train_batch_size", "4", "--max_train_steps", "12")
    done = run_script("", [str(reports), "pretrain", *args], processes=2, wrapper=REPO / "tests" / "rank_report.py")
    assert done.returncode == 0, done.stderr[-3000:]
    seen = [json.loads((reports / f"rows{rank}.json").read_text()) for rank in range(2)]
    assert len(seen[0]) == len(seen[1]) == 48
    tokenizer = AutoTokenizer.from_pretrained(out)
    expected = [tokenizer(doc, truncation=True, max_length=64)["input_ids"] for doc in docs]
    assert sorted(map(tuple, seen[0] + seen[1])) == sorted(map(tuple, expected))
