"""`python -m tlnlp.builtin list|fetch NAME|all`: the built-in data sets and models (tlnlp.data.builtin)."""

import sys

from tlnlp.data.builtin import main

if __name__ == "__main__":
    sys.exit(main())
