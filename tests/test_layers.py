"""The package's shape: imports run one way through the layers, and no function is left without a caller."""

import ast
import re
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "tlnlp"

# Lower layers first. A module may import its own layer and those below, never one above: the data layer
# knows nothing of models, models nothing of the training loop, the loop nothing of either stage, and a
# stage nothing of the recipes built on it.
LAYERS = [
    ("base", {"errors", "config", "files", "terminal"}),
    ("data", {"builtin", "data", "streaming", "metrics"}),
    ("models", {"modeling", "classifier", "electra", "objectives"}),
    ("core", {"engines", "card", "hub", "outputs", "trainer", "push", "cli"}),
    ("stages", {"pretrain", "finetune", "transfer", "predict", "baselines"}),
    ("recipes", {"search", "self_training", "study"}),
    ("entry", {"__init__"}),
]
# A stage's module imports its recipes inside the function that is the command (`finetune.main`), by design.
COMMAND_IMPORTS = {("finetune", "search"), ("finetune", "self_training")}


def layer_of(module: str) -> int:
    for rank, (_, members) in enumerate(LAYERS):
        if module in members:
            return rank
    raise AssertionError(f"tlnlp/{module}.py has no layer: add it to LAYERS in tests/test_layers.py")


def tlnlp_imports(path: Path):
    """(imported tlnlp module, line, inside a function) for every import in the file."""
    tree = ast.parse(path.read_text())
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    nested = {id(n) for f in functions for n in ast.walk(f)}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tlnlp":
            names = [node.module.split(".")[1]] if "." in node.module else [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("tlnlp.")]
        for name in names:
            yield name, node.lineno, id(node) in nested


def test_imports_run_from_higher_layers_to_lower_ones():
    wrong = []
    for path in sorted(PACKAGE.glob("*.py")):
        module = path.stem
        for imported, line, in_function in tlnlp_imports(path):
            if (module, imported) in COMMAND_IMPORTS and in_function:
                continue
            if layer_of(imported) > layer_of(module):
                wrong.append(f"tlnlp/{path.name}:{line} ({LAYERS[layer_of(module)][0]}) imports {imported} "
                             f"({LAYERS[layer_of(imported)][0]})")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_the_layer_test_fails_on_a_wrong_way_import(tmp_path, monkeypatch):
    """The check above can fail: a model module that imports the training loop is caught."""
    fake = tmp_path / "tlnlp"
    fake.mkdir()
    (fake / "electra.py").write_text("from tlnlp.trainer import Task\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    try:
        test_imports_run_from_higher_layers_to_lower_ones()
    except AssertionError as error:
        assert "tlnlp/electra.py:1 (models) imports trainer (core)" in str(error)
    else:
        raise AssertionError("a wrong-way import passed the layer check")


def test_every_top_level_function_has_a_caller():
    """A function nothing calls is dead code (as `modeling.save_dir_has_model` was)."""
    sources = {path: path.read_text() for folder in ("tlnlp", "scripts", "benchmarks", "tests")
               for path in (REPO / folder).glob("*.py") if path.name != "test_layers.py"}
    unused = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.parse(sources[path]).body:
            if isinstance(node, ast.FunctionDef) and node.name != "main":
                uses = sum(len(re.findall(rf"\b{node.name}\b", text)) for text in sources.values())
                if uses < 2:  # the definition itself
                    unused.append(f"tlnlp/{path.name}: {node.name}")
    assert not unused, "functions without a caller:\n" + "\n".join(unused)


def test_no_module_imports_another_modules_private_names():
    """A leading underscore means "this module's own" (transfer once imported modeling._preview)."""
    private = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tlnlp"):
                private += [f"tlnlp/{path.name}:{node.lineno} imports {node.module}.{a.name}" for a in node.names
                            if a.name.startswith("_") and a.name != "__version__"]
    assert not private, "\n".join(private)
