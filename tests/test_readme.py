"""The README's Python API example runs as written."""

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO


def readme_api_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Python API section should hold one example"
    return blocks[0]


@pytest.mark.heavy  # MiniLM on 200 movie-review sentences, tested on 1,000: about a minute
@pytest.mark.usefixtures("one_thread_subprocesses")
def test_the_readme_api_example_runs_and_writes_a_run(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", readme_api_example()], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    accuracy = float(re.search(r"test accuracy (\d\.\d+)", done.stdout).group(1))
    assert accuracy > 0.6  # better than chance (0.5) on two balanced classes
    run = tmp_path / "runs" / "api"
    for name in ("model.safetensors", "all_results.json", "training_config.yaml", "README.md",
                 "test_predictions.jsonl"):
        assert (run / name).exists(), name
    assert "`movie-sentences` (built into tlnlp)" in (run / "README.md").read_text()
