"""`melanoma evaluate` and `melanoma check-data` compose the training configs (conf/) with
Hydra overrides, exactly as `python train.py` would describe the dataset."""

import json

import pytest
import torch

from melanoma.cli import main
from melanoma.data.synthetic import write_dermmel_layout
from melanoma.evaluation.checkpoint_io import build_classifier, save_classifier_checkpoint
from melanoma.models.classifier import Classifier

KW = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def dermmel(tmp_path_factory):
    root = tmp_path_factory.mktemp("dermmel")
    write_dermmel_layout(root, {"train": 4, "val": 6, "test": 6}, image_size=40, seed=3)
    return root


def test_evaluate_writes_report_and_stores_calibration(dermmel, tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = save_classifier_checkpoint(
        tmp_path / "m.ckpt", build_classifier("vit_tiny", KW, {"dermmel": ["not_melanoma", "melanoma"]}),
        "vit_tiny", KW, image_size=32,
    )
    out = tmp_path / "report"
    rc = main(["evaluate", str(ckpt), "dataset=dermmel", f"dataset.root={dermmel}", "dataset.num_workers=0",
               "dataset.persistent_workers=false", "--out", str(out), "--target-sensitivity", "0.8", "-q"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "sensitivity_at_threshold" in printed and str(out) in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"] == "dermmel" and metrics["n"] == 12 and metrics["val"]["n"] == 12
    assert (out / "predictions.csv").is_file() and (out / "reliability.png").is_file()
    _, meta = Classifier.from_checkpoint(ckpt)
    assert meta["operating_point"]["dermmel"]["target_sensitivity"] == 0.8
    assert meta["calibration"]["dermmel"]["temperature"] == pytest.approx(metrics["temperature"])
    # a checkpoint without a head for the dataset is refused with the heads it has
    assert main(["evaluate", str(ckpt), "dataset=synthetic", f"dataset.root={tmp_path / 'synth'}", "-q"]) == 2
    assert "has no head 'synthetic'" in capsys.readouterr().err


def test_check_data_lists_unreadable_images(dermmel, capsys):
    args = ["check-data", "dataset=dermmel", f"dataset.root={dermmel}", "-q"]
    assert main(args) == 0
    assert "32 of 32 images readable" in capsys.readouterr().err
    bad = dermmel / "DermMel" / "test" / "Melanoma" / "zz_truncated.jpeg"
    good = next((dermmel / "DermMel" / "test" / "Melanoma").glob("*.jpeg"))
    bad.write_bytes(good.read_bytes()[:300])
    try:
        assert main(args) == 1
        captured = capsys.readouterr()
        assert str(bad) in captured.out and "1 unreadable" in captured.err
    finally:
        bad.unlink()


def test_overrides_must_be_hydra_style(capsys):
    assert main(["check-data", "ham10000"]) == 2
    assert "expected Hydra overrides" in capsys.readouterr().err
