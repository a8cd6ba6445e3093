"""Head surgery, freezing and layer-wise learning rates: turning a pretrained encoder into a classifier."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel

from tlnlp.core.errors import UserInputError
from tlnlp.core.terminal import progress_bars
from tlnlp.models.classifier import TlnlpClassifierConfig, TlnlpForSequenceClassification
from tlnlp.models.modeling import HELPER_ROLES, MODEL_ROLE, encoder_parts, layer_stack, preview, quiet_transformers

logger = logging.getLogger(__name__)

PROBLEM_TYPES = {
    "single_label": "single_label_classification",
    "multi_label": "multi_label_classification",
    "regression": "regression",
}


@dataclass
class HeadSpec:
    hidden_sizes: list[int]
    dropout: float | None
    activation: str
    pooling: str

    @property
    def is_stock(self) -> bool:
        """BERT's own head ([CLS] -> pooler -> linear) is saved as the stock class: it loads anywhere."""
        return not self.hidden_sizes and self.pooling == "cls"


@dataclass
class SurgeryReport:
    source: str
    loaded: list[str]  # parameters taken from the checkpoint
    new: list[str]  # parameters initialised here (the head)
    dropped: list[str]  # checkpoint tensors left out (the MLM head, an old classifier)


def _encoder_config(source: str, trust_remote_code: bool) -> PretrainedConfig:
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise UserInputError(
            f"--model_name_or_path {source!r} is not a model folder, built-in model or reachable Hub id: {error}"
        ) from None
    if isinstance(config, TlnlpClassifierConfig):
        return config.encoder_config()
    role = getattr(config, MODEL_ROLE, None)
    if role in HELPER_ROLES:
        parent = Path(source).parent if Path(source).exists() else "the folder above it"
        raise UserInputError(
            f"--model_name_or_path {source!r} is the {role} saved by a stage-1 run: a helper its objective trained "
            f"(config.json says {MODEL_ROLE}: {role}), not the encoder. Fine-tune the encoder instead: "
            f"--model_name_or_path {parent}"
        )
    return config


def _load_encoder(source: str, trust_remote_code: bool) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """The checkpoint's encoder weights, the encoder keys it lacked, and what it held beyond the encoder."""
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    try:
        with quiet_transformers():
            if isinstance(config, TlnlpClassifierConfig):  # a tlnlp classifier: keep its encoder, drop its head
                model = TlnlpForSequenceClassification.from_pretrained(source)
                head = [f"head.{k}" for k in model.head.state_dict()]
                return model.encoder.state_dict(), [], head
            encoder, info = AutoModel.from_pretrained(source, output_loading_info=True,
                                                      trust_remote_code=trust_remote_code)
    except SafetensorError as error:
        raise UserInputError(
            f"The weights file model.safetensors in {source!r} is damaged or truncated ({error}). Download or save "
            "the model again."
        ) from None
    except (OSError, ValueError, RuntimeError) as error:
        raise UserInputError(
            f"Could not load encoder weights from {source!r}: {error}. A checkpoint saved for another "
            "architecture or size does not fit; check --model_name_or_path."
        ) from None
    if info["mismatched_keys"]:
        raise UserInputError(
            f"{source} holds weights of the wrong shape for its own config: "
            f"{preview(sorted(map(str, info['mismatched_keys'])))}. The weights and config.json do not belong together."
        )
    return encoder.state_dict(), sorted(info["missing_keys"]), sorted(info["unexpected_keys"])


def build_classifier(
    source: str,
    *,
    num_labels: int,
    id2label: dict[int, str],
    task_type: str,
    head: HeadSpec,
    from_scratch: bool = False,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, SurgeryReport]:
    """Drop everything that is not the encoder, attach a new head, and prove the surgery.

    Every encoder weight must come from the checkpoint; only the head (and BERT's pooler, when the
    checkpoint has none) may be new. Anything else is an error, never a silent random initialisation.
    """
    encoder_config = _encoder_config(source, trust_remote_code)
    labels = {"num_labels": num_labels, "id2label": id2label, "label2id": {v: k for k, v in id2label.items()},
              "problem_type": PROBLEM_TYPES[task_type]}
    if head.is_stock:
        config = encoder_config.__class__.from_dict({**encoder_config.to_dict(), **labels})
        if head.dropout is not None:
            config.classifier_dropout = head.dropout
        model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)
    else:
        dropout = head.dropout if head.dropout is not None else getattr(encoder_config, "hidden_dropout_prob", 0.1)
        config = TlnlpClassifierConfig(
            encoder=encoder_config.to_dict(), head_hidden_sizes=head.hidden_sizes, head_dropout=dropout,
            head_activation=head.activation, pooling=head.pooling, **labels,
        )
        model = TlnlpForSequenceClassification(config)

    base = model.base_model
    base_keys = set(base.state_dict())
    prefix = model.base_model_prefix + "."
    head_keys = sorted(f"{k}" for k in model.state_dict() if not k.startswith(prefix))
    if from_scratch:
        return model, SurgeryReport(source + " (architecture only, random weights)", [], sorted(model.state_dict()), [])

    weights, lacked, extra = _load_encoder(source, trust_remote_code)
    usable = {k: v for k, v in weights.items() if k in base_keys and k not in lacked}
    missing_encoder = sorted(k for k in base_keys - set(usable) if not k.startswith("pooler."))
    if missing_encoder:
        raise UserInputError(
            f"{source} lacks encoder weights: {preview(missing_encoder)}. Refusing to initialise them randomly; "
            "is --model_name_or_path the right checkpoint for this architecture?"
        )
    result = base.load_state_dict(usable, strict=False)
    assert not result.unexpected_keys  # `usable` was filtered to the base's own keys
    new_base = sorted(prefix + k for k in result.missing_keys)  # BERT's pooler, when the checkpoint had none
    dropped = sorted(set(extra) | {k for k in weights if k not in base_keys})
    return model, SurgeryReport(source, sorted(prefix + k for k in usable), new_base + head_keys, dropped)


def freeze(model: PreTrainedModel, *, embeddings: bool, layers: int) -> None:
    """Permanently freeze the embeddings and/or the bottom `layers` encoder layers (no grads, no optimizer state)."""
    embedding_module, layer_modules = encoder_parts(model)
    if layers > len(layer_modules):
        raise UserInputError(
            f"--freeze_layers {layers} is more than the encoder's {len(layer_modules)} layers. "
            f"Use at most {len(layer_modules)}."
        )
    frozen = ([embedding_module] if embeddings else []) + layer_modules[:layers]
    for module in frozen:
        module.requires_grad_(False)


class UnfreezeSchedule:
    """Gradual unfreezing (ULMFiT): first only the head trains, then one more encoder layer from the top
    each epoch (or every N optimizer steps); the embeddings come last. Layers frozen for good stay frozen.

    Parameters waiting their turn keep `requires_grad` (so data-parallel training registers them once),
    but their gradients are dropped before each optimizer step: no update, no optimizer state, no decay.
    """

    def __init__(self, model: PreTrainedModel, every: str):
        embeddings, layers = encoder_parts(model)
        units = [*reversed(layers), embeddings]  # the order in which they thaw
        self.units = [[p for p in unit.parameters() if p.requires_grad] for unit in units]
        self.units = [unit for unit in self.units if unit]
        self.every = every
        self.unfrozen = -1

    def trainable_units(self, step: int, epoch: int) -> int:
        thawed = epoch if self.every == "epoch" else step // int(self.every)
        return min(thawed, len(self.units))

    def __call__(self, step: int, epoch: int) -> None:
        count = self.trainable_units(step, epoch)
        if count != self.unfrozen:
            logger.info("Gradual unfreezing: %d of %d encoder units now train (step %d, epoch %d).", count,
                        len(self.units), step, epoch)
            self.unfrozen = count
        for unit in self.units[count:]:
            for param in unit:
                param.grad = None


# ---------------------------------------------------------------------------------------------------
# Frozen-feature caching
# ---------------------------------------------------------------------------------------------------


class _CachedInput(nn.Module):
    """Stands in for the embedding layer: the cached features already are the frozen bottom's output."""

    def forward(self, *args, inputs_embeds: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        return inputs_embeds


class CachedFeatureClassifier(nn.Module):
    """A classifier whose embeddings and bottom `frozen_layers` layers are frozen, trained from their cached
    outputs: the frozen bottom runs once per example (`cache`), not once per example per epoch.

    The frozen part always runs in eval mode (no dropout), so its output is the same every epoch; that is
    the one difference from training without the cache. The wrapped model's own forward does the rest (its
    attention masks, pooling, head and loss): for the duration of a call, its embedding layer is replaced by
    a pass-through and its layer list by the trainable top layers. Its parameters and state dict are
    untouched, so checkpoints and the saved model are those of the plain classifier.
    """

    def __init__(self, model: PreTrainedModel, frozen_layers: int):
        super().__init__()
        self.model = model
        self.frozen_layers = frozen_layers
        embeddings, layers = encoder_parts(model)
        frozen = [embeddings, *layers[:frozen_layers]]
        if any(p.requires_grad for module in frozen for p in module.parameters()):
            raise UserInputError("--cache_frozen_features needs the embeddings and the bottom layers frozen.")
        self._frozen_modules = frozen  # a plain list: already registered under self.model
        self._bottom, self._top = layers[:frozen_layers], layers[frozen_layers:]

    def train(self, mode: bool = True) -> CachedFeatureClassifier:
        super().train(mode)
        for module in self._frozen_modules:
            module.eval()
        return self

    def _run(self, embeddings: nn.Module | None, layers: list[nn.Module], call, final_norm: bool = True):
        base = self.model.base_model
        owner, name = layer_stack(base)
        saved_embeddings, saved_layers = base.embeddings, getattr(owner, name)
        saved_norm = getattr(base, "final_norm", None)  # ModernBERT normalizes after its last layer only
        if embeddings is not None:
            base.embeddings = embeddings
        setattr(owner, name, nn.ModuleList(layers))
        if not final_norm and saved_norm is not None:
            base.final_norm = nn.Identity()
        try:
            return call()
        finally:
            base.embeddings = saved_embeddings
            setattr(owner, name, saved_layers)
            if saved_norm is not None:
                base.final_norm = saved_norm

    @torch.no_grad()
    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **inputs) -> torch.Tensor:
        """The frozen bottom's output (embeddings + `frozen_layers` layers), in eval mode."""
        for module in self._frozen_modules:
            module.eval()
        return self._run(None, self._bottom, lambda: self.model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, **inputs).last_hidden_state, final_norm=False)

    def forward(self, features: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None):
        # Features are cached in fp32; an engine that casts the weights themselves (DeepSpeed bf16) needs
        # inputs of the weights' type. Under autocast the weights stay fp32 and this changes nothing.
        features = features.to(self.model.dtype)
        return self._run(_CachedInput(), self._top, lambda: self.model(
            inputs_embeds=features, attention_mask=attention_mask, labels=labels))

    def cache(self, dataset, batch_size: int, device: torch.device, pad_token_id: int,
              desc: str) -> list[dict[str, torch.Tensor]]:
        """One item per example: its features (unpadded, on the CPU), attention mask and label."""
        lengths = [len(ids) for ids in dataset["input_ids"]]
        order = sorted(range(len(dataset)), key=lambda i: lengths[i])  # little padding while computing
        items: list[dict | None] = [None] * len(dataset)
        for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress_bars()):
            chunk = order[start: start + batch_size]
            rows = dataset.select(chunk)
            width = max(lengths[i] for i in chunk)
            pads = {"input_ids": pad_token_id, "attention_mask": 0, "token_type_ids": 0}
            batch = {key: torch.tensor([list(r) + [pad] * (width - len(r)) for r in rows[key]], device=device)
                     for key, pad in pads.items() if key in rows.column_names}
            hidden = self.features(**batch).float().cpu()
            labels = rows["labels"] if "labels" in rows.column_names else None
            for j, i in enumerate(chunk):
                items[i] = {"features": hidden[j, : lengths[i]].clone(), "attention_mask": torch.ones(lengths[i],
                            dtype=torch.long)}
                if labels is not None:
                    items[i]["labels"] = torch.tensor(labels[j])
        return items


def pad_features(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Collate cached features: pad with zeros (masked out by the attention mask)."""
    batch = {
        "features": nn.utils.rnn.pad_sequence([x["features"] for x in items], batch_first=True),
        "attention_mask": nn.utils.rnn.pad_sequence([x["attention_mask"] for x in items], batch_first=True),
    }
    if "labels" in items[0]:
        batch["labels"] = torch.stack([x["labels"] for x in items])
    return batch
