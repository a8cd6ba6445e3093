"""Pushing to and pulling from a loopback Hub with the real huggingface_hub client."""

import json
import subprocess
import sys

import huggingface_hub
import pytest
from accelerate.state import AcceleratorState
from conftest import REPO, run_script
from hub_server import FakeHub
from huggingface_hub import ModelCard

import tlnlp.hub.repo
from tlnlp.core.config import FinetuneConfig, parse_config
from tlnlp.finetune import main as finetune_main
from tlnlp.hub.card import card_results
from tlnlp.hub.repo import HubError, push

TOKEN = "hf_tlnlpTestSecret0123456789"
EXPECTED_UPLOAD = {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
                   "all_results.json", "training_config.yaml"}


@pytest.fixture
def hub(monkeypatch, tmp_path):
    server = FakeHub(TOKEN)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
    monkeypatch.setattr(tlnlp.hub.repo, "RETRY_DELAYS_S", (0.01, 0.01, 0.01))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no saved login from this machine
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield server
    server.close()


def ft_args(model_dir, files, out, cache_dir, *extra):
    return ["--model_name_or_path", str(model_dir), "--train_file", str(files["train"]), "--validation_file",
            str(files["validation"]), "--test_file", str(files["test"]), "--output_dir", str(out), "--cache_dir",
            str(cache_dir), "--per_device_train_batch_size", "16", "--learning_rate", "3e-3", "--num_train_epochs", "2",
            "--max_seq_length", "48", "--seed", "1", "--min_train_steps", "0", *extra]


def test_train_push_pull_predict(hub, tiny_mlm_dir, labeled_files, tmp_path, cache_dir):
    out = tmp_path / "model"
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf_home")}
    done = run_script("finetune_cls.py", ft_args(tiny_mlm_dir, labeled_files, out, cache_dir, "--push_to_hub",
                                                 "--hub_model_id", "tester/tiny-topics", "--hub_token", TOKEN,
                                                 "--checkpointing_steps", "epoch"), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    files = hub.repos["tester/tiny-topics"]
    assert set(files) == EXPECTED_UPLOAD  # exactly the final model: no checkpoints, optimizer state or logs
    assert (out / "checkpoints").is_dir()  # ... although they exist locally

    # The token is a secret: not in the logs, any written file, or anything uploaded.
    assert TOKEN not in done.stdout + done.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert all(TOKEN.encode() not in content for content in files.values())

    card = ModelCard(files["README.md"].decode())
    results = json.loads(files["all_results.json"])
    assert card.data.pipeline_tag == "text-classification" and card.data.library_name == "transformers"
    for metric, value in card_results(card).items():
        assert value == pytest.approx(results[f"test_{metric}"], abs=1e-4)
    assert set(card_results(card)) == {"accuracy", "macro_f1", "mcc"}

    texts = [json.loads(line)["text"] for line in (out / "test_predictions.jsonl").read_text().splitlines()]
    pull = (
        "import json, sys\nfrom transformers import AutoModelForSequenceClassification, pipeline\n"
        "AutoModelForSequenceClassification.from_pretrained('tester/tiny-topics')\n"
        "texts = json.loads(sys.argv[2])\n"
        "for model in ('tester/tiny-topics', sys.argv[1]):\n"
        "    out = pipeline('text-classification', model=model, top_k=None)(texts, truncation=True, max_length=48)\n"
        "    print(json.dumps([{r['label']: round(r['score'], 6) for r in row} for row in out]))\n"
    )
    pulled = subprocess.run([sys.executable, "-c", pull, str(out), json.dumps(texts)], capture_output=True, text=True,
                            env={**env, "PATH": "/usr/bin:/bin"}, cwd=REPO)
    assert pulled.returncode == 0, pulled.stderr[-3000:]
    from_hub, local = (json.loads(line) for line in pulled.stdout.strip().splitlines()[-2:])
    assert from_hub == local


def test_transient_failure_is_retried(hub, tmp_path):
    folder = _finished_run(tmp_path)
    hub.failures[r"/commit/"] = [500, 503]
    push(folder, "tester/retried", TOKEN)
    assert [m for m, p in hub.requests if p.endswith("/commit/main")] == ["POST"] * 3
    assert "model.safetensors" in hub.repos["tester/retried"]


def test_rejected_token_gives_a_clear_error(hub, tmp_path):
    folder = _finished_run(tmp_path)
    with pytest.raises(HubError, match=r"HTTP 401\): the token was rejected: check --hub_token / HF_TOKEN"):
        push(folder, "tester/denied", "hf_wrong")
    with pytest.raises(HubError, match="needs a token with write access"):
        push(folder, "tester/denied", None)
    hub.failures[r"/repos/create"] = [403]
    with pytest.raises(HubError, match="may not write to 'someone-else/x'"):
        push(folder, "someone-else/x", TOKEN)
    with pytest.raises(HubError, match="is not a valid repo id"):
        push(folder, "bad//id", TOKEN)
    assert (folder / "model.safetensors").exists()


def test_hub_failure_aborts_before_training(hub, tiny_mlm_dir, labeled_files, tmp_path, cache_dir, caplog):
    out = tmp_path / "never"
    AcceleratorState._reset_state(reset_partial_state=True)
    cfg = parse_config(FinetuneConfig, ft_args(tiny_mlm_dir, labeled_files, out, cache_dir, "--push_to_hub",
                                               "--hub_model_id", "tester/x", "--hub_token", "hf_wrong"))
    with pytest.raises(HubError, match="token was rejected.*Nothing was trained"):
        finetune_main(cfg)
    assert not out.exists()
    assert "Running training" not in caplog.text
    # Self-training checks the Hub before its teacher, not after the rounds.
    unlabeled = tmp_path / "unlabeled.txt"
    unlabeled.write_text("a text about rivers and hills\nanother text about numbers\n")
    AcceleratorState._reset_state(reset_partial_state=True)
    cfg = parse_config(FinetuneConfig, ft_args(tiny_mlm_dir, labeled_files, out, cache_dir, "--push_to_hub",
                                               "--hub_model_id", "tester/x", "--hub_token", "hf_wrong",
                                               "--unlabeled_file", str(unlabeled)))
    with pytest.raises(HubError, match="token was rejected.*Nothing was trained"):
        finetune_main(cfg)
    assert not (out / "self_training" / "round0").exists() and "Running training" not in caplog.text


def test_self_training_pushes_the_kept_round_once(hub, tiny_mlm_dir, labeled_files, tmp_path, cache_dir):
    out = tmp_path / "self-trained"
    unlabeled = tmp_path / "unlabeled.txt"
    unlabeled.write_text("\n".join(f"text {i} about rivers, hills and numbers" for i in range(50)) + "\n")
    AcceleratorState._reset_state(reset_partial_state=True)
    results = finetune_main(parse_config(FinetuneConfig, ft_args(
        tiny_mlm_dir, labeled_files, out, cache_dir, "--push_to_hub", "--hub_model_id", "tester/self-trained",
        "--hub_token", TOKEN, "--unlabeled_file", str(unlabeled), "--pseudo_label_precision", "0.5")))
    files = hub.repos["tester/self-trained"]
    assert set(files) == EXPECTED_UPLOAD and len(hub.repos) == 1  # one repo: the rounds are not pushed
    kept = results["self_training"]["kept_round"]
    assert files["model.safetensors"] == (out / "self_training" / f"round{kept}" / "model.safetensors").read_bytes()
    assert json.loads(files["all_results.json"])["self_training"]["kept_round"] == kept


def test_predict_script(tmp_path, tiny_mlm_dir, labeled_files, cache_dir):
    out = tmp_path / "model"
    AcceleratorState._reset_state(reset_partial_state=True)
    finetune_main(parse_config(FinetuneConfig, ft_args(tiny_mlm_dir, labeled_files, out, cache_dir)))
    predictions = tmp_path / "predictions.jsonl"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "predict.py"), "--model", str(out), "--input",
                           str(labeled_files["test"]), "--output", str(predictions)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    reference = [json.loads(line) for line in (out / "test_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == len(reference) == 60
    assert [r["label"] for r in rows] == [r["label"] for r in reference]
    assert set(rows[0]["probabilities"]) == {"music", "science", "sports"}


def _finished_run(tmp_path):
    """A minimal finished output folder (weights, config, results) to push."""
    from conftest import tiny_bert_config
    from transformers import BertForMaskedLM

    folder = tmp_path / "finished"
    folder.mkdir()
    BertForMaskedLM(tiny_bert_config(100)).save_pretrained(folder)
    (folder / "all_results.json").write_text(json.dumps({"stage": "pretrain", "eval_loss": 3.0, "eval_perplexity": 20.1,
                                                         "optimizer_steps": 5, "global_batch_size": 8}))
    (folder / "training_config.yaml").write_text("model_name_or_path: null\nmodel_size: tiny\nmlm_probability: 0.15\n"
                                                 "learning_rate: 0.001\nlr_scheduler_type: linear\nnum_warmup_steps: 0\n"
                                                 "max_seq_length: 32\ndataset_name: wiki-leads\n")
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "optimizer.bin").write_bytes(b"state")
    return folder
