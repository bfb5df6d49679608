"""End to end through `melanoma evaluate`: a checkpoint that records a class-weighted training
gets the prior-correction candidate, and the stored map is the one reported."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from melanoma.cli import main
from melanoma.data.dermmel import DermMelDataModule
from melanoma.data.synthetic import write_dermmel_layout
from melanoma.evaluation.calibration import prior_offsets
from melanoma.models.checkpoint_io import build_classifier, save_classifier_checkpoint, training_data
from melanoma.models.checkpoint import METHOD_PRIOR_TEMPERATURE, read_meta

KW = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
PRIOR, WEIGHTS = (0.9, 0.1), (1 / 1.8, 1 / 0.2)  # the DataModule's N / (C n_c) for a 1:9 prior


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("dermmel")
    write_dermmel_layout(root, {"train": 2, "val": 20, "test": 20}, image_size=32, seed=5)
    dm = DermMelDataModule(root=root, image_size=32, num_workers=0)
    dm.setup()
    config = {"_target_": "melanoma.data.dermmel.DermMelDataModule", "root": str(root), "num_workers": 0,
              "persistent_workers": False}
    data = dataclasses.replace(training_data(dm, config), prior=PRIOR, class_weights=WEIGHTS)
    torch.manual_seed(0)
    model = build_classifier("vit_tiny", KW, {"dermmel": ["not_melanoma", "melanoma"]})
    with torch.no_grad():  # the weighted loss's shift, planted: log w added to the logits
        model.heads["dermmel"].fc.bias.copy_(torch.tensor(np.log(WEIGHTS), dtype=torch.float32))
    path = tmp_path_factory.mktemp("ckpt") / "weighted.ckpt"
    save_classifier_checkpoint(path, model, "vit_tiny", KW, image_size=32, data={"dermmel": data})
    return path


def test_evaluate_offers_the_prior_correction_and_stores_what_it_reports(ckpt, tmp_path):
    assert read_meta(ckpt).heads["dermmel"].data.reweighted
    out = tmp_path / "report"
    assert main(["evaluate", str(ckpt), "--out", str(out), "--target-sensitivity", "0.8", "-q"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    cand = metrics["calibration_candidates"][METHOD_PRIOR_TEMPERATURE]
    offsets = prior_offsets(PRIOR, WEIGHTS)
    np.testing.assert_allclose(np.array(cand["bias"]) * cand["temperature"], -offsets, atol=1e-9)
    cal = read_meta(ckpt).heads["dermmel"].calibration
    assert cal.method == metrics["calibration"] and list(cal.bias) == pytest.approx(metrics["bias"])
    assert cal.temperature == pytest.approx(metrics["temperature"])
    # the planted shift (every image ~0.9 melanoma on balanced data) is repaired, with intervals
    assert metrics["ece_melanoma_before_calibration"] > 0.3
    assert metrics["ece_melanoma_after_calibration"] < metrics["ece_melanoma_before_calibration"] - 0.2
    lo, hi = metrics["ci95_calibration"]["ece_melanoma_after_calibration"]
    assert lo <= hi and hi < metrics["ece_melanoma_before_calibration"]
    # the stored map reproduces the reported probabilities
    import csv

    rows = list(csv.DictReader((out / "predictions.csv").open()))
    logits = np.array([[float(r["logit_not_melanoma"]), float(r["logit_melanoma"])] for r in rows])
    np.testing.assert_allclose(cal.probabilities(logits)[:, 1], [float(r["melanoma_probability"]) for r in rows],
                               atol=1e-6)


def test_a_legacy_checkpoint_still_loads_without_a_prior():
    from pathlib import Path

    meta = read_meta(Path(__file__).parent / "fixtures" / "legacy_v1.ckpt")
    for rec in meta.heads.values():
        assert rec.data is None or (rec.data.prior is None and not rec.data.reweighted)


def test_the_training_run_records_prior_weights_and_sampler(tmp_path):
    import torch

    from melanoma.workflows.records import training_balance

    write_dermmel_layout(tmp_path, {"train": {"Melanoma": 2, "NotMelanoma": 6}, "val": 1, "test": 1}, image_size=32)
    dm = DermMelDataModule(root=tmp_path, image_size=32, num_workers=0, sampler="balanced")
    dm.setup()
    assert training_balance(dm) == {"prior": [0.75, 0.25], "class_weights": None, "sampler": "balanced"}
    assert training_balance(dm, torch.as_tensor(dm.class_weights()))["class_weights"] == pytest.approx([8 / 12, 8 / 4])
