"""An offline bundle for a machine without a package index or the Hub: a GPU cluster's compute node.

Such nodes usually come with a CUDA torch, transformers, accelerate and huggingface_hub preinstalled, and
lack the rest of what tlnlp imports (`datasets`, `evaluate`, `torchdata` and their `dill`/`multiprocess`).
The bundle carries those as wheels, at the versions this environment runs and tests, for the node's Python,
plus the built-in data sets and tokenizers a run needs, laid out as a `TLNLP_HOME`:

    BUNDLE/wheels/*.whl            pip install --no-index --no-deps --target SITE BUNDLE/wheels/*.whl
    BUNDLE/home/datasets/NAME/     TLNLP_HOME=BUNDLE/home
    BUNDLE/home/models/NAME/       a tokenizer only, unless the model's weights were asked for
    BUNDLE/manifest.json           what is inside, each file's size and SHA-256, and how to use it
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tlnlp.core.errors import UserInputError
from tlnlp.data import builtin

# What tlnlp imports that a typical CUDA image (torch, transformers, accelerate, huggingface_hub, tokenizers,
# safetensors, numpy, pyarrow, pandas, scikit-learn, scipy, matplotlib, pyyaml, tqdm, xxhash, fsspec,
# requests) does not have.
MISSING_ON_GPU_IMAGES = ("datasets", "evaluate", "torchdata", "dill", "multiprocess")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "config.json")
# The machines the bundle travels to; a pure-Python wheel ("none-any") installs on any of them.
LINUX_X86_64 = ("manylinux_2_28_x86_64", "manylinux2014_x86_64")


def pinned(packages: tuple[str, ...]) -> list[str]:
    """Each package at the version installed here: the version this environment's tests ran with."""
    requirements = []
    for name in packages:
        try:
            requirements.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            raise UserInputError(f"{name} is not installed here, so no tested version of it can be bundled. "
                                 "Install tlnlp's dependencies first (`make install`).") from None
    return requirements


def download_wheels(requirements: list[str], folder: Path, python_version: str | None) -> list[Path]:
    """Wheels only, no dependencies (the list is complete on its own), for `python_version` (e.g. "3.12") on
    Linux x86-64, or for this interpreter when it is None."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--dest", str(folder),
               "--retries", "1", "--timeout", "30", *requirements]
    if python_version:
        command += ["--python-version", python_version, "--implementation", "cp"]
        for platform in LINUX_X86_64:
            command += ["--platform", platform]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise UserInputError(f"pip could not download {' '.join(requirements)} for Python "
                             f"{python_version or sys.version.split()[0]} (exit {result.returncode}: "
                             f"{result.stderr.strip()[-600:]}). Run this where a package index answers.")
    wheels = sorted(folder.glob("*.whl"))
    names = {w.name.split("-")[0].lower().replace("_", "-") for w in wheels}
    missing = [r for r in requirements if r.split("==")[0].lower().replace("_", "-") not in names]
    if missing:
        raise UserInputError(f"pip downloaded no wheel for {', '.join(missing)} into {folder}.")
    return wheels


def copy_builtins(home: Path, datasets: tuple[str, ...], tokenizers: tuple[str, ...], models: tuple[str, ...]) -> None:
    """The built-ins, prepared here (fetched once into this machine's cache), copied into a TLNLP_HOME layout."""
    for name in datasets:
        source = Path(next(iter(builtin.dataset_files(name).values()))).parent
        shutil.copytree(source, home / "datasets" / name)
    for name in set(tokenizers) | set(models):
        source = Path(builtin.model_dir(name))
        target = home / "models" / name
        target.mkdir(parents=True)
        keep = [p for p in source.iterdir() if name in models or p.name in (*TOKENIZER_FILES, "COMPLETE")]
        for path in keep:
            shutil.copy2(path, target / path.name)
        if name not in models:
            (target / builtin.TOKENIZER_ONLY).write_text("The bundle carried this model's tokenizer, not its weights.\n")


def build(output: Path, python_version: str | None = None, packages: tuple[str, ...] = MISSING_ON_GPU_IMAGES,
          datasets: tuple[str, ...] = (), tokenizers: tuple[str, ...] = (), models: tuple[str, ...] = ()) -> dict:
    """Fill `output` (made afresh; everything is built in a sibling folder first, so a failure leaves no half
    bundle) and return its manifest."""
    unknown = [n for n in datasets if not builtin.is_builtin_dataset(n)]
    unknown += [n for n in (*tokenizers, *models) if not builtin.is_builtin_model(n)]
    if unknown:
        raise UserInputError(f"Not built-in: {', '.join(unknown)}. `python -m tlnlp.builtin list` names them.")
    requirements = pinned(packages)
    output = output.resolve()
    staging = output.with_name(output.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    wheels = download_wheels(requirements, staging / "wheels", python_version)
    copy_builtins(staging / "home", datasets, tokenizers, models)
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    manifest = {
        "made": time.strftime("%Y-%m-%d %H:%M:%S"),
        "python": python_version or ".".join(map(str, sys.version_info[:2])),
        "requirements": requirements,
        "wheels": [w.name for w in wheels],
        "datasets": list(datasets), "tokenizers": sorted(set(tokenizers) - set(models)), "models": list(models),
        "bytes": sum(p.stat().st_size for p in files),
        "files": {str(p.relative_to(staging)): {"bytes": p.stat().st_size, "sha256": builtin.file_sha256(p)} for p in files},
        "use": ["pip install --no-index --no-deps --target SITE BUNDLE/wheels/*.whl",
                "export PYTHONPATH=SITE:$PYTHONPATH TLNLP_HOME=BUNDLE/home HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1"],
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(output, ignore_errors=True)
    staging.rename(output)
    return manifest


def verify(bundle: Path) -> dict:
    """The bundle's manifest, after checking every file it lists is there with its size and SHA-256."""
    manifest_file = bundle / "manifest.json"
    if not manifest_file.exists():
        raise UserInputError(f"{bundle} is not a tlnlp bundle: it has no manifest.json. Make one with "
                             "`make gpu-bundle` (or `python -m tlnlp.bundle --output DIR`).")
    manifest = json.loads(manifest_file.read_text())
    bad = [name for name, entry in manifest["files"].items()
           if not (bundle / name).is_file() or builtin.file_sha256(bundle / name) != entry["sha256"]]
    if bad:
        raise UserInputError(f"{bundle}: {len(bad)} file(s) missing or changed since the bundle was made "
                             f"({', '.join(bad[:5])}). Copy the bundle again, or make it afresh.")
    return manifest
