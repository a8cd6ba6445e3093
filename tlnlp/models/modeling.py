"""Models: tokenizer training, MLM models from scratch or a checkpoint, and the sparse MLM loss."""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from safetensors import SafetensorError
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertConfig,
    BertTokenizerFast,
    ModernBertConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import ModelOutput

from tlnlp.core.errors import UserInputError
from tlnlp.core.terminal import progress_bars

logger = logging.getLogger(__name__)

# (layers, hidden, heads, feed-forward): the BERT miniatures of Turc et al. 2019, plus BERT-base.
MODEL_SIZES = {
    "tiny": (2, 128, 2, 512),
    "mini": (4, 256, 4, 1024),
    "small": (4, 512, 8, 2048),
    "medium": (8, 512, 8, 2048),
    "base": (12, 768, 12, 3072),
}
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# A stage-1 objective with more than one model marks each in its config.json under this key (the name is kept
# as the first such objective, ELECTRA, wrote it): "discriminator" is the encoder, a helper role is refused
# by stage 2.
MODEL_ROLE = "tlnlp_electra_role"
HELPER_ROLES = ("generator",)
# RoBERTa-style position ids start after the padding index, so two positions are never usable.
POSITION_OFFSET = {"roberta": 2, "xlm-roberta": 2, "camembert": 2}


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' colourful load report: tlnlp checks what was loaded and says it plainly."""
    previous = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(previous)


def train_wordpiece(texts: Iterable[str] | Callable[[], Iterable[str]], vocab_size: int,
                    lowercase: bool = True) -> BertTokenizerFast:
    """Train a BERT WordPiece tokenizer on `texts` (seconds for megabytes of text), the same on every run.

    `texts` is read twice: give a function that returns a fresh iterable (a list also works).

    tokenizers' trainer numbers the "##x" continuation tokens in hash-map order, which changes from process
    to process, and breaks ties between equally frequent merges by those numbers (tokenizers issue #1794):
    two runs on the same text give different vocabularies. So a first, merge-free pass finds which
    continuation tokens the corpus has; the real pass is given them up front, in sorted order, which fixes
    their ids and with them every tie.
    """
    if not callable(texts):
        texts = list(texts)
    read = texts if callable(texts) else lambda: texts
    normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase)

    def wordpiece_tokenizer(vocab: dict[str, int] | None = None) -> Tokenizer:
        tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]") if vocab else models.WordPiece(unk_token="[UNK]"))
        tokenizer.normalizer = normalizer
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece(prefix="##")
        return tokenizer

    alphabet_pass = wordpiece_tokenizer()
    alphabet_pass.train_from_iterator(read(), trainer=trainers.WordPieceTrainer(vocab_size=1, show_progress=False))
    continuations = sorted(token for token in alphabet_pass.get_vocab() if token.startswith("##"))

    trained = wordpiece_tokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + continuations,
                                        show_progress=False)
    trained.train_from_iterator(read(), trainer=trainer)
    # The continuations were passed as special tokens only to fix their ids: rebuild from the learned vocabulary
    # so that only the five real special tokens are treated as such.
    tokenizer = wordpiece_tokenizer(json.loads(trained.to_str())["model"]["vocab"])
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return tokenizer_from_json(tokenizer.to_str(), lowercase)


def tokenizer_from_json(content: str, lowercase: bool = True) -> BertTokenizerFast:
    """A WordPiece tokenizer made by `train_wordpiece`, from its tokenizer.json text."""
    return BertTokenizerFast(
        tokenizer_object=Tokenizer.from_str(content),
        do_lower_case=lowercase,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
    )


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise UserInputError(
            f"Could not load a tokenizer from {name_or_path!r}: {error}. Give a folder with tokenizer files "
            "(tokenizer.json or vocab.txt) or a Hub model id."
        ) from None


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


def load_model_tokenizer(model_source: str | None, tokenizer_name: str | None,
                         trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The model's own tokenizer, or --tokenizer_name, which must then map text to the same ids."""
    tokenizer = load_tokenizer(tokenizer_name or model_source, trust_remote_code)
    if tokenizer_name and model_source and any((Path(model_source) / f).exists() for f in TOKENIZER_FILES):
        own = load_tokenizer(model_source, trust_remote_code).get_vocab()
        other = tokenizer.get_vocab()
        differ = sum(1 for token, i in other.items() if own.get(token) != i)
        if differ or len(own) != len(other):
            raise UserInputError(
                f"The tokenizer from --tokenizer_name {tokenizer_name} belongs to another model: {differ} of its "
                f"{len(other)} tokens have other ids than in the tokenizer saved with {model_source} ({len(own)} "
                "tokens), so they would index the wrong embeddings. Omit --tokenizer_name to use the model's own."
            )
    return tokenizer


def scratch_config(
    tokenizer: PreTrainedTokenizerBase,
    *,
    model_size: str | None,
    config_name: str | None,
    architecture: str = "bert",
    overrides: dict[str, int | None],
    max_seq_length: int,
    trust_remote_code: bool = False,
) -> transformers.PretrainedConfig:
    """The architecture to train from scratch: a config file, or a size preset with explicit overrides."""
    if config_name:
        try:
            config = AutoConfig.from_pretrained(config_name, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as error:
            raise UserInputError(f"Could not load a model config from {config_name!r}: {error}") from None
        config.vocab_size = len(tokenizer)
    else:
        layers, hidden, heads, ffn = MODEL_SIZES[model_size or "tiny"]
        shape = dict(vocab_size=len(tokenizer), num_hidden_layers=layers, hidden_size=hidden,
                     num_attention_heads=heads, max_position_embeddings=max(512, max_seq_length),
                     pad_token_id=tokenizer.pad_token_id)
        if architecture == "modernbert":
            # GeGLU has three feed-forward matrices to BERT's two: 2/3 of the width keeps the parameter count.
            # Every layer attends globally: the sliding window only pays off on sequences far longer than ours.
            config = ModernBertConfig(**shape, intermediate_size=ffn * 2 // 3, global_attn_every_n_layers=1,
                                      cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id,
                                      bos_token_id=None, eos_token_id=None)
        else:
            config = BertConfig(**shape, intermediate_size=ffn)
    for name, value in overrides.items():
        if value is not None:
            setattr(config, name, value)
    if config.hidden_size % config.num_attention_heads:
        raise UserInputError(
            f"--hidden_size {config.hidden_size} must be a multiple of --num_attention_heads {config.num_attention_heads}."
        )
    return config


@dataclass
class LoadReport:
    """What `from_pretrained` took from the checkpoint and what it had to initialise."""

    source: str
    new: list[str]
    dropped: list[str]


def load_mlm_model(name_or_path: str, trust_remote_code: bool = False) -> tuple[PreTrainedModel, LoadReport]:
    """An MLM model from a checkpoint. Missing head weights are initialised; missing encoder weights are an error."""
    try:
        with quiet_transformers():
            model, info = AutoModelForMaskedLM.from_pretrained(
                name_or_path, output_loading_info=True, trust_remote_code=trust_remote_code
            )
    except SafetensorError as error:
        raise UserInputError(
            f"The weights file model.safetensors in {name_or_path!r} is damaged or truncated ({error}). Download or save "
            "the model again."
        ) from None
    except (OSError, ValueError) as error:
        raise UserInputError(
            f"Could not load a model from {name_or_path!r}: {error}. Give a folder with config.json and "
            "model.safetensors, a built-in model name, or a Hub model id."
        ) from None
    head_prefixes = _mlm_head_prefixes(model)
    missing = sorted(info["missing_keys"])
    missing_encoder = [k for k in missing if not k.startswith(head_prefixes)]
    if missing_encoder or info["mismatched_keys"]:
        raise UserInputError(
            f"{name_or_path} lacks encoder weights the model needs: missing {preview(missing_encoder)}"
            f"{'; wrong shape ' + preview(sorted(map(str, info['mismatched_keys']))) if info['mismatched_keys'] else ''}. "
            "Is it the right checkpoint and architecture?"
        )
    return model, LoadReport(name_or_path, missing, sorted(info["unexpected_keys"]))


def require_masked_lm_class(config: transformers.PretrainedConfig, model_name: str, option: str,
                            consequence: str) -> None:
    """Before any work: refuse an architecture for which transformers has no masked-LM class (no MLM head)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING

    if type(config) not in MODEL_FOR_MASKED_LM_MAPPING and not getattr(config, "auto_map", {}).get("AutoModelForMaskedLM"):
        raise UserInputError(
            f"{option}: {model_name} is a {config.model_type!r} model, for which transformers has no "
            f"masked-language-model class (AutoModelForMaskedLM), so {consequence}. Fine-tune it without {option}, "
            "or start from an encoder such as BERT."
        )


def _mlm_head_prefixes(model: PreTrainedModel) -> tuple[str, ...]:
    prefix = model.base_model_prefix + "."
    names = {name.split(".")[0] + "." for name, _ in model.named_parameters() if not name.startswith(prefix)}
    return tuple(sorted(names)) or ("cls.",)


def preview(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_tokenizer_and_length(
    config: transformers.PretrainedConfig, tokenizer: PreTrainedTokenizerBase, max_seq_length: int,
    need_mask: bool = True,
) -> None:
    """Refuse a tokenizer whose ids do not fit the embeddings, and sequences longer than the positions."""
    if len(tokenizer) > config.vocab_size:
        raise UserInputError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's embeddings hold {config.vocab_size}. "
            "The tokenizer belongs to another model: use the model's own tokenizer (omit --tokenizer_name)."
        )
    if need_mask and tokenizer.mask_token is None:
        raise UserInputError("The tokenizer has no mask token, so it cannot be used for masked-language modelling.")
    limit = config.max_position_embeddings - POSITION_OFFSET.get(config.model_type, 0)
    if max_seq_length > limit:
        raise UserInputError(
            f"--max_seq_length {max_seq_length} is longer than the model's {limit} position embeddings. "
            f"Use --max_seq_length {limit} or less."
        )


@torch.no_grad()
def mean_pooled_embeddings(model_dir: str, texts: list[str], max_length: int = 128, batch_size: int = 64,
                           tokenizer_dir: str | None = None, progress: bool = False) -> np.ndarray:
    """One row per text: the encoder's last hidden states averaged over the text's tokens (for
    all-MiniLM-L6-v2, its sentence embedding). Texts are batched by length, so a short text is not padded
    to a long one's length; the rows come back in the order of `texts`."""
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or model_dir)
        model = AutoModel.from_pretrained(model_dir).eval()
    order = np.argsort([len(text) for text in texts], kind="stable")
    rows = np.empty((len(texts), model.config.hidden_size), dtype=np.float32)
    for start in tqdm(range(0, len(texts), batch_size), disable=not (progress and progress_bars()), desc="Embedding",
                      unit="batch"):
        chosen = order[start : start + batch_size]
        batch = tokenizer([texts[i] for i in chosen], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        rows[chosen] = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    return rows


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


@dataclass
class MaskedLMLossOutput(ModelOutput):
    """A typed output: torch.compile rebuilds outputs by their class, and a bare ModelOutput loses `.loss`."""

    loss: torch.Tensor | None = None
    example_loss_sum: torch.Tensor | None = None
    example_masked: torch.Tensor | None = None


def lm_head_names(model: PreTrainedModel) -> tuple[str, ...] | None:
    """The names of a language model's prediction-head modules, in the order they apply (None: not known, so
    the caller computes the model's full logits). They are looked up by name, not stored: a second reference
    would duplicate them in the state dict. BERT and RoBERTa have one head module (`cls`, `lm_head`, masked or
    causal alike); ModernBERT a transform then a decoder."""
    return next(
        (names for names in (("cls",), ("lm_head",), ("head", "decoder")) if all(hasattr(model, n) for n in names)),
        None,
    )


def apply_lm_head(model: PreTrainedModel, head_names: tuple[str, ...], hidden: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits of `hidden` states through `model`'s head modules (`lm_head_names`)."""
    for name in head_names:
        hidden = getattr(model, name)(hidden)
    return hidden


class MaskedLMLoss(nn.Module):
    """Wraps a stock `*ForMaskedLM` model; its forward returns the MLM loss.

    With `sparse=True` the prediction head (transform + vocabulary projection) runs only at the
    masked positions: with 15% masking that is ~1/7 of the head's work, and the head's vocabulary
    projection dominates a small model's cost. The loss equals the full computation's (the loss
    ignores unmasked positions anyway). The wrapped model is saved as is, so stock transformers loads it.

    Also returns the loss summed per example and the number of masked tokens per example, so
    evaluation can weight by tokens and gather exactly across processes.
    """

    def __init__(self, mlm: PreTrainedModel, sparse: bool = True, fixed_slots_for: float | None = None):
        super().__init__()
        self.mlm = mlm
        self.head_names = lm_head_names(mlm)
        self.sparse = sparse and self.head_names is not None
        # Under torch.compile, boolean indexing (a data-dependent shape) breaks the graph. With the masking
        # rate given here, the sparse head gathers a fixed number of positions per sequence instead (BERT's
        # max_predictions_per_seq): the masked ones first, padded with unmasked ones that the loss ignores.
        self.fixed_slots_for = fixed_slots_for if self.sparse else None

    def masked_logits(self, inputs: dict, selected: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits at the `selected` (flattened) positions: (number selected, vocabulary)."""
        if self.sparse:
            hidden = self.mlm.base_model(**inputs).last_hidden_state
            return apply_lm_head(self.mlm, self.head_names, hidden.reshape(-1, hidden.size(-1))[selected])
        return self.mlm(**inputs).logits.view(-1, self.mlm.config.vocab_size)[selected]

    def forward(self, input_ids, labels, attention_mask=None, token_type_ids=None, **_unused) -> MaskedLMLossOutput:
        inputs = model_inputs(input_ids, attention_mask, token_type_ids)
        if self.fixed_slots_for is not None:
            return self._fixed_slots_loss(inputs, labels)
        selected = labels.view(-1) != -100
        logits = self.masked_logits(inputs, selected)
        token_loss = F.cross_entropy(logits.float(), labels.view(-1)[selected], reduction="none")
        loss_sum, masked = per_example_sums(token_loss, selected, labels.shape)
        # A batch with no masked token still touches every parameter, so data-parallel gradient sync agrees.
        loss = token_loss.mean() if token_loss.numel() else logits.sum() * 0.0
        return MaskedLMLossOutput(loss=loss, example_loss_sum=loss_sum, example_masked=masked)


    def _fixed_slots_loss(self, inputs: dict, labels: torch.Tensor) -> MaskedLMLossOutput:
        """The sparse loss with static shapes: `prediction_slots` positions per sequence, masked ones first.

        A sequence with more masked tokens than slots leaves the excess out of the loss, as BERT did; with
        slots at 4 standard deviations above the expected count, about 1 sequence in 30,000 loses any."""
        rows, length = labels.shape
        slots = prediction_slots(length, self.fixed_slots_for)
        masked = labels != -100
        # Masked positions score above every unmasked one; within each group, earlier positions first.
        order = masked.float() * 2 - torch.arange(length, device=labels.device) / length
        positions = order.topk(slots, dim=1).indices
        hidden = self.mlm.base_model(**inputs).last_hidden_state
        logits = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.size(-1)))
        logits = apply_lm_head(self.mlm, self.head_names, logits)
        slot_labels = labels.gather(1, positions)
        token_loss = F.cross_entropy(logits.float().transpose(1, 2), slot_labels, reduction="none")  # 0 where -100
        counted = (slot_labels != -100).sum(1)
        loss = token_loss.sum() / counted.sum().clamp(min=1)
        return MaskedLMLossOutput(loss=loss, example_loss_sum=token_loss.sum(1), example_masked=counted)


def prediction_slots(length: int, masking_rate: float) -> int:
    """Positions per sequence the fixed-shape MLM head scores: the expected masked count plus 4 standard
    deviations (for 128 tokens at 15%: 36 of 128)."""
    mean = length * masking_rate
    return min(length, math.ceil(mean + 4 * math.sqrt(mean * (1 - masking_rate))))


def model_inputs(input_ids, attention_mask=None, token_type_ids=None) -> dict:
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if token_type_ids is not None:
        inputs["token_type_ids"] = token_type_ids
    return inputs


def per_example_sums(values: torch.Tensor, selected: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """`values` (one row per selected flattened position of a `shape` batch; 1-D, or 2-D for several
    quantities at once) summed per example, and the count per example: what evaluation gathers, so no tail
    example counts twice across processes."""
    example_of_position = torch.arange(shape[0], device=values.device).repeat_interleave(shape[1])[selected]
    sums = values.new_zeros((shape[0], *values.shape[1:]), dtype=torch.float32)
    sums.index_add_(0, example_of_position, values.float())
    return sums, torch.bincount(example_of_position, minlength=shape[0])


def layer_stack(base: nn.Module) -> tuple[nn.Module, str] | None:
    """(module, attribute) holding the encoder's layer list: `encoder.layer` in the BERT family
    (`transformer.layer` in DistilBERT), `layers` in ModernBERT."""
    for owner in (getattr(base, "encoder", None), getattr(base, "transformer", None)):
        if isinstance(getattr(owner, "layer", None), nn.ModuleList):
            return owner, "layer"
    if isinstance(getattr(base, "layers", None), nn.ModuleList):
        return base, "layers"
    return None


def encoder_parts(model: PreTrainedModel) -> tuple[nn.Module, list[nn.Module]]:
    """(embeddings, layers bottom to top) of a BERT-family or ModernBERT encoder."""
    base = model.base_model
    embeddings = getattr(base, "embeddings", None)
    stack = layer_stack(base)
    if embeddings is None or stack is None:
        raise UserInputError(
            f"Freezing and layer-wise learning rates need an encoder with embeddings and a layer list "
            f"(BERT family or ModernBERT); {type(base).__name__} has a different layout."
        )
    owner, name = stack
    return embeddings, list(getattr(owner, name))


def sub_state_dict(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of a wrapper's state dict that belong to its submodule `prefix` ('mlm.', 'model.')."""
    return {key.removeprefix(prefix): value for key, value in state_dict.items() if key.startswith(prefix)}


def layer_depths(model: PreTrainedModel) -> dict[str, int]:
    """Depth of each parameter: embeddings 0, encoder layer i -> i+1, everything else (the head) L+1."""
    embeddings, layers = encoder_parts(model)
    depth_of = {id(p): 0 for p in embeddings.parameters()}
    for i, layer in enumerate(layers):
        depth_of.update({id(p): i + 1 for p in layer.parameters()})
    top = len(layers) + 1
    return {name: depth_of.get(id(p), top) for name, p in model.named_parameters()}


def learning_rate_scales(model: PreTrainedModel, decay: float, head_scale: float) -> dict[str, float]:
    """Layer-wise decay: a parameter d layers below the head learns at decay**d of the base rate."""
    depths = layer_depths(model)
    top = max(depths.values())
    return {name: head_scale if depth == top else decay ** (top - depth) for name, depth in depths.items()}
