"""The run's machinery: configuration, errors, the precision policy, checkpoints, the loop, engines, a run's start and end."""
