"""Classify texts with a fine-tuned model. Run `python scripts/predict.py --help`."""

import sys

from tlnlp.predict import main

if __name__ == "__main__":
    sys.exit(main())
