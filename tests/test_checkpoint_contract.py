"""The checkpoint contract (melanoma.models.checkpoint): one typed reader/writer of what a
checkpoint means, its calibration arithmetic, and the bound on fitted temperatures."""

import logging

import numpy as np
import pytest
import torch

from melanoma.evaluation.calibration import fit_temperature
from melanoma.models.checkpoint import (
    Calibration,
    CheckpointError,
    CheckpointMeta,
    HeadRecord,
    Preprocessing,
    TrainingData,
    read_meta,
    softmax,
    update_meta,
)

SPEC = {"type": "linear", "in_features": 8, "class_names": ["not_melanoma", "melanoma"], "dropout": 0.0}


def _meta() -> CheckpointMeta:
    data = TrainingData("ham10000", {"_target_": "x.Y", "root": "/d"}, "binary", ("not_melanoma", "melanoma"),
                        {"seed": 3, "num_folds": 5, "fold": 2}, "abc123", {"train": 7, "val": 2, "test": 2})
    head = HeadRecord(SPEC, calibration=Calibration(2.5, threshold=0.4, target_sensitivity=0.95,
                                                    fitted_on={"split": "val", "fingerprint": "abc123"}),
                      calibration_tta=Calibration(2.0, bias=(0.1, -0.1), threshold=0.35, tta=True), data=data)
    return CheckpointMeta("vit_tiny", {"embed_dim": 8}, {"ham10000": head}, "ham10000",
                          Preprocessing(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "box"), config={"seed": 3})


def test_metadata_round_trips_through_a_weights_only_file(tmp_path):
    meta = _meta()
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": {}, "melanoma": meta.to_dict(), "epoch": 4}, path)
    assert read_meta(path) == meta
    assert CheckpointMeta.from_dict(meta.to_dict()).to_dict() == meta.to_dict()


def test_update_meta_changes_only_the_metadata(tmp_path):
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"model.w": torch.arange(3.0)}, "melanoma": _meta().to_dict(), "epoch": 4}, path)
    update_meta(path, lambda m: m.heads["ham10000"].drop_calibration("a reason"))
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["epoch"] == 4 and torch.equal(ckpt["state_dict"]["model.w"], torch.arange(3.0))
    head = read_meta(path).heads["ham10000"]
    assert head.calibration is None and head.calibration_tta is None and head.uncalibrated_reason == "a reason"
    assert head.calibration_for(tta=False)[0] is None and "a reason" in head.calibration_for(tta=False)[1]


def test_newer_metadata_and_bad_records_are_refused(tmp_path):
    d = _meta().to_dict()
    d["version"] = 99
    with pytest.raises(CheckpointError, match="newer"):
        CheckpointMeta.from_dict(d)
    with pytest.raises(CheckpointError, match="PIL resampling"):
        Preprocessing(32, (0.5,) * 3, (0.2,) * 3, "area")  # an OpenCV name, not PIL's
    with pytest.raises(CheckpointError, match="positive"):
        Calibration(temperature=0.0)


@pytest.mark.parametrize("bias", [(), (0.3, -0.2)])
def test_threshold_on_the_raw_scale_gives_the_calibrated_decisions(bias):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (2000, 2))
    cal = Calibration(3.0, bias=bias, threshold=0.37)
    p_cal = cal.probabilities(logits)[:, 1]
    p_raw = softmax(logits)[:, 1]
    t_raw = cal.threshold_on_raw_scale(2, 1)
    away = np.abs(p_cal - cal.threshold) > 1e-9  # exact ties are float noise either way
    assert ((p_raw >= t_raw) == (p_cal >= cal.threshold))[away].all()
    assert 0.1 < ((p_cal >= cal.threshold).mean()) < 0.9
    assert Calibration(3.0, threshold=0.37).threshold_on_raw_scale(3, 2) is None  # no exact map for 3 classes


def test_tta_predictions_fall_back_to_the_plain_record_with_a_warning():
    head = HeadRecord(SPEC, calibration=Calibration(2.5, threshold=0.4))
    cal, warning = head.calibration_for(tta=True)
    assert cal is head.calibration and "without TTA" in warning


def test_the_fitted_temperature_is_bounded(caplog):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 20, (500, 2))  # confident and uninformative: NLL falls as T grows
    labels = rng.integers(0, 2, 500)
    with caplog.at_level(logging.WARNING):
        t = fit_temperature(logits, labels)
    assert t == 20.0 and "outside [0.05, 20]" in caplog.text
    # an ordinary over-confident model is untouched by the bound
    y = rng.integers(0, 2, 500)
    z = np.stack([np.zeros(500), np.where(y == 1, 1.0, -1.0) * 4 + rng.normal(0, 4, 500)], 1)
    assert 0.05 < fit_temperature(z, y) < 20.0


def test_an_in_place_write_refuses_a_file_changed_since_it_was_read(tmp_path):
    """`melanoma evaluate` reads the checkpoint once and writes its calibration back at the end:
    if training (or another command) rewrote the file meanwhile, the newer file is kept."""
    import os

    from helpers import SYNTHETIC, tiny_checkpoint

    from melanoma.models.checkpoint import Checkpoint, CheckpointError

    path = tiny_checkpoint(tmp_path / "m.ckpt", {"d": SYNTHETIC})
    checkpoint = Checkpoint.read(path)
    checkpoint.write()  # unchanged on disk: written
    checkpoint = Checkpoint.read(path)
    os.utime(path, ns=(0, 12345))
    with pytest.raises(CheckpointError, match="changed on disk"):
        checkpoint.write()
    checkpoint.write(tmp_path / "copy.ckpt")  # another file: written
    assert Checkpoint.read(tmp_path / "copy.ckpt").meta.heads.keys() == {"d"}


def test_a_module_trained_without_the_workflows_records_claims_no_seen_set():
    """Fitted outside the training workflow (no TrainingRecords), the checkpoint's seen-set is
    None (not recorded), never an empty list that would read as "checked, nothing seen"."""
    from melanoma.training.module import LesionClassifier

    module = LesionClassifier({"name": "vit_tiny", "kwargs": {"img_size": 16, "patch_size": 8, "embed_dim": 16,
                                                             "depth": 1, "num_heads": 2}}, "d", ["not_melanoma", "melanoma"])
    assert module.meta().seen is None
    module.set_training_records({}, [], {})
    assert module.meta().seen == []
