"""Recipes built on the stage-2 phases: recipe search, self-training, studies, baselines."""
