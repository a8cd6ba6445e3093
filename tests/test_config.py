import pytest

from tlnlp.core.config import HEAD_LR_CAP, HEAD_LR_MULTIPLIER, FinetuneConfig, PretrainConfig, parse_config
from tlnlp.core.errors import UserInputError


def test_yaml_fills_config_and_command_line_wins(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 0.001\nper_device_train_batch_size: 4\nmodel_size: mini\noutput_dir: out\n")
    cfg = parse_config(PretrainConfig, ["--config", str(config), "--per_device_train_batch_size", "2"])
    assert cfg.learning_rate == 0.001
    assert cfg.per_device_train_batch_size == 2
    assert cfg.model_size == "mini"


def test_yaml_list_becomes_head_sizes(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("output_dir: out\nmodel_name_or_path: m\nhead_hidden_sizes: [64, 32]\n")
    assert parse_config(FinetuneConfig, ["--config", str(config)]).head_hidden_sizes_list == [64, 32]


def test_yaml_unknown_key_is_named(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("output_dir: out\nlearning_rte: 0.1\n")
    with pytest.raises(UserInputError, match=r"unknown option\(s\) learning_rte\. Valid options:"):
        parse_config(PretrainConfig, ["--config", str(config)])


def test_yaml_wrong_type(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("output_dir: out\nper_device_train_batch_size: many\n")
    with pytest.raises(UserInputError, match="Invalid command-line options"):
        parse_config(PretrainConfig, ["--config", str(config)])
    assert "invalid int value: 'many'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be greater than 0, got 0"),
        (["--learning_rate", "-1"], "--learning_rate must be greater than 0, got -1.0"),
        (["--max_train_steps", "0"], "--max_train_steps must be greater than 0, got 0"),
        (["--model_size", "giant"], "Invalid command-line options"),
        (["--no_such_flag", "1"], "Unknown option"),
        (["--checkpointing_steps", "often"], "--checkpointing_steps must be a positive integer or 'epoch'"),
        (["--streaming"], "--streaming needs --max_train_steps"),
        (["--mlm_probability", "1.5"], "--mlm_probability must be between 0 and 1"),
    ],
)
def test_bad_pretrain_options(args, message):
    with pytest.raises(UserInputError, match=message.replace("(", r"\(")):
        parse_config(PretrainConfig, ["--output_dir", "out", *args])


def test_output_dir_required():
    with pytest.raises(UserInputError, match="--output_dir is required"):
        parse_config(PretrainConfig, [])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--head_hidden_sizes", "64,abc"], "--head_hidden_sizes must be comma-separated positive integers"),
        (["--freeze_layers", "-1"], "--freeze_layers must be 0 or more"),
        (["--layerwise_lr_decay", "1.5"], r"--layerwise_lr_decay must be in \(0, 1\]"),
        (["--unfreeze_schedule", "sometimes"], "--unfreeze_schedule must be 'epoch' or a positive number"),
    ],
)
def test_bad_finetune_options(args, message):
    with pytest.raises(UserInputError, match=message):
        parse_config(FinetuneConfig, ["--output_dir", "out", "--model_name_or_path", "m", *args])


@pytest.mark.parametrize("args, expected", [
    (["--learning_rate", "5e-5"], HEAD_LR_MULTIPLIER * 5e-5),  # the multiple
    (["--learning_rate", "1e-3"], HEAD_LR_CAP),  # capped
    (["--learning_rate", "5e-2"], 5e-2),  # never below the encoder's rate
    (["--learning_rate", "5e-5", "--head_learning_rate", "7e-5"], 7e-5),  # the flag wins
])
def test_the_heads_default_learning_rate(args, expected):
    assert parse_config(FinetuneConfig, ["--output_dir", "x", *args]).head_lr == pytest.approx(expected)


@pytest.mark.parametrize("args, restores", [
    ([], False),  # the default keeps the last model
    (["--early_stopping_patience", "2"], True),  # early stopping ends past the best: go back to it
    (["--early_stopping_patience", "2", "--restore_best_model", "false"], False),
    (["--restore_best_model", "true"], True),
])
def test_the_best_epoch_is_restored_only_with_early_stopping_or_when_asked(args, restores):
    assert parse_config(FinetuneConfig, ["--output_dir", "x", *args]).restores_best_epoch is restores


def test_mixed_precision_auto_follows_the_launcher_then_the_hardware(monkeypatch):
    from tlnlp.core.precision import resolve_mixed_precision

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("torch.backends.mps.is_available", lambda: False)
    monkeypatch.setattr("torch.cpu._is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr("torch.cpu._is_amx_tile_supported", lambda: False)
    assert resolve_mixed_precision("auto") == "no"  # a CPU that would emulate bf16: fp32
    monkeypatch.setattr("torch.cpu._is_avx512_bf16_supported", lambda: True)
    assert resolve_mixed_precision("auto") == "bf16"  # AVX512-BF16: bf16 autocast
    monkeypatch.setattr("torch.cpu._is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr("torch.cpu._is_amx_tile_supported", lambda: True)
    assert resolve_mixed_precision("auto") == "bf16"  # AMX: the same
    monkeypatch.setattr("torch.cpu._is_amx_tile_supported", lambda: False)
    monkeypatch.delattr("torch.cpu._is_avx512_bf16_supported")
    assert resolve_mixed_precision("auto") == "no"  # a torch without the probe: assume emulation
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.is_bf16_supported", lambda: False)
    assert resolve_mixed_precision("auto") == "no"  # a GPU without bf16: fp32
    monkeypatch.setattr("torch.cuda.is_bf16_supported", lambda: True)
    assert resolve_mixed_precision("auto") == "bf16"  # a GPU with bf16: on by default
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    monkeypatch.setattr("torch.cpu._is_avx512_bf16_supported", lambda: False, raising=False)
    assert resolve_mixed_precision("auto") == "no"  # the GPU is not used: the CPU's own answer
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert resolve_mixed_precision("auto") == "fp16"  # the launcher's explicit choice wins
    assert resolve_mixed_precision("no") == "no"  # and the script's own option wins over both


def test_metric_help_names_the_defaults_the_code_uses():
    """The help once said regression picks by `neg_mse`; the code picks by `mse`, lower is better."""
    import dataclasses

    from tlnlp.stage2.metrics import DEFAULT_BEST, LOWER_IS_BETTER

    text = next(f for f in dataclasses.fields(FinetuneConfig) if f.name == "metric_for_best_model").metadata["help"]
    for metric in DEFAULT_BEST.values():
        assert metric in text
    assert "neg_" not in text
    assert all(f"{metric}, where lower is better" in text for metric in set(DEFAULT_BEST.values()) & LOWER_IS_BETTER)
