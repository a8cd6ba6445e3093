"""Data: the built-in data sets and models, loading and tokenizing, streaming."""
