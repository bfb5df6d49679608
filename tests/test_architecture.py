"""Imports run one way. Every package of melanoma/ sits on a floor; a module imports only from
lower floors (or its own package), so no two packages can import each other:

    0  conventions, config, precision     labels, positive class, normalisation; composing conf/
       metadata                           patient metadata fields and their encoding
    1  models, data, explain               the ground rooms: each imports only floor 0
    2  predict, evaluation                 running a checkpoint (Predictor, TTA, export); statistics
                                           over arrays (metrics, bootstrap, calibration, figures)
    3  training                            Lightning parts only: LightningModule, callbacks, optimisers
    4  workflows                           one module per verb (training run, evaluate, recalibrate,
                                           summarize), the one report pipeline, dataset rebuilding
    5  serve                               the web page and its API
    6  cli                                 the `melanoma` command (train.py, outside the package,
                                           calls workflows.training_run)
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "melanoma"
FLOORS = {
    "conventions": 0, "config": 0, "precision": 0, "metadata": 0,
    "models": 1, "data": 1, "explain": 1,
    "predict": 2, "evaluation": 2,
    "training": 3,
    "workflows": 4,
    "serve": 5,
    "cli": 6,
}


def _imports(path: Path) -> list[tuple[str, int]]:
    """(imported melanoma package, line) for every absolute `melanoma.X` import in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [(n.split(".")[1], node.lineno) for n in names if n.startswith("melanoma.") and n.count(".") >= 1]
    return found


def _package(path: Path) -> str:
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def test_every_package_has_a_floor():
    packages = {_package(p) for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert packages - set(FLOORS) == set(), "place new packages in FLOORS (and the docstring above)"


def test_imports_run_one_way():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = _package(path)
        if here == "__init__":
            continue
        for there, line in _imports(path):
            if there != here and FLOORS.get(there, 99) >= FLOORS[here]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({here}, floor {FLOORS[here]}) imports "
                             f"melanoma.{there} (floor {FLOORS.get(there)})")
    assert not wrong, "imports against the floor plan:\n" + "\n".join(wrong)


def test_the_rule_catches_a_backward_import(tmp_path):
    """The checker itself can fail: an upward import in a ground room is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("from melanoma.workflows.evaluate import evaluate_checkpoint\nimport melanoma.models.vit\n")
    assert _imports(bad) == [("workflows", 1), ("models", 2)]
    assert FLOORS["workflows"] >= FLOORS["data"]


def test_evaluation_is_statistics_over_arrays():
    """evaluation/ computes on arrays: it neither reads images nor runs a model nor builds data."""
    wrong = []
    for path in sorted((PACKAGE / "evaluation").rglob("*.py")):
        for there, line in _imports(path):
            if there in ("data", "predict", "explain", "training", "workflows"):
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports melanoma.{there}")
    assert not wrong, "\n".join(wrong)


def test_the_training_module_gets_no_run_config():
    """The LightningModule receives what it trains with, not the resolved config (the training
    workflow records the data and the config in the checkpoint)."""
    import inspect

    from melanoma.training.module import LesionClassifier

    assert "config" not in inspect.signature(LesionClassifier).parameters
