"""Stage 2: fine-tuning as phases, head surgery and freezing, metrics, inference."""
