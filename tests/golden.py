"""The golden check: fixed-seed tiny runs of every path a restructuring could change, reduced to hashes.

    python tests/golden.py --check            # compare against tests/golden.json (exit 1 on any difference)
    python tests/golden.py --record           # write tests/golden.json anew (say why in the commit)

Each run is a fresh process through the real entry points (`python -m tlnlp.pretrain` / `tlnlp.finetune`),
in fp32 with one thread, on data and models made here. What is hashed: `model.safetensors`, `tokenizer.json`,
`test_predictions.jsonl`, and `all_results.json` and `eval_history.json` with timings removed and the work
folder's path replaced by `<work>`; also both scripts' `--help`.

Hashes hold on one CPU type: the float kernels differ between instruction sets and vendors. The file records
the CPU it was made on and `base`, the commit whose code it hashed. `--check` on another CPU first computes
the baseline there: it runs the same cases on `base`'s code (a temporary git worktree) and compares with that.
`intended_changes` names the hashes a later commit changed on purpose, each with the reason; they are
reported, not failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the test helpers (conftest's data and tiny models)
from conftest import make_documents, tiny_bert_config, write_labeled  # noqa: E402

GOLDEN = HERE / "golden.json"
HASHED = ("model.safetensors", "tokenizer.json", "test_predictions.jsonl", "all_results.json", "eval_history.json",
          "generator/model.safetensors")
# Keys whose values are wall-clock measurements: they differ on every run.
TIMING_SUFFIXES = ("_s", "_seconds")  # "_per_s" and "feature_cache_s" end in "_s" too


def cpu_type() -> str:
    """The instruction set torch dispatches to, the CPU model and AMX: what decides the float kernels."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown CPU"
    amx = " AMX" if torch.cpu._is_amx_tile_supported() else ""
    # TLNLP_GOLDEN_CPU stands in for another CPU: it makes --check compute the baseline from `base` here.
    return os.environ.get("TLNLP_GOLDEN_CPU") or f"{torch.backends.cpu.get_cpu_capability()}{amx} {model}"


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if not k.endswith(TIMING_SUFFIXES) and k != "wall_time"}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def digest(path: Path, work: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".json":
        data = json.dumps(without_timings(json.loads(data)), sort_keys=True).encode()
    data = data.replace(str(work).encode(), b"<work>")
    return hashlib.sha256(data).hexdigest()


def make_inputs(work: Path) -> dict[str, Path]:
    """A corpus, labeled splits, unlabeled text, a search space and a tiny stage-1 model folder."""
    from transformers import BertForMaskedLM

    from tlnlp.models.modeling import train_wordpiece

    corpus = work / "corpus.txt"
    corpus.write_text("\n".join(text for _, text in make_documents(400)) + "\n")
    rows = [{"text": text, "label": topic} for topic, text in make_documents(300, seed=1)]
    inputs = {"corpus": corpus,
              "train": write_labeled(work / "train.csv", rows[:180]),
              "validation": write_labeled(work / "validation.csv", rows[180:240]),
              "test": write_labeled(work / "test.csv", rows[240:])}
    inputs["unlabeled"] = work / "unlabeled.txt"
    inputs["unlabeled"].write_text("\n".join(text for _, text in make_documents(200, seed=7)) + "\n")
    inputs["space"] = work / "space.yaml"
    inputs["space"].write_text("learning_rate: {low: 0.001, high: 0.005, log: true}\nnum_train_epochs: {low: 1, high: 2}\n"
                               "per_device_train_batch_size: [16]\nfreeze_layers: null\nlayerwise_lr_decay: null\n")
    tokenizer = train_wordpiece((text for _, text in make_documents(400)), vocab_size=200)
    inputs["model"] = work / "tiny_mlm"
    torch.manual_seed(0)
    BertForMaskedLM(tiny_bert_config(len(tokenizer))).save_pretrained(inputs["model"])
    tokenizer.save_pretrained(inputs["model"])
    return inputs


def cases(i: dict[str, Path], work: Path) -> dict[str, list[list[str]]]:
    """Each case: the command lines (after `python -m`) run one after another into work/<case>."""
    pre = ["tlnlp.pretrain", "--train_file", str(i["corpus"]), "--model_size", "tiny", "--hidden_size", "32",
           "--num_attention_heads", "2", "--intermediate_size", "64", "--vocab_size", "200", "--max_seq_length",
           "32", "--per_device_train_batch_size", "8", "--learning_rate", "2e-3", "--logging_steps", "5",
           "--seed", "3", "--max_train_steps", "12"]
    ft = ["tlnlp.finetune", "--model_name_or_path", str(i["model"]), "--train_file", str(i["train"]),
          "--validation_file", str(i["validation"]), "--test_file", str(i["test"]), "--per_device_train_batch_size",
          "16", "--learning_rate", "3e-3", "--num_train_epochs", "3", "--max_seq_length", "48", "--seed", "1",
          "--logging_steps", "5"]

    def out(name: str) -> list[str]:
        return ["--output_dir", str(work / name), "--cache_dir", str(work / "cache")]

    return {
        "pretrain-mlm": [pre + out("pretrain-mlm")],
        "pretrain-electra": [pre + out("pretrain-electra") + ["--objective", "electra", "--num_hidden_layers", "3"]],
        # Resumed from the step-4 checkpoint of its own run, in a second process: must end as the straight run.
        "pretrain-resume": [pre + out("pretrain-resume") + ["--checkpointing_steps", "4"],
                            pre + out("pretrain-resume") + ["--checkpointing_steps", "4", "--resume_from_checkpoint",
                                                            str(work / "pretrain-resume/checkpoints/step_00000004")]],
        "finetune-stock-head": [ft + out("finetune-stock-head")],
        "finetune-custom-head": [ft + out("finetune-custom-head") + ["--head_hidden_sizes", "16", "--pooling",
                                                                     "mean", "--head_dropout", "0.1"]],
        "finetune-cached-features": [ft + out("finetune-cached-features") + ["--freeze_embeddings", "--freeze_layers",
                                                                             "1", "--cache_frozen_features"]],
        "finetune-gradual-unfreezing": [ft + out("finetune-gradual-unfreezing") + ["--freeze_layers", "2",
                                                                                   "--unfreeze_schedule", "epoch"]],
        "search-2-trials": [["tlnlp.finetune", "--model_name_or_path", str(i["model"]), "--train_file",
                             str(i["train"]), "--test_file", str(i["test"]), "--search_space", str(i["space"]),
                             "--search_folds", "2", "--search_trials", "2", "--max_seq_length", "32", "--seed", "3",
                             "--logging_steps", "5"] + out("search-2-trials")],
        "self-training-1-round": [ft + out("self-training-1-round") + [
            "--self_training_rounds", "1", "--unlabeled_file", str(i["unlabeled"]), "--pseudo_labels_per_class",
            "20", "--pseudo_label_precision", "0.5"]],
    }


def run_cases(work: Path, code: Path | None = None) -> dict[str, dict[str, str]]:
    """Hashes of every case, run with this checkout's tlnlp or, with `code`, the tlnlp in that folder."""
    # No launcher settings from the caller's shell; precision is fixed by --mixed_precision no below.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONHASHSEED="0", COLUMNS="100")
    if code is not None:  # ahead of the editable install, whose finder Python asks last
        env["PYTHONPATH"] = str(code)
    work.mkdir(parents=True, exist_ok=True)
    inputs = make_inputs(work)
    found: dict[str, dict[str, str]] = {}
    for name, commands in cases(inputs, work).items():
        for command in commands:
            done = subprocess.run([sys.executable, "-m", *command, "--mixed_precision", "no"], env=env,
                                  capture_output=True, text=True, cwd=code or HERE.parent)
            if done.returncode:
                raise SystemExit(f"golden case {name} failed:\n{done.stderr[-4000:]}")
        folder = work / name
        found[name] = {file: digest(folder / file, work) for file in HASHED if (folder / file).exists()}
        print(f"{name}: {len(found[name])} files hashed", flush=True)
    for module in ("tlnlp.pretrain", "tlnlp.finetune"):
        done = subprocess.run([sys.executable, "-m", module, "--help"], env=env, capture_output=True, text=True,
                              check=True, cwd=code or HERE.parent)
        found[f"{module} --help"] = {"stdout": hashlib.sha256(done.stdout.encode()).hexdigest()}
    return found


def baseline_of(base: str, work: Path) -> dict[str, dict[str, str]]:
    """The hashes of `base`'s code on this CPU, from a temporary git worktree of that commit."""
    tree = work / "base-worktree"
    repo = HERE.parent
    subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", "--force", str(tree), base], check=True,
                   capture_output=True)
    try:
        return run_cases(work / "base", code=tree)
    finally:
        subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)], capture_output=True)


def compare(golden: dict, expected: dict, found: dict) -> int:
    intended = golden.get("intended_changes", {})
    differ, changed = [], []
    for case in sorted(set(expected) | set(found)):
        for file in sorted(set(expected.get(case, {})) | set(found.get(case, {}))):
            if expected.get(case, {}).get(file) != found.get(case, {}).get(file):
                (changed if f"{case}: {file}" in intended else differ).append(f"{case}: {file}")
    for line in changed:
        print(f"changed as intended: {line} ({intended[line]})")
    for line in differ:
        print("differs:", line)
    total = sum(len(v) for v in found.values())
    print(f"{total - len(differ) - len(changed)} of {total} hashes match the baseline"
          f"{f', {len(changed)} changed as intended' if changed else ''}; {len(differ)} differ")
    return 1 if differ else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="compare against tests/golden.json (or its base commit)")
    mode.add_argument("--record", action="store_true", help="write tests/golden.json anew, with HEAD as its base")
    parser.add_argument("--work_dir", help="where the runs go (default: a temporary folder, removed after)")
    args = parser.parse_args()
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        if args.record:
            base = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "HEAD"], capture_output=True,
                                  text=True, check=True).stdout.strip()
            found = run_cases(work)
            GOLDEN.write_text(json.dumps({"cpu": cpu_type(), "base": base, "hashes": found, "intended_changes": {}},
                                         indent=2, sort_keys=True) + "\n")
            print(f"recorded {sum(len(v) for v in found.values())} hashes of {base[:8]} on {cpu_type()} in {GOLDEN}")
            return 0
        if golden["cpu"] == cpu_type():
            expected = golden["hashes"]
            print(f"baseline: tests/golden.json ({golden['base'][:8]} on {golden['cpu']})")
        else:
            print(f"tests/golden.json was recorded on {golden['cpu']}; this is {cpu_type()}: computing the baseline "
                  f"of {golden['base'][:8]} here first.", flush=True)
            try:
                expected = baseline_of(golden["base"], work)
            except (subprocess.CalledProcessError, FileNotFoundError) as error:
                print(f"cannot check out the base commit {golden['base']} ({error}); run in a full git clone.")
                return 2
        found = run_cases(work / "head")
    return compare(golden, expected, found)


if __name__ == "__main__":
    sys.exit(main())
