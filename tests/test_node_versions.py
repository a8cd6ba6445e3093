"""The GPU node's library versions, in an environment of their own (`make test-all` only).

A cluster's GPU node comes with its own transformers, accelerate and huggingface_hub, older than the ones the
main suite runs with, and no package index. This builds that environment here (the node's versions, this
machine's CPU torch, and tlnlp's other dependencies from the offline bundle with --no-index), then runs the
GPU check's dry rehearsal from the bundle and a handful of end-to-end tests of both stages in it. The lower
bounds in pyproject.toml are what this test and the main suite prove.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from tlnlp.core.config import cache_root

# One worker builds the environment and runs every test that uses it (`-n 2 --dist loadgroup`).
pytestmark = [pytest.mark.heavy, pytest.mark.xdist_group("node-env")]

# As read on the GPU node (benchmarks/gpu_check.py's smoke stage records them again on every run there).
NODE_VERSIONS = ["transformers==5.17.0", "accelerate==1.15.0", "huggingface_hub==1.33.0", "tokenizers==0.23.2",
                 "safetensors==0.8.0"]
# Also on the node, at versions not pinned here (numpy 2.5.2 there is not on this machine's index).
NODE_ALSO = ["numpy", "pyarrow", "scikit-learn", "scipy", "matplotlib", "pyyaml", "tqdm", "psutil", "xxhash", "pandas",
             "fsspec", "requests", "packaging", "pytest"]
TORCH = "torch==2.13.0"  # the CPU wheel on this machine's disk (the node has a CUDA torch 2.11)
BUNDLE = REPO / ".gpu-bundle-local"
END_TO_END = [
    "tests/test_pretrain.py::test_loss_falls_and_output_loads_with_stock_transformers",
    "tests/test_pretrain.py::test_resume_gives_the_same_weights_as_an_uninterrupted_run[mlm]",
    "tests/test_finetune.py::test_round_trip_through_pipeline_matches_tlnlp",
    "tests/test_finetune.py::test_two_process_run_with_frozen_layers",
    "tests/test_finetune.py::test_modernbert_from_scratch_through_both_stages",
    "tests/test_hub.py::test_train_push_pull_predict",
]


def pip(python: Path, *args: str) -> None:
    done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args],
                          capture_output=True, text=True)
    assert done.returncode == 0, f"pip install {' '.join(args)}:\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def node_python() -> Path:
    """The node-version environment's python, built once per set of versions and bundle (kept in the cache)."""
    if not (BUNDLE / "manifest.json").exists():
        pytest.fail(f"{BUNDLE} is missing: `make gpu-bundle-local` makes it (`make test-all` does, first).")
    manifest = (BUNDLE / "manifest.json").read_text()
    key = hashlib.sha256(json.dumps([NODE_VERSIONS, NODE_ALSO, TORCH, json.loads(manifest)["requirements"],
                                     sys.version]).encode()).hexdigest()[:12]
    env = cache_root() / "envs" / f"node-{key}"
    python = env / "bin" / "python"
    if not (env / "COMPLETE").exists():
        shutil.rmtree(env, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
        pip(python, TORCH)
        pip(python, *NODE_VERSIONS, *NODE_ALSO)
        pip(python, "--no-index", "--no-deps", *map(str, sorted((BUNDLE / "wheels").glob("*.whl"))))
        (env / "COMPLETE").write_text(manifest)
    return python


def node_env() -> dict:
    # tlnlp from the working tree, as on the node; nothing from the main environment.
    return {**{k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}, "PYTHONPATH": str(REPO)}


def test_the_environment_has_the_node_versions(node_python):
    done = subprocess.run([str(node_python), "-c", "import importlib.metadata as m, json; print(json.dumps({n: "
                           "m.version(n) for n in ('transformers', 'accelerate', 'huggingface_hub', 'tokenizers', "
                           "'datasets', 'evaluate', 'torchdata')}))"], capture_output=True, text=True, env=node_env())
    assert done.returncode == 0, done.stderr
    versions = json.loads(done.stdout)
    assert [f"{n}=={versions[n]}" for n in ("transformers", "accelerate", "huggingface_hub", "tokenizers")] == \
        NODE_VERSIONS[:4]
    bundled = {r.split("==")[0]: r.split("==")[1] for r in json.loads((BUNDLE / "manifest.json").read_text())["requirements"]}
    assert {n: versions[n] for n in ("datasets", "evaluate", "torchdata")} == \
        {n: bundled[n] for n in ("datasets", "evaluate", "torchdata")}


def test_the_gpu_checks_dry_rehearsal_runs_from_the_bundle(node_python, tmp_path):
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry", "--bundle", str(BUNDLE),
                           "--output", str(tmp_path)], capture_output=True, text=True, timeout=1500,
                          env={**node_env(), "PYTHON": str(node_python), "TLNLP_HOME": str(tmp_path / "empty-home")})
    report = json.loads((tmp_path / "gpu_check_dry.json").read_text())
    assert done.returncode == 0, (done.stderr[-3000:], {n: s.get("error") for n, s in report["stages"].items()})
    smoke = report["stages"]["smoke"]
    assert smoke["versions"]["transformers"] == "5.17.0" and smoke["modules_failing_to_import"] == []
    for run in ("stage1_tlnlp", "stage1_stock", "stage1_compiled"):
        assert report["stages"][run]["tokens_per_s_median_window"] > 0
    assert report["stages"]["step_vs_stock"]["losses_agree"]
    assert 0 <= report["summary"]["transfer_accuracy"] <= 1


def test_both_stages_end_to_end_with_the_node_versions(node_python, tmp_path):
    done = subprocess.run([str(node_python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *END_TO_END],
                          capture_output=True, text=True, timeout=1500, cwd=REPO, env=node_env())
    assert done.returncode == 0, done.stdout[-5000:]
    summary = done.stdout.splitlines()[-1]  # parametrized tests count once per case: 8 in all
    assert re.match(r"(\d+) passed in", summary) and int(summary.split()[0]) >= len(END_TO_END), summary
