"""Stage 1's objectives: one object per objective, found by name in `OBJECTIVES` (`--objective`).

An objective owns what differs between pretraining methods: the checks of its options, how the masks are
drawn, the model whose forward returns its loss, its evaluation, what it saves and what the model card says.
`pretrain.main` asks the objective and never tests which one it has. A third objective is one more class
here and one more entry in `OBJECTIVES` (TSDAE was the third, SimCSE the fourth).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tlnlp.core.errors import UserInputError
from tlnlp.models.modeling import MaskedLMLoss, sub_state_dict


@dataclass
class Built:
    """What an objective hands to the training loop for one run."""

    model: nn.Module  # forward(**masked batch) returns an output with `.loss`
    evaluate: Any  # (accelerator, model, dataloader) -> metrics
    save: Any  # (unwrapped model, folder, state_dict) -> None
    summary: str  # the start-of-run line that names the objective
    # Parameters the objective adds that no checkpoint holds (TSDAE's cross-attention): they learn at the
    # new head's rate, as a random head does.
    new_parameters: list = field(default_factory=list)


class Objective:
    """The interface; each method's docstring says what the run uses it for."""

    name: str
    default_probability = 0.15  # --mlm_probability when not given
    chosen_tokens = "masking"  # what happens to the tokens --mlm_probability chooses, for summaries and cards
    options: tuple[str, ...] = ()  # PretrainConfig fields that only this objective reads (None when unset)
    # Whether the loss reads the MLM head: when not, a checkpoint without one gets no head-only warm-up (it
    # would freeze the encoder while nothing learns) and its missing head is not reported.
    reads_mlm_head = True
    # The model card: the task the Hub lists it under, and the sentence that says how it was trained.
    card_task: tuple[str, str, str]  # (task type, task name, pipeline tag)
    card_description: str

    def check(self, cfg) -> None:
        """Refuse options that do not fit this objective, and fill its defaults, before any work."""

    def masking(self) -> dict[str, float]:
        """Options for transformers' DataCollatorForLanguageModeling beyond the probability."""
        return {}

    def build(self, model: nn.Module, cfg, tokenizer) -> Built:
        """The loss-computing model, evaluation and save for a run that starts from `model` (an MLM model)."""
        raise NotImplementedError

    def finish(self, results: dict[str, Any]) -> None:
        """Add what the objective reports beyond the loop's results (in place)."""

    def card_metrics(self, results: dict[str, Any]) -> dict[str, float]:
        raise NotImplementedError

    def card_usage(self, name: str) -> str:
        raise NotImplementedError

    def quality(self, results: dict[str, Any]) -> str:
        """One phrase for a report: how good the pretrained model is on the validation split."""
        raise NotImplementedError


def evaluate_mlm(accelerator, model, dataloader) -> dict[str, float]:
    """Token-weighted MLM loss and perplexity; per-example sums are gathered, so no tail example counts twice."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    masked = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    with torch.no_grad():
        for batch in dataloader:
            out = model(**batch)
            sums, counts = accelerator.gather_for_metrics((out.example_loss_sum, out.example_masked))
            loss_sum += sums.double().sum()
            masked += counts.double().sum()
    loss = (loss_sum / masked.clamp(min=1)).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "masked_tokens": masked.item()}


def feature_extraction_usage(name: str) -> str:
    """The model card's example for an encoder saved without a head."""
    return f'features = pipeline("feature-extraction", model="{name}")\nprint(len(features("Some text.")[0]))'


class MaskedLanguageModelling(Objective):
    """BERT's objective: predict the masked tokens (80% [MASK], 10% random, 10% kept)."""

    name = "mlm"
    card_task = ("fill-mask", "Masked language modelling", "fill-mask")
    card_description = "masked-language modelling"

    def build(self, model, cfg, tokenizer) -> Built:
        def save(unwrapped: MaskedLMLoss, folder: Path, state_dict: dict) -> None:
            unwrapped.mlm.save_pretrained(folder, state_dict=sub_state_dict(state_dict, "mlm."),
                                          safe_serialization=True)
            tokenizer.save_pretrained(folder)

        # Compiled, the sparse head takes a fixed number of positions per sequence (no graph break); whole-word
        # masking varies the masked count too much for that, so it keeps the boolean selection.
        fixed_slots = cfg.mlm_probability if cfg.torch_compile and not cfg.whole_word_mask else None
        return Built(MaskedLMLoss(model, sparse=cfg.sparse_mlm_head, fixed_slots_for=fixed_slots), evaluate_mlm,
                     save, "mlm")

    def finish(self, results) -> None:
        results["eval_perplexity"] = math.exp(min(results["eval_loss"], 50.0))

    def card_metrics(self, results) -> dict[str, float]:
        return {"perplexity": results["eval_perplexity"], "loss": results["eval_loss"]}

    def card_usage(self, name: str) -> str:
        return f'fill = pipeline("fill-mask", model="{name}")\nprint(fill("Paris is the [MASK] of France."))'

    def quality(self, results) -> str:
        return f"validation perplexity {results['eval_perplexity']:.1f}"


class ReplacedTokenDetectionObjective(Objective):
    """ELECTRA (Clark et al. 2020): a small generator fills the masked positions with its samples and the
    encoder learns, at every token, to tell original from replaced (`tlnlp.models.electra`)."""

    name = "electra"
    options = ("generator_size_fraction", "discriminator_weight")
    card_task = ("feature-extraction", "Replaced-token detection", "feature-extraction")
    card_description = ("ELECTRA's replaced-token detection (a small generator, saved in `generator/`, filled the "
                        "masked positions and this encoder learned to tell original from replaced tokens)")

    def check(self, cfg) -> None:
        if cfg.model_name_or_path:
            raise UserInputError(
                "--objective electra trains a generator and an encoder from scratch; --model_name_or_path continues a "
                "checkpoint, which has no generator to pair it with. Use --objective mlm to continue a checkpoint, or "
                "drop --model_name_or_path and give --model_size or --config_name."
            )
        if cfg.generator_size_fraction is None:
            cfg.generator_size_fraction = 1 / 3
        if not 0 < cfg.generator_size_fraction <= 1:
            raise UserInputError(
                f"--generator_size_fraction must be in (0, 1], got {cfg.generator_size_fraction}: ELECTRA needs a "
                "generator to propose the replacements, and one no larger than the encoder (the paper finds 1/4-1/2 best)."
            )
        if cfg.discriminator_weight is None:
            cfg.discriminator_weight = 50.0
        if cfg.discriminator_weight <= 0:
            raise UserInputError(f"--discriminator_weight must be greater than 0, got {cfg.discriminator_weight}: "
                                 "without it the encoder would not be trained.")

    def masking(self) -> dict[str, float]:
        # The generator sees every chosen token as [MASK]: its samples, not BERT's 10% random tokens, are the
        # replacements the encoder learns to detect.
        return {"mask_replace_prob": 1.0, "random_replace_prob": 0.0}

    def build(self, model, cfg, tokenizer) -> Built:
        from tlnlp.models.electra import ReplacedTokenDetection, evaluate_electra

        rtd = ReplacedTokenDetection(model.config, cfg.generator_size_fraction, cfg.discriminator_weight,
                                     sparse=cfg.sparse_mlm_head)
        summary = (f"electra (generator: {rtd.generator.mlm.config.num_hidden_layers} of "
                   f"{rtd.discriminator.config.num_hidden_layers} layers, discriminator weight "
                   f"{cfg.discriminator_weight:g})")
        return Built(rtd, functools.partial(evaluate_electra, discriminator_weight=cfg.discriminator_weight,
                                            seed=cfg.seed),
                     lambda unwrapped, folder, state_dict: unwrapped.save(folder, state_dict, tokenizer), summary)

    def card_metrics(self, results) -> dict[str, float]:
        return {k: results[f"eval_{k}"] for k in ("discriminator_accuracy", "replaced_recall", "generator_perplexity")}

    def card_usage(self, name: str) -> str:
        return feature_extraction_usage(name)

    def quality(self, results) -> str:
        return f"replaced-token detection accuracy {results['eval_discriminator_accuracy']:.3f}"


class DenoisingAutoEncoderObjective(MaskedLanguageModelling):
    """TSDAE (Wang et al. 2021): rebuild each text from the encoder's sentence vector of its tokens with most
    deleted (`tlnlp.models.tsdae`). For continuing a sentence-embedding checkpoint on in-domain text. Its
    loss is evaluated and finished as MLM's: token-weighted cross-entropy, and its perplexity."""

    name = "tsdae"
    default_probability = 0.6  # the paper's deletion ratio
    chosen_tokens = "deletion"
    card_task = ("feature-extraction", "Sentence embedding (TSDAE)", "feature-extraction")
    card_description = ("TSDAE, a denoising auto-encoder over sentences (Wang et al. 2021: this encoder read each "
                        "text with most of its tokens deleted, and a decoder tied to it rebuilt the text from the "
                        "encoder's mean-pooled sentence vector; the decoder is not saved)")

    def check(self, cfg) -> None:
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        from tlnlp.data import builtin

        source = cfg.model_name_or_path and builtin.resolve_model(cfg.model_name_or_path)
        if source or cfg.config_name:
            model_type = AutoConfig.from_pretrained(source or cfg.config_name,
                                                    trust_remote_code=cfg.trust_remote_code).model_type
        else:
            model_type = cfg.architecture
        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise UserInputError(
                f"--objective tsdae rebuilds each text with a decoder of the encoder's own architecture, and "
                f"transformers has no causal-LM decoder for {model_type!r}. Use a BERT-family checkpoint (BERT, "
                "RoBERTa, MiniLM such as minilm-l6), or --objective mlm."
            )

    def masking(self) -> dict[str, float]:
        # The chosen tokens are deleted from the encoder's input; what replaces them there is never read.
        return {"mask_replace_prob": 1.0, "random_replace_prob": 0.0}

    def build(self, model, cfg, tokenizer) -> Built:
        from tlnlp.models.tsdae import DenoisingAutoEncoderLoss

        loss = DenoisingAutoEncoderLoss(model)
        prefix = f"mlm.{model.base_model_prefix}."

        def save(unwrapped: DenoisingAutoEncoderLoss, folder: Path, state_dict: dict) -> None:
            unwrapped.mlm.base_model.save_pretrained(folder, state_dict=sub_state_dict(state_dict, prefix),
                                                     safe_serialization=True)
            tokenizer.save_pretrained(folder)

        summary = f"tsdae ({cfg.mlm_probability:.0%} of the tokens deleted, decoder tied to the encoder)"
        return Built(loss, evaluate_mlm, save, summary, new_parameters=loss.new_parameters)

    def card_metrics(self, results) -> dict[str, float]:
        return {"reconstruction perplexity": results["eval_perplexity"], "loss": results["eval_loss"]}

    def card_usage(self, name: str) -> str:
        return feature_extraction_usage(name)

    def quality(self, results) -> str:
        return f"validation reconstruction perplexity {results['eval_perplexity']:.1f}"


class ContrastiveSentenceObjective(Objective):
    """Unsupervised SimCSE (Gao et al. 2021): two dropout passes over each text must find each other among the
    batch's (`tlnlp.models.simcse`). For continuing a sentence-embedding checkpoint on in-domain text; it
    trains the encoder alone, so the chosen tokens only make validation's second view of each text."""

    name = "simcse"
    chosen_tokens = "masked in validation's second view"
    reads_mlm_head = False
    card_task = ("feature-extraction", "Sentence embedding (SimCSE)", "feature-extraction")
    card_description = ("unsupervised SimCSE (Gao et al. 2021: this encoder embedded each text twice, the passes "
                        "differing by dropout, and learned to find a text's second embedding among the batch's by "
                        "the mean-pooled sentence vector)")

    def check(self, cfg) -> None:
        if not cfg.model_name_or_path:
            raise UserInputError(
                "--objective simcse continues a checkpoint's sentence embeddings: from random weights every text "
                "is alike to it and it has nothing to sharpen. Give --model_name_or_path (minilm-l6, say), or "
                "use --objective mlm from scratch."
            )

    def build(self, model, cfg, tokenizer) -> Built:
        from tlnlp.models.simcse import TEMPERATURE, ContrastiveSentenceLoss, evaluate_contrastive

        loss = ContrastiveSentenceLoss(model)

        def save(unwrapped: ContrastiveSentenceLoss, folder: Path, state_dict: dict) -> None:
            unwrapped.encoder.save_pretrained(folder, state_dict=sub_state_dict(state_dict, "encoder."),
                                              safe_serialization=True)
            tokenizer.save_pretrained(folder)

        summary = f"simcse (two dropout views, in-batch negatives, temperature {TEMPERATURE:g}, mean pooling)"
        return Built(loss, evaluate_contrastive, save, summary)

    def card_metrics(self, results) -> dict[str, float]:
        return {"retrieval accuracy": results["eval_retrieval_accuracy"], "loss": results["eval_loss"]}

    def card_usage(self, name: str) -> str:
        return feature_extraction_usage(name)

    def quality(self, results) -> str:
        return f"validation retrieval accuracy {results['eval_retrieval_accuracy']:.3f}"


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (MaskedLanguageModelling(), ReplacedTokenDetectionObjective(),
                                                        DenoisingAutoEncoderObjective(),
                                                        ContrastiveSentenceObjective())}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise UserInputError(f"Unknown --objective {name!r}; choose one of {', '.join(OBJECTIVES)}.")
    return OBJECTIVES[name]


def checked_objective(cfg) -> Objective:
    """--objective's object, after refusing another objective's options and running its own checks."""
    objective = get_objective(cfg.objective)
    for other in OBJECTIVES.values():
        given = [f"--{name}" for name in other.options if other is not objective and getattr(cfg, name) is not None]
        if given:
            raise UserInputError(f"{' and '.join(given)} only apply to --objective {other.name} (this run is "
                                 f"--objective {objective.name}). Add --objective {other.name} or drop them.")
    if cfg.mlm_probability is None:
        cfg.mlm_probability = objective.default_probability
    objective.check(cfg)
    return objective
