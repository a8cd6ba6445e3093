"""Masked-language-model pretraining (stage 1). Run `accelerate launch scripts/pretrain_mlm.py --help`."""

import sys

from tlnlp.core.cli import run
from tlnlp.core.config import PretrainConfig
from tlnlp.pretrain import main

if __name__ == "__main__":
    sys.exit(run(main, PretrainConfig))
