"""The Hugging Face Hub: model cards and pushes."""
