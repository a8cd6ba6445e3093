"""Fine-tune a pretrained encoder on labeled text (stage 2). Run `accelerate launch scripts/finetune_cls.py --help`."""

import sys

from tlnlp.core.cli import run
from tlnlp.core.config import FinetuneConfig
from tlnlp.finetune import main

if __name__ == "__main__":
    sys.exit(run(main, FinetuneConfig))
