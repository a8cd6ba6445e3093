"""The golden check (tests/golden.py) as a heavy test: every fixed-seed tiny run hashes as recorded."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from golden import GOLDEN, cpu_type


@pytest.mark.heavy
def test_fixed_seed_runs_hash_as_recorded():
    recorded = json.loads(GOLDEN.read_text())["cpu"]
    if recorded != cpu_type():
        pytest.skip(f"tests/golden.json was recorded on a {recorded} CPU, this is {cpu_type()} (torch "
                    f"{torch.__version__}): float kernels differ between CPU types")
    done = subprocess.run([sys.executable, str(REPO / "tests" / "golden.py"), "--check"], capture_output=True,
                          text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "45 of 45 hashes match" in done.stdout, done.stdout[-2000:]
