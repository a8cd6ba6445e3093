"""`--objective electra`: replaced-token detection in stage 1, and its encoder in stage 2."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from test_finetune import ft_args, surgery
from test_finetune import run_main as run_finetune
from test_pretrain import run_main, tiny_args
from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

from tlnlp.core.config import PretrainConfig, parse_config
from tlnlp.core.errors import UserInputError
from tlnlp.models.electra import ReplacedTokenDetection
from tlnlp.pretrain import main as pretrain_main
from tlnlp.stage2.transfer import HeadSpec


def electra_args(corpus_file, out, cache_dir, *extra):
    return tiny_args(corpus_file, out, cache_dir, "--objective", "electra", "--num_hidden_layers", "3", *extra)


@pytest.fixture(scope="module")
def electra_run(corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("electra") / "run"
    results = run_main(electra_args(corpus_file, out, tmp_path_factory.mktemp("cache"), "--num_train_epochs", "4",
                                    "--eval_steps", "10"))
    return out, results


def test_discriminator_and_generator_learn(electra_run):
    out, results = electra_run
    history = json.loads((out / "eval_history.json").read_text())
    first, last = history[0], history[-1]
    assert last["loss"] < first["loss"] - 1.0, history
    assert last["generator_loss"] < first["generator_loss"] - 0.5, history
    # The discriminator knows more than the replacement rate: its loss is below that rate's binary entropy
    # (its task grows harder as the generator improves, so its own loss need not fall), and it catches
    # replaced tokens, where a constant "original" answer catches none.
    rate = last["replaced_fraction"]
    assert 0 < rate < 0.15
    assert last["discriminator_loss"] < -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate)) - 0.03, history
    assert last["replaced_recall"] > 0.1, history
    assert results["objective"] == "electra" and "eval_discriminator_accuracy" in results


def test_saved_encoder_and_generator_load_with_stock_classes(electra_run):
    out, _ = electra_run
    encoder = AutoModel.from_pretrained(out)
    assert encoder.config.num_hidden_layers == 3 and encoder.config.tlnlp_electra_role == "discriminator"
    generator = AutoModelForMaskedLM.from_pretrained(out / "generator")
    assert generator.config.num_hidden_layers == 1 and generator.config.tlnlp_electra_role == "generator"
    # One token-embedding matrix, shared while training, saved on both sides.
    assert torch.equal(encoder.get_input_embeddings().weight, generator.get_input_embeddings().weight)
    classifier = AutoModelForSequenceClassification.from_pretrained(out, num_labels=2)
    assert torch.equal(classifier.base_model.get_input_embeddings().weight, encoder.get_input_embeddings().weight)
    card = (out / "README.md").read_text()
    assert "replaced-token detection" in card and "feature-extraction" in card


def test_stage2_surgery_takes_the_encoder_and_refuses_the_generator(electra_run):
    out, _ = electra_run
    checkpoint = load_file(out / "model.safetensors")
    for head in (HeadSpec([], None, "gelu", "cls"), HeadSpec([16], None, "gelu", "mean")):
        model, report = surgery(out, head)
        prefix = model.base_model_prefix + "."
        state = model.state_dict()
        assert sorted(report.loaded) == sorted(prefix + key for key in checkpoint)
        for key, value in checkpoint.items():
            assert torch.equal(state[prefix + key], value), key
    with pytest.raises(UserInputError, match=r"is the generator saved by a stage-1 run.*--model_name_or_path "):
        surgery(out / "generator")


def test_finetune_refuses_the_generator_before_writing_anything(electra_run, labeled_files, tmp_path, cache_dir):
    out, _ = electra_run
    target = tmp_path / "never"
    with pytest.raises(UserInputError, match="Fine-tune the encoder instead"):
        run_finetune(ft_args(out / "generator", labeled_files, target, cache_dir))
    assert not target.exists()


def test_generator_is_a_fraction_of_the_layers_and_shares_the_embeddings():
    from transformers import BertConfig

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=6, num_attention_heads=2, intermediate_size=32)
    rtd = ReplacedTokenDetection(config, generator_fraction=1 / 3, discriminator_weight=50.0)
    assert rtd.generator.mlm.config.num_hidden_layers == 2
    shared = rtd.discriminator.get_input_embeddings().weight
    assert rtd.generator.mlm.get_input_embeddings().weight is shared
    assert rtd.generator.mlm.get_output_embeddings().weight is shared
    # Each parameter once: the shared matrix is not counted (or updated) twice.
    names = [name for name, _ in rtd.named_parameters()]
    assert len(names) == len(set(id(p) for p in rtd.parameters()))


@pytest.mark.parametrize(("extra", "message"), [
    (["--generator_size_fraction", "0"], "ELECTRA needs a generator"),
    (["--generator_size_fraction", "1.5"], r"must be in \(0, 1\]"),
    (["--discriminator_weight", "0"], "--discriminator_weight must be greater than 0"),
    (["--model_name_or_path", "minilm-l6", "--model_size", None], "--objective electra trains a generator and an encoder"),
])
def test_electra_options_that_make_no_sense_are_refused(extra, message, tmp_path):
    args = ["--train_file", "c.txt", "--output_dir", str(tmp_path / "o"), "--objective", "electra",
            "--model_size", "tiny"]
    if None in extra:  # drop --model_size: a checkpoint replaces the preset
        args = args[:-2]
        extra = [a for a in extra if a not in ("--model_size", None)]
    with pytest.raises(UserInputError, match=message):
        pretrain_main(parse_config(PretrainConfig, args + extra))  # refused before anything is read or written


def test_electra_options_without_electra_are_refused(tmp_path):
    with pytest.raises(UserInputError, match="--discriminator_weight only apply to --objective electra"):
        pretrain_main(parse_config(PretrainConfig, ["--train_file", "c.txt", "--output_dir", str(tmp_path),
                                                    "--model_size", "tiny", "--discriminator_weight", "10"]))


def test_sampled_replacements_follow_the_generator_distribution():
    from tlnlp.models.electra import sample_tokens

    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3, 0.0]])).expand(20000, -1)
    draws = sample_tokens(logits, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(draws, minlength=4).float() / len(draws)
    assert torch.allclose(frequencies, torch.tensor([0.1, 0.6, 0.3, 0.0]), atol=0.01)
    again = sample_tokens(logits, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
