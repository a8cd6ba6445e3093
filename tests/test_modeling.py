import subprocess
import sys

import pytest
import torch
from conftest import tiny_bert_config, tiny_modernbert_config
from transformers import AutoModelForMaskedLM, BertForMaskedLM, BertModel, ModernBertForMaskedLM

from tlnlp.core.errors import UserInputError
from tlnlp.models.modeling import MaskedLMLoss, check_tokenizer_and_length, load_mlm_model


def masked_batch(vocab_size: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab_size, (4, 24), generator=generator)
    labels = torch.full_like(input_ids, -100)
    chosen = torch.rand(input_ids.shape, generator=generator) < 0.15
    labels[chosen] = input_ids[chosen]
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 20:] = 0
    labels[0, 20:] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.mark.parametrize("architecture", ["bert", "modernbert"])
def test_sparse_head_loss_equals_full_loss(architecture):
    torch.manual_seed(0)
    if architecture == "bert":
        model = BertForMaskedLM(tiny_bert_config(300)).eval()
    else:
        model = ModernBertForMaskedLM(tiny_modernbert_config(300)).eval()
    batch = masked_batch(300)
    wrapper = MaskedLMLoss(model, sparse=True)
    assert wrapper.sparse  # the head was found: the sparse path is the one tested
    sparse = wrapper(**batch)
    full = MaskedLMLoss(model, sparse=False)(**batch)
    fixed = MaskedLMLoss(model, sparse=True, fixed_slots_for=0.15)(**batch)
    stock = model(**batch).loss
    for output in (sparse, full, fixed):
        assert torch.allclose(output.loss, stock, atol=1e-5)
        assert torch.allclose(output.example_loss_sum, full.example_loss_sum, atol=1e-4)
        assert torch.equal(output.example_masked, (batch["labels"] != -100).sum(1))
    # Gradients agree too, so training is the same computation.
    sparse.loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    stock = model(**batch).loss
    stock.backward()
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-5)


def test_saved_checkpoint_is_stock_bert(tmp_path):
    torch.manual_seed(0)
    wrapped = MaskedLMLoss(BertForMaskedLM(tiny_bert_config(300)))
    wrapped.mlm.save_pretrained(tmp_path)
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is BertForMaskedLM
    batch = masked_batch(300, seed=1)
    assert torch.allclose(reloaded(**batch).logits, wrapped.mlm.eval()(**batch).logits)


def test_encoder_without_mlm_head_gets_a_new_head(tmp_path):
    torch.manual_seed(0)
    BertModel(tiny_bert_config(300)).save_pretrained(tmp_path)  # like the MiniLM package: no MLM head
    model, report = load_mlm_model(str(tmp_path))
    assert report.new and all(name.startswith("cls.predictions") for name in report.new)
    encoder = BertModel.from_pretrained(tmp_path)
    for name, tensor in encoder.state_dict().items():
        if not name.startswith("pooler"):
            assert torch.equal(model.bert.state_dict()[name], tensor)


def test_checkpoint_missing_encoder_weights_is_an_error(tmp_path):
    BertForMaskedLM(tiny_bert_config(300, layers=1)).save_pretrained(tmp_path)
    config = tiny_bert_config(300, layers=2)
    config.save_pretrained(tmp_path)  # the config now promises a layer the weights lack
    with pytest.raises(UserInputError, match=r"lacks encoder weights the model needs: missing bert\.encoder\.layer\.1"):
        load_mlm_model(str(tmp_path))


def test_tokenizer_vocabulary_must_fit_embeddings(tiny_tokenizer):
    config = tiny_bert_config(50)
    with pytest.raises(UserInputError, match=r"The tokenizer has \d+ tokens but the model's embeddings hold 50"):
        check_tokenizer_and_length(config, tiny_tokenizer, 64)


def test_sequence_length_must_fit_positions(tiny_tokenizer):
    config = tiny_bert_config(len(tiny_tokenizer))
    with pytest.raises(UserInputError, match="--max_seq_length 256 is longer than the model's 128 position"):
        check_tokenizer_and_length(config, tiny_tokenizer, 256)


TRAIN_VOCABULARY = """
import hashlib, json, sys
from tlnlp.data import builtin
from tlnlp.models.modeling import train_wordpiece
with open(builtin.dataset_files("wiki-leads")["train"]) as f:
    texts = [json.loads(line)["text"] for line, _ in zip(f, range(1500))]
tokenizer = train_wordpiece(texts, vocab_size=3000)
print(hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest())
"""


def test_tokenizer_training_gives_the_same_vocabulary_in_two_processes():
    """The stock WordPiece trainer gives a different vocabulary in each process on this text (checked: 5 of 5
    differed), because its hash maps are seeded per process; two processes must agree token for token and id
    for id."""
    digests = [subprocess.run([sys.executable, "-c", TRAIN_VOCABULARY], capture_output=True, text=True, check=True)
               .stdout.strip() for _ in range(2)]
    assert len(digests[0]) == 64 and digests[0] == digests[1]


def test_trained_tokenizer_treats_only_the_five_special_tokens_as_special(tiny_tokenizer):
    """The continuation tokens are given to the trainer as special tokens only to fix their ids."""
    specials = sorted(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    assert sorted(tiny_tokenizer.all_special_tokens) == specials
    assert sorted(token.content for token in tiny_tokenizer.added_tokens_decoder.values()) == specials
    # A continuation token written out in text is split like any other word, not matched as one token.
    assert len(tiny_tokenizer.tokenize("##a")) == 3
    assert tiny_tokenizer.decode(tiny_tokenizer("the data")["input_ids"], skip_special_tokens=True) == "the data"


def test_fixed_slot_head_compiles_without_graph_breaks():
    """The boolean-indexed sparse head has a data-dependent shape, which breaks torch.compile's graph; the
    fixed-slot head (used with --torch_compile) must give one whole graph."""
    torch.manual_seed(0)
    model = ModernBertForMaskedLM(tiny_modernbert_config(300)).eval()
    batch = masked_batch(300)
    breaks = {}
    for name, wrapper in (("boolean", MaskedLMLoss(model, sparse=True)),
                          ("fixed", MaskedLMLoss(model, sparse=True, fixed_slots_for=0.15))):
        torch._dynamo.reset()
        breaks[name] = torch._dynamo.explain(wrapper)(**batch).graph_break_count
    assert breaks["fixed"] == 0 and breaks["boolean"] > 0, breaks


def test_fixed_slots_leave_out_only_the_excess_beyond_the_slots():
    from tlnlp.models.modeling import prediction_slots

    assert prediction_slots(128, 0.15) == 36 and prediction_slots(8, 0.9) == 8
    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_bert_config(300)).eval()
    batch = masked_batch(300)
    batch["labels"][1] = batch["input_ids"][1]  # every token of row 1 masked: more than the slots
    out = MaskedLMLoss(model, sparse=True, fixed_slots_for=0.15)(**batch)
    slots = prediction_slots(24, 0.15)
    assert out.example_masked[1] == slots
    assert torch.equal(out.example_masked[[0, 2, 3]], (batch["labels"][[0, 2, 3]] != -100).sum(1))
