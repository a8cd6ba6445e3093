"""tlnlp: BERT-style transfer learning: MLM pretraining, then fine-tuning on a small labeled set."""

# Registers tlnlp's classifier with the transformers Auto classes, so models with a custom head load
# through AutoModelForSequenceClassification and pipeline() without trust_remote_code.
from tlnlp.models import classifier as _classifier  # noqa: F401

__version__ = "0.1.0"
