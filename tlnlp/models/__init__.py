"""Models: the MLM wrapper and tokenizers, the classifier with a custom head, ELECTRA, stage 1's objectives."""
