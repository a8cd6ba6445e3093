"""Stage 1: pretraining with an objective, from scratch or continued from a checkpoint."""
