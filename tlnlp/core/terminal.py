"""Whether progress is drawn as bars (a terminal) or written as plain lines (a log file)."""

from __future__ import annotations

import os
import sys

# Without a terminal, the training loop writes a progress line at most this often (seconds).
PROGRESS_LINE_SECONDS = float(os.environ.get("TLNLP_PROGRESS_SECONDS", "60"))


def progress_bars() -> bool:
    """Bars on a terminal only. In a batch job's output file or a CI log every redraw of a bar is kept,
    joined by carriage returns, and the log becomes mostly bar frames that grep cannot read."""
    return sys.stderr.isatty()
