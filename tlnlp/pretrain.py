"""`python -m tlnlp.pretrain`: stage 1, masked-language-model pretraining (tlnlp.stage1.pretrain)."""

import sys

from tlnlp.core.config import PretrainConfig
from tlnlp.stage1.pretrain import pretrain as main

__all__ = ["main"]

if __name__ == "__main__":
    from tlnlp.core.cli import run

    sys.exit(run(main, PretrainConfig))
