"""Imports run one way. Every package of melanoma/ sits on a floor; a module imports only from
lower floors (or its own package), so no two packages can import each other:

    0  conventions, config, precision     labels, positive class, normalisation; composing conf/
       metadata                           patient metadata fields and their encoding
    1  models, data, explain               the ground rooms: each imports only floor 0
    2  predict                             Predictor, TTA, export: everything that runs a checkpoint
    3  evaluation                          metrics, calibration, reports (uses predict)
    4  training                            LightningModule, callbacks (runs the report after fit)
    5  serve                               the web demo
    6  cli, train                          entry points
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "melanoma"
FLOORS = {
    "conventions": 0, "config": 0, "precision": 0, "metadata": 0,
    "models": 1, "data": 1, "explain": 1,
    "predict": 2,
    "evaluation": 3,
    "training": 4,
    "serve": 5,
    "cli": 6, "train": 6,
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
    bad.write_text("from melanoma.evaluation.report import evaluate_checkpoint\nimport melanoma.models.vit\n")
    assert _imports(bad) == [("evaluation", 1), ("models", 2)]
    assert FLOORS["evaluation"] >= FLOORS["data"]
