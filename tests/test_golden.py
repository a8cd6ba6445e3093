"""The golden check (tests/golden.py) as a heavy test: every fixed-seed tiny run hashes as its baseline.

On the CPU type tests/golden.json was recorded on, the baseline is the file; elsewhere golden.py computes it
first from the recorded base commit (a git worktree), so the check means the same on any machine.
"""

import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.heavy
def test_fixed_seed_runs_hash_as_their_baseline():
    done = subprocess.run([sys.executable, str(REPO / "tests" / "golden.py"), "--check"], capture_output=True,
                          text=True, timeout=1200, cwd=REPO)
    if done.returncode == 2:
        pytest.skip(done.stdout[-500:])  # no git history to check the base commit out of
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " 0 differ" in done.stdout, done.stdout[-2000:]
