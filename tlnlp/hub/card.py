"""Model cards: YAML metadata the Hub understands, and a body that tells a stranger what the model is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from tlnlp.core.files import CARD_FILE, CONFIG_FILE, RESULTS_FILE
from tlnlp.data import builtin
from tlnlp.models.objectives import get_objective


def _dataset_line(name: str | None, files: list[str]) -> str:
    if name and builtin.is_builtin_dataset(name):
        d = builtin.DATASETS[name]
        return f"`{name}` (built into tlnlp): {d.description} Licence: {d.license}."
    if name:
        return f"[{name}](https://huggingface.co/datasets/{name}) from the Hugging Face Hub."
    return "local files: " + ", ".join(f"`{Path(f).name}`" for f in files if f)


def build_card(output_dir: Path, repo_id: str | None = None) -> ModelCard:
    """The card for a finished tlnlp run, from its all_results.json and training_config.yaml."""
    results = json.loads((output_dir / RESULTS_FILE).read_text())
    cfg = yaml.safe_load((output_dir / CONFIG_FILE).read_text())
    stage = results["stage"]
    name = repo_id or output_dir.name
    dataset = cfg.get("dataset_name")
    adaptation = results.get("continued_pretraining")
    # Continued pretraining before fine-tuning: the base is the checkpoint it started from, whichever encoder was kept.
    base = adaptation["original_encoder"] if adaptation else cfg.get("model_name_or_path")
    if base and builtin.is_builtin_model(base):
        base = "sentence-transformers/all-MiniLM-L6-v2"  # the Hub id of the built-in MiniLM
    if base and Path(base).exists():
        base = None  # a local folder means nothing to a reader on the Hub

    if stage == "pretrain":
        objective = get_objective(results.get("objective", "mlm"))
        task_type, task_name, pipeline_tag = objective.card_task
        metrics = objective.card_metrics(results)
        split = "validation"
    else:
        task_type, task_name, pipeline_tag = "text-classification", "Text classification", "text-classification"
        split = "test" if any(k.startswith("test_") for k in results) else "validation"
        prefix = f"{split[:4] if split == 'test' else 'eval'}_"
        metrics = {k[len(prefix):]: v for k, v in results.items() if k.startswith(prefix) and isinstance(v, float)}
    eval_results = [
        EvalResult(task_type=task_type, task_name=task_name, dataset_type=dataset or "custom",
                   dataset_name=dataset or "custom data", dataset_split=split, metric_type=metric, metric_name=metric,
                   metric_value=round(float(value), 4))
        for metric, value in metrics.items()
    ]
    data = ModelCardData(
        language="en", license=cfg.get("model_license") or "other", library_name="transformers",
        pipeline_tag=pipeline_tag, tags=["tlnlp", "bert", "transfer-learning", stage],
        datasets=[dataset] if dataset and not builtin.is_builtin_dataset(dataset) else None,
        base_model=base if stage == "finetune" or base else None, metrics=list(metrics), model_name=name,
        eval_results=eval_results,
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_body(name, stage, cfg, results, metrics, split)}")


def _adaptation_line(record: dict) -> str:
    kept = f"the {record['kept']} encoder was kept" + (f" (rule: {record['gate_rule']})" if "gate_rule" in record else "")
    if record.get("gate") == "finetune":
        gate = (f"Gate: both encoders fine-tuned alike and compared on {record['gate_examples']} validation "
                f"examples: {record['gate_metric']} original {record['validation_original']:.3f}, adapted "
                f"{record['validation_adapted']:.3f} (difference {record['difference']:+.3f}, standard error "
                f"{record['difference_standard_error']:.3f})")
    else:
        gate = (f"Gate, on {record['gate_labels']} training labels ({record['gate_folds']}-fold cross-validation "
                f"of a logistic regression on frozen mean-pooled features): original "
                f"{record['probe_accuracy_original']:.3f}, adapted {record['probe_accuracy_adapted']:.3f}")
    return (
        f"- Continued pretraining: `{record['original_encoder']}` was first pretrained further ("
        f"{get_objective(record.get('objective', 'mlm')).card_description}, {record['steps']} steps) on "
        f"{record['corpus']}, {record['corpus_texts']:,} texts, never the "
        f"validation or test texts. {gate}; {kept}."
    )


def _body(name: str, stage: str, cfg: dict, results: dict, metrics: dict, split: str) -> str:
    adaptation = results.get("continued_pretraining")
    source = adaptation["original_encoder"] if adaptation else cfg.get("model_name_or_path")
    data = _dataset_line(cfg.get("dataset_name"), [cfg.get("train_file"), cfg.get("validation_file")])
    table = "\n".join(f"| {split} {k} | {v:.4f} |" for k, v in metrics.items())
    lines = [f"# {name}", ""]
    if stage == "pretrain":
        shape = ("architecture from " + cfg["config_name"] if cfg.get("config_name")
                 else f"{cfg.get('architecture', 'bert')} {cfg.get('model_size') or 'tiny'}")
        start = f"continued (domain-adaptive) pretraining of `{source}`" if source else (
            f"pretraining from scratch ({shape}, WordPiece tokenizer trained on the corpus)")
        objective = get_objective(results.get("objective", "mlm"))
        lines += [
            f"A BERT-style encoder trained with {objective.card_description} by [tlnlp](https://pypi.org/project/tlnlp/): "
            f"{start}. Use it as the starting point for fine-tuning on a small labeled set.", "",
            "## Training", "",
            f"- Corpus: {data}",
            f"- {results['optimizer_steps']} optimizer steps, {results.get('train_tokens', 0):,} tokens seen, "
            f"{results['global_batch_size']} sequences per step of up to {cfg.get('max_seq_length') or 'the default'} tokens",
            f"- {objective.chosen_tokens.capitalize()}: {cfg['mlm_probability']:.0%}"
            f"{' (whole words)' if cfg.get('whole_word_mask') else ''}; "
            f"learning rate {cfg['learning_rate']}, {cfg['lr_scheduler_type']} schedule, {cfg['num_warmup_steps']} warm-up steps",
        ]
        use = objective.card_usage(name)
    else:
        frozen = []
        if cfg.get("freeze_embeddings"):
            frozen.append("embeddings")
        if cfg.get("freeze_layers"):
            frozen.append(f"bottom {cfg['freeze_layers']} encoder layers")
        head = cfg.get("head_hidden_sizes") or "none"
        lines += [
            f"A text classifier fine-tuned by [tlnlp](https://pypi.org/project/tlnlp/) from `{source}`"
            f"{' (architecture only: trained from scratch)' if cfg.get('from_scratch') else ''}.", "",
            "## Training", "",
            f"- Data: {data}",
            f"- Task: {results.get('task_type')}; labels: {', '.join(map(str, results.get('label_names', [])))}",
            f"- {results.get('train_set_size')} training examples, {results['optimizer_steps']} optimizer steps "
            f"({results.get('epochs')} epochs), learning rate {cfg['learning_rate']}",
            f"- Head: pooling `{cfg['pooling']}`, hidden layers {head}"
            + (f", learning rate {results['head_learning_rate']:g}" if "head_learning_rate" in results else "")
            + f"; frozen: {', '.join(frozen) or 'nothing'}",
            f"- Trainable parameters: {results.get('trainable_parameters', 0):,} of {results.get('total_parameters', 0):,}",
        ]
        if adaptation:
            lines.append(_adaptation_line(adaptation))
        if results.get("auxiliary_mlm"):
            aux = results["auxiliary_mlm"]
            head = "a new" if aux["head"] == "new" else "the checkpoint's"
            lines.append(
                f"- Auxiliary MLM loss: every training batch also had {aux['corpus']} ({aux['corpus_texts']:,} texts, "
                f"never the validation or test texts) masked, and the loss added their masked-language-model loss "
                f"at weight {aux['weight']:g} through {head} MLM head, which is not part of this model."
            )
        if results.get("pseudo_labeled_rows"):
            lines.append(
                f"- Pseudo-labels: {results['pseudo_labeled_rows']} of the training rows were labeled by a model, not "
                "people (self-training: a teacher fine-tuned on the labels predicted them on unlabeled text, keeping "
                "only confident, class-balanced predictions). The test split was never used to choose them."
            )
        remote = "" if cfg.get("pooling") == "cls" and not cfg.get("head_hidden_sizes") else (
            ", trust_remote_code=True  # or `import tlnlp` first and drop this")
        use = f'classify = pipeline("text-classification", model="{name}"{remote})\nprint(classify("Some text to classify."))'
    lines += [
        "", "## Results", "", "| metric | value |", "|---|---:|", table, "",
        "## How to use", "", "```python", "from transformers import pipeline", "", use, "```", "",
        "## Intended use and limitations", "",
        "Research and prototyping on English text close to the training data. The model was trained on a "
        "small data set: expect lower quality on other domains, and check it on your own data before relying on it. "
        "It inherits the biases of its training text.", "",
        "## Data licences", "", data, "",
    ]
    return "\n".join(lines)


def write_card(output_dir: Path, repo_id: str | None = None) -> Path:
    path = output_dir / CARD_FILE
    build_card(output_dir, repo_id).save(path)
    return path


def card_results(card: ModelCard) -> dict[str, Any]:
    """{metric: value} from a card's model-index, for checks."""
    return {r.metric_type: r.metric_value for r in card.data.eval_results or []}
