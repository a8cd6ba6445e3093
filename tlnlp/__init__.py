"""tlnlp: BERT-style transfer learning: MLM pretraining, then fine-tuning on a small labeled set."""

__version__ = "0.1.0"
