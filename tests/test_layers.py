"""The package's shape: imports run one way through the layers, and no function is left without a caller."""

import ast
import re
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "tlnlp"

# Lower layers first. A module may import its own layer and those below, never one above: the data layer
# knows nothing of models, models nothing of the training loop, the loop nothing of either stage, a stage
# nothing of the recipes built on it, and only the commands (tlnlp/*.py) see everything.
LAYERS = [
    ("base", ["core.errors", "core.config", "core.files", "core.terminal"]),
    ("data", ["data"]),
    ("models", ["models"]),
    ("core", ["core", "hub"]),
    ("stages", ["stage1", "stage2"]),
    ("recipes", ["recipes"]),
    ("commands", [""]),
]


def module_name(path: Path) -> str:
    """tlnlp/core/loop.py -> core.loop; tlnlp/finetune.py -> finetune; a package's __init__ -> the package."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__")


def layer_of(module: str) -> int:
    """The first layer whose prefixes name the module ("core.config" before "core"); "" matches top level."""
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix and module.startswith(prefix + ".")) or (not prefix and "." not in module):
                return rank
    raise AssertionError(f"tlnlp/{module} has no layer: add it to LAYERS in tests/test_layers.py")


def tlnlp_imports(path: Path):
    """(imported tlnlp module, line) for every import in the file, at module level or in a function."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tlnlp":
            base = node.module.removeprefix("tlnlp").lstrip(".")
            if base in ("", "core", "data", "models", "hub", "stage1", "stage2", "recipes"):  # a package: its modules
                for alias in node.names:
                    yield ".".join(p for p in (base, alias.name) if p), node.lineno
            else:
                yield base, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("tlnlp."):
                    yield alias.name.removeprefix("tlnlp."), node.lineno


def test_imports_run_from_higher_layers_to_lower_ones():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        for imported, line in tlnlp_imports(path):
            if imported == "__version__":
                continue
            if layer_of(imported) > layer_of(module):
                wrong.append(f"tlnlp/{path.relative_to(PACKAGE)}:{line} ({LAYERS[layer_of(module)][0]}) imports "
                             f"{imported} ({LAYERS[layer_of(imported)][0]})")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_the_layer_test_fails_on_a_wrong_way_import(tmp_path, monkeypatch):
    """The check above can fail: a model module that imports the training loop is caught."""
    fake = tmp_path / "tlnlp"
    (fake / "models").mkdir(parents=True)
    (fake / "models" / "electra.py").write_text("from tlnlp.core.loop import Task\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    try:
        test_imports_run_from_higher_layers_to_lower_ones()
    except AssertionError as error:
        assert "tlnlp/models/electra.py:1 (models) imports core.loop (core)" in str(error)
    else:
        raise AssertionError("a wrong-way import passed the layer check")


def test_every_top_level_function_has_a_caller():
    """A function nothing calls is dead code (as `modeling.save_dir_has_model` was)."""
    sources = {path: path.read_text() for folder in ("tlnlp", "scripts", "benchmarks", "tests")
               for path in (REPO / folder).rglob("*.py") if path.name != "test_layers.py"}
    unused = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.parse(sources[path]).body:
            if isinstance(node, ast.FunctionDef) and node.name != "main":
                uses = sum(len(re.findall(rf"\b{node.name}\b", text)) for text in sources.values())
                if uses < 2:  # the definition itself
                    unused.append(f"tlnlp/{path.relative_to(PACKAGE)}: {node.name}")
    assert not unused, "functions without a caller:\n" + "\n".join(unused)


def test_no_module_imports_another_modules_private_names():
    """A leading underscore means "this module's own" (transfer once imported modeling._preview)."""
    private = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tlnlp"):
                private += [f"tlnlp/{path.relative_to(PACKAGE)}:{node.lineno} imports {node.module}.{a.name}" for a in node.names
                            if a.name.startswith("_") and a.name != "__version__"]
    assert not private, "\n".join(private)
