"""The whole chain on a real Lightning checkpoint: train.run (fit, test, report) -> the report
folder, calibration stored in best.ckpt -> `melanoma predict` and `melanoma export` on it."""

import csv
import json
from pathlib import Path

import pytest
import torch

from melanoma.cli import main
from melanoma.models.classifier import Classifier
from melanoma.workflows.training_run import run
from helpers import compose_cfg, tiny_overrides


@pytest.mark.slow
def test_training_run_writes_report_and_checkpoint_predicts(tiny_dermmel, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    cfg = compose_cfg([*tiny_overrides(tiny_dermmel, max_epochs=1), "evaluate=true"], out)
    run(cfg)
    report = out / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["dataset"] == "dermmel" and metrics["n"] == 16
    for name in ("predictions.csv", "confusion_matrix.png", "roc.png", "reliability.png"):
        assert (report / name).is_file(), name
    test_loop = json.loads((out / "test" / "metrics.json").read_text())
    assert set(test_loop) >= {"test/acc", "test/auroc"} and all(k.startswith("test/") for k in test_loop)
    assert "ci95" in metrics and not set(test_loop) & set(metrics)  # no key means two things
    ckpt = Path(metrics["checkpoint"])
    model, meta = Classifier.from_checkpoint(ckpt)
    cal = meta.heads["dermmel"].calibration
    assert cal.temperature == pytest.approx(metrics["temperature"]) and cal.threshold == pytest.approx(metrics["threshold"])
    assert meta.heads["dermmel"].data.fingerprint == cal.fitted_on["fingerprint"]
    # Lightning's own entries survive the rewrite (resume still works from this file)
    assert {"state_dict", "epoch", "global_step"} <= set(torch.load(ckpt, weights_only=True))

    images = tiny_dermmel / "DermMel" / "test"
    assert main(["predict", str(ckpt), str(images), "--out", str(tmp_path / "p.csv"), "-q"]) == 0
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert len(rows) == 16 and all(r["decision"] in ("melanoma", "not_melanoma") for r in rows)
    assert main(["export", str(ckpt), "--out", str(tmp_path / "m.onnx"), "-q"]) == 0


def test_the_test_loop_and_the_report_agree_on_ranking_metrics(tmp_path):
    """A binary head with temperature scaling (which cannot change a ranking): test/metrics.json
    and report/metrics.json give the same AUROC and AP, although the run trained under bf16
    autocast: the test loop scores at inference precision on the pixels `predict` sees (the
    160 px JPEGs, trained at 32 px, would be decoded in draft mode by a faster path)."""
    from melanoma.data.synthetic import write_dermmel_layout

    write_dermmel_layout(tmp_path / "data", {"train": 8, "val": 8, "test": 40}, image_size=160, seed=7)
    out = tmp_path / "run"
    cfg = compose_cfg([*tiny_overrides(tmp_path / "data", max_epochs=2), "evaluate=true", "trainer.precision=bf16-mixed"],
                      out)
    run(cfg)
    report = json.loads((out / "report" / "metrics.json").read_text())
    test_loop = json.loads((out / "test" / "metrics.json").read_text())
    assert report["calibration"] in ("temperature", "prior+temperature", "none")
    assert test_loop["test/auroc"] == pytest.approx(report["auroc"], abs=1e-6)
    assert test_loop["test/average_precision"] == pytest.approx(report["average_precision"], abs=1e-6)
    assert 0.0 < report["auroc"] < 1.0  # not a degenerate ranking
