"""`--objective tsdae`: the denoising auto-encoder over sentences in stage 1, its saved encoder, and
`--continued_pretraining_objective tsdae` before fine-tuning."""

import json

import pytest
import torch
from conftest import tiny_bert_config
from safetensors.torch import load_file
from test_continued_pretraining import finetune_args
from transformers import AutoModel, BertForMaskedLM

from tlnlp.core.config import FinetuneConfig, PretrainConfig, parse_config
from tlnlp.core.errors import UserInputError
from tlnlp.finetune import main
from tlnlp.models.tsdae import DenoisingAutoEncoderLoss
from tlnlp.pretrain import main as pretrain_main


def masked_batch(tokenizer, rows=4, length=12, deleted_share=0.5):
    torch.manual_seed(3)
    input_ids = torch.randint(5, len(tokenizer), (rows, length))
    input_ids[:, 0], input_ids[:, -1] = tokenizer.cls_token_id, tokenizer.sep_token_id
    labels = torch.full_like(input_ids, -100)
    chosen = torch.rand(rows, length) < deleted_share
    chosen[:, 0] = chosen[:, -1] = False
    labels[chosen] = input_ids[chosen]
    input_ids[chosen] = tokenizer.mask_token_id
    return {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids)}


def test_the_decoder_is_tied_to_the_encoder_causal_and_fed_only_the_sentence_vector(tiny_tokenizer):
    torch.manual_seed(0)
    mlm = BertForMaskedLM(tiny_bert_config(len(tiny_tokenizer)))
    loss = DenoisingAutoEncoderLoss(mlm)
    mlm_params = {id(p) for p in mlm.parameters()}
    new = {id(p) for p in loss.new_parameters}
    # Every decoder parameter is the encoder's or the MLM head's, except the cross-attention.
    for name, param in loss.decoder.named_parameters(remove_duplicate=False):
        assert (id(param) in new) == ("crossattention" in name), name
        assert (id(param) in mlm_params) != (id(param) in new), name
    assert new and all(p.requires_grad for p in loss.new_parameters)

    loss.eval()
    batch = masked_batch(tiny_tokenizer)
    original = torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])
    vector = loss.sentence_vectors(batch["input_ids"], batch["labels"] == -100)
    logits = loss.decoder(input_ids=original, encoder_hidden_states=vector.unsqueeze(1)).logits
    # Causal: changing the last token leaves every earlier position's prediction as it was.
    changed = original.clone()
    changed[:, -2] = (changed[:, -2] + 1) % len(tiny_tokenizer)
    again = loss.decoder(input_ids=changed, encoder_hidden_states=vector.unsqueeze(1)).logits
    assert torch.allclose(logits[:, :-2], again[:, :-2], atol=1e-6)
    assert not torch.allclose(logits[:, -2:], again[:, -2:])
    # The encoder reads only the kept tokens: what stands at a deleted position does not matter.
    scrambled = batch["input_ids"].clone()
    scrambled[batch["labels"] != -100] = 7
    assert torch.allclose(vector, loss.sentence_vectors(scrambled, batch["labels"] == -100), atol=1e-6)

    loss.train()
    out = loss(**batch)
    out.loss.backward()
    # The loss reaches the encoder's lowest layer through the sentence vector and the tied decoder.
    assert mlm.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    # Per-example sums count each text's predicted tokens: all but the first.
    assert out.example_masked.tolist() == [11] * 4
    assert torch.isclose(out.example_loss_sum.sum() / out.example_masked.sum(), out.loss)


def test_the_head_runs_on_counted_positions_only_and_gives_the_full_decoders_loss(tiny_tokenizer):
    torch.manual_seed(0)
    loss = DenoisingAutoEncoderLoss(BertForMaskedLM(tiny_bert_config(len(tiny_tokenizer)))).eval()
    batch = masked_batch(tiny_tokenizer)
    batch["attention_mask"][1:, 8:] = 0  # padding: three texts of 8 tokens beside one of 12
    batch["labels"][batch["attention_mask"] == 0] = -100
    seen = []
    hook = loss.decoder.cls.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    out = loss(**batch)
    hook.remove()
    assert seen == [11 + 3 * 7]  # the head's rows: each text's predicted tokens, no padding, no last position
    # The same loss from the decoder's logits at every position, selected afterwards.
    original = torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])
    vector = loss.sentence_vectors(batch["input_ids"], batch["attention_mask"].bool() & (batch["labels"] == -100))
    logits = loss.decoder(input_ids=original, attention_mask=batch["attention_mask"],
                          encoder_hidden_states=vector.unsqueeze(1)).logits
    selected = batch["attention_mask"][:, 1:].bool()
    full = torch.nn.functional.cross_entropy(logits[:, :-1][selected], original[:, 1:][selected])
    assert torch.allclose(out.loss, full, atol=1e-6)
    assert out.example_masked.tolist() == [11, 7, 7, 7]


def test_tsdae_stage1_saves_an_encoder_that_stage2_loads(tmp_path, headless_dir, corpus_file, cache_dir):
    out = tmp_path / "tsdae"
    results = pretrain_main(parse_config(PretrainConfig, [
        "--model_name_or_path", str(headless_dir), "--objective", "tsdae", "--train_file", str(corpus_file),
        "--line_by_line", "--max_seq_length", "32", "--per_device_train_batch_size", "8", "--max_train_steps", "12",
        "--head_warmup_steps", "4", "--learning_rate", "1e-3", "--mixed_precision", "no", "--cache_dir",
        str(cache_dir), "--output_dir", str(out)]))
    assert results["objective"] == "tsdae" and results["eval_perplexity"] > 1
    assert results["head_warmup_steps"] == 4
    config = (out / "training_config.yaml").read_text()
    assert "mlm_probability: 0.6" in config  # TSDAE's deletion ratio, filled in as the default
    # The encoder alone is saved (no decoder, no head), and loads with the stock Auto class.
    saved = load_file(str(out / "model.safetensors"))
    assert not any("crossattention" in k or k.startswith("cls.") for k in saved)
    encoder = AutoModel.from_pretrained(out)
    original = load_file(str(headless_dir / "model.safetensors"))
    assert set(original) - {k for k in original if k.startswith("pooler.")} <= set(saved)
    assert not torch.equal(encoder.embeddings.word_embeddings.weight, original["embeddings.word_embeddings.weight"])
    card = (out / "README.md").read_text()
    assert "TSDAE" in card and "Deletion: 60%" in card


def test_tsdae_is_refused_for_an_architecture_without_a_decoder(tmp_path, corpus_file, cache_dir):
    with pytest.raises(UserInputError, match="no causal-LM decoder for 'modernbert'"):
        pretrain_main(parse_config(PretrainConfig, [
            "--objective", "tsdae", "--architecture", "modernbert", "--model_size", "tiny", "--train_file",
            str(corpus_file), "--output_dir", str(tmp_path / "out")]))
    assert not (tmp_path / "out").exists()


def test_continued_pretraining_with_tsdae_is_cached_apart_and_recorded(tmp_path, labeled_files, headless_dir, cache_dir):
    results = main(parse_config(FinetuneConfig, finetune_args(
        labeled_files, headless_dir, tmp_path / "tsdae", cache_dir, "--continued_pretraining", "task",
        "--continued_pretraining_objective", "tsdae", "--keep_adapted_encoder", "always")))
    record = results["continued_pretraining"]
    assert record["objective"] == "tsdae" and record["kept"] == "adapted" and not record["reused_from_cache"]
    stage1 = json.loads((tmp_path / "tsdae" / "all_results.json").read_text())["continued_pretraining"]
    assert stage1 == record
    assert "TSDAE" in (tmp_path / "tsdae" / "README.md").read_text()
    # The MLM encoder of the same corpus and options is another one.
    mlm = main(parse_config(FinetuneConfig, finetune_args(
        labeled_files, headless_dir, tmp_path / "mlm", cache_dir, "--continued_pretraining", "task",
        "--keep_adapted_encoder", "always")))["continued_pretraining"]
    assert mlm["objective"] == "mlm" and mlm["adapted_encoder"] != record["adapted_encoder"]
