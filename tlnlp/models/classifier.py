"""A pretrained encoder with a configurable classification/regression head.

Used when the head is more than BERT's stock one (hidden layers, mean pooling); the default head is
saved as the stock `*ForSequenceClassification` class instead. This file imports only torch and
transformers: `save_pretrained` copies it next to the weights, so the model also loads without
tlnlp installed, with `trust_remote_code=True`. With tlnlp imported, the class is registered with
the Auto classes and loads with no remote code at all.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}


class TlnlpClassifierConfig(PretrainedConfig):
    model_type = "tlnlp-classifier"

    def __init__(
        self,
        encoder: dict | None = None,
        head_hidden_sizes: list[int] | None = None,
        head_dropout: float = 0.1,
        head_activation: str = "gelu",
        pooling: str = "mean",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.encoder = encoder or {}  # the encoder's own config, as a dict with its model_type
        self.head_hidden_sizes = list(head_hidden_sizes or [])
        self.head_dropout = head_dropout
        self.head_activation = head_activation
        self.pooling = pooling

    def encoder_config(self) -> PretrainedConfig:
        values = dict(self.encoder)
        return AutoConfig.for_model(values.pop("model_type"), **values)


class TlnlpForSequenceClassification(PreTrainedModel):
    config_class = TlnlpClassifierConfig
    base_model_prefix = "encoder"

    def __init__(self, config: TlnlpClassifierConfig):
        super().__init__(config)
        encoder_config = config.encoder_config()
        kwargs = {}
        encoder_class = AutoModel._model_mapping[type(encoder_config)]
        if "add_pooling_layer" in inspect.signature(encoder_class.__init__).parameters:
            kwargs["add_pooling_layer"] = False  # pooling happens in the head
        self.encoder = AutoModel.from_config(encoder_config, **kwargs)
        layers: list[nn.Module] = []
        width = encoder_config.hidden_size
        for size in config.head_hidden_sizes:
            layers += [nn.Dropout(config.head_dropout), nn.Linear(width, size), ACTIVATIONS[config.head_activation]()]
            width = size
        layers += [nn.Dropout(config.head_dropout), nn.Linear(width, config.num_labels)]
        self.head = nn.Sequential(*layers)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(self.config.encoder_config(), "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if self.config.pooling == "cls":
            return hidden[:, 0]
        if attention_mask is None:
            return hidden.mean(dim=1)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, inputs_embeds=None,
                **kwargs) -> SequenceClassifierOutput:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "inputs_embeds": inputs_embeds}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        hidden = self.encoder(**inputs).last_hidden_state
        logits = self.head(self.pool(hidden, attention_mask))
        loss = None
        if labels is not None:
            loss = classification_loss(logits, labels, self.config.problem_type, self.config.num_labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, problem_type: str | None,
                        num_labels: int) -> torch.Tensor:
    if problem_type == "regression":
        return nn.functional.mse_loss(logits.squeeze(-1).float(), labels.float())
    if problem_type == "multi_label_classification":
        return nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float())
    return nn.functional.cross_entropy(logits.float().view(-1, num_labels), labels.view(-1))


AutoConfig.register(TlnlpClassifierConfig.model_type, TlnlpClassifierConfig, exist_ok=True)
AutoModelForSequenceClassification.register(TlnlpClassifierConfig, TlnlpForSequenceClassification, exist_ok=True)
TlnlpClassifierConfig.register_for_auto_class()
TlnlpForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")


def encoder_config(model: PreTrainedModel) -> PretrainedConfig:
    """The encoder's own config of a classifier: a tlnlp head keeps it nested, a stock head is the encoder's."""
    return model.config.encoder_config() if hasattr(model.config, "encoder_config") else model.config
