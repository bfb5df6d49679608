"""`melanoma evaluate` cannot leak: it rebuilds the split a head was trained on from the
checkpoint, refuses overrides that change it, and evaluates other data only as an external test
set (nothing fitted, the checkpoint untouched)."""

import hashlib
import json
import shutil

import pandas as pd
import pytest

from melanoma.cli import main
from melanoma.models.checkpoint import read_meta
from melanoma.workflows.training_run import run
from helpers import compose_cfg, tiny_dataset_overrides, tiny_model_overrides, tiny_trainer_overrides

FIXTURE = "tests/fixtures/legacy_v1.ckpt"


@pytest.fixture(scope="module")
def kfold_run(ham_root, tmp_path_factory):  # noqa: F811
    """A tiny model trained on fold 1 of a 3-fold HAM10000 split (not the config defaults)."""
    out = tmp_path_factory.mktemp("kfold") / "run"
    overrides = ["dataset=ham10000", "model=vit_tiny", "logger=csv", *tiny_dataset_overrides(ham_root),
                 "dataset.num_folds=3", "dataset.fold=1", "dataset.seed=5",
                 *tiny_model_overrides(), *tiny_trainer_overrides(max_epochs=1)]
    run(compose_cfg(overrides, out))
    return out


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_default_evaluate_rebuilds_the_trained_split(kfold_run, tmp_path, capsys):
    ckpt = shutil.copy(kfold_run / "checkpoints" / "best.ckpt", tmp_path / "best.ckpt")
    out = tmp_path / "report"
    assert main(["evaluate", str(ckpt), "--out", str(out), "-q"]) == 0
    splits = pd.read_csv(kfold_run / "splits.csv")
    predicted = pd.read_csv(out / "predictions.csv")
    assert predicted["path"].tolist() == splits.loc[splits["split"] == "test", "path"].tolist()
    assert predicted["true_label"].tolist() == splits.loc[splits["split"] == "test", "label"].tolist()
    assert {"melanoma_probability", "decision"} <= set(predicted.columns)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == len(predicted) and "auroc" in metrics["ci95"]
    cal = read_meta(ckpt).heads["ham10000"].calibration
    assert cal.fitted_on["split"] == "val" and cal.threshold == pytest.approx(metrics["threshold"])
    printed = capsys.readouterr().out
    assert f"{metrics['auroc']:.3f} [" in printed  # the console shows the interval


@pytest.mark.slow
@pytest.mark.parametrize("override", ["dataset.fold=0", "dataset.num_folds=null", "dataset.seed=42",
                                      "dataset.label_set=dx", "dataset=dermmel"])
def test_an_override_that_changes_the_split_is_refused(kfold_run, tmp_path, override, capsys):
    ckpt = kfold_run / "checkpoints" / "best.ckpt"
    before = _sha(ckpt)
    assert main(["evaluate", str(ckpt), override, "--out", str(tmp_path / "r"), "-q"]) != 0
    err = capsys.readouterr().err
    assert "split" in err and "--external" in err and override.split("=")[0].split(".")[-1] in err
    assert _sha(ckpt) == before and not (tmp_path / "r").exists()


@pytest.mark.slow
def test_data_that_splits_differently_is_refused(kfold_run, ham_root, tmp_path, capsys):  # noqa: F811
    moved = shutil.copytree(ham_root, tmp_path / "HAM10000")
    csv = moved / "HAM10000_metadata.csv"
    table = pd.read_csv(csv)
    table.iloc[:-1].to_csv(csv, index=False)  # one image fewer: another split
    ckpt = kfold_run / "checkpoints" / "best.ckpt"
    assert main(["evaluate", str(ckpt), f"dataset.root={moved}", "--out", str(tmp_path / "r"), "-q"]) != 0
    assert "splits differently" in capsys.readouterr().err
    # the same data moved elsewhere is fine: dataset.root is all it takes
    shutil.copy(ham_root / "HAM10000_metadata.csv", csv)
    assert main(["evaluate", str(shutil.copy(ckpt, tmp_path / "b.ckpt")), f"dataset.root={moved}",
                 "--out", str(tmp_path / "ok"), "-q"]) == 0


@pytest.mark.slow
def test_external_evaluation_maps_labels_and_leaves_the_checkpoint_alone(kfold_run, ph2_flat_root, tmp_path):  # noqa: F811
    ckpt = shutil.copy(kfold_run / "checkpoints" / "best.ckpt", tmp_path / "best.ckpt")
    assert main(["evaluate", str(ckpt), "--out", str(tmp_path / "own"), "-q"]) == 0  # calibrate on its val
    before = _sha(ckpt)
    out = tmp_path / "ext"
    assert main(["evaluate", str(ckpt), "dataset=ph2", f"dataset.root={ph2_flat_root}", "dataset.num_workers=0",
                 "--external", "--head", "ham10000", "--out", str(out), "-q"]) == 0
    assert _sha(ckpt) == before
    metrics = json.loads((out / "metrics.json").read_text())
    predicted = pd.read_csv(out / "predictions.csv")
    images = sorted(str(p) for p in (ph2_flat_root / "images").glob("*.jpg"))
    assert sorted(predicted["path"]) == images and metrics["n"] == len(images) == 15
    assert metrics["external"] and metrics["labels_mapped_to_melanoma_vs_rest"]
    assert metrics["head_class_names"] == ["not_melanoma", "melanoma"]
    assert metrics["dataset_class_names"] == ["common_nevus", "atypical_nevus", "melanoma"]
    is_mel = predicted["true_label"] == "melanoma"
    assert is_mel.sum() == 5 and set(predicted["true_label"]) == {"common_nevus", "atypical_nevus", "melanoma"}
    # the stored operating point is applied as it is
    thr = read_meta(ckpt).heads["ham10000"].calibration.threshold
    assert metrics["threshold"] == thr
    assert ((predicted["melanoma_probability"] >= thr) == (predicted["decision"] == "melanoma")).all()
    # external data is only external when the model never trained on it
    assert main(["evaluate", str(ckpt), "dataset=ham10000", f"dataset.root={kfold_run}", "--external",
                 "--out", str(tmp_path / "x"), "-q"]) != 0


def test_a_checkpoint_from_before_the_contract_still_evaluates(tmp_path, capsys):
    """tests/fixtures/legacy_v1.ckpt: written by main before the checkpoint contract (a 1-epoch
    DermMel run on write_dermmel_layout(root, 8 per class and split, 32 px, seed 5))."""
    from melanoma.data.synthetic import write_dermmel_layout

    meta = read_meta(FIXTURE)
    head = meta.heads["dermmel"]
    assert head.calibration.temperature == pytest.approx(0.28798, abs=1e-5) and head.data.fingerprint
    assert meta.preprocessing.interpolation == "bicubic" and meta.preprocessing.image_size == 32
    # version 1 did not record whether its calibration saw TTA logits: unknown, and predict says so
    assert head.calibration.tta is None
    for tta in (False, True):
        cal, warning = head.calibration_for(tta)
        assert cal is head.calibration and "did not record whether it was fitted on TTA" in warning
    data = write_dermmel_layout(tmp_path / "data", {"train": 8, "val": 8, "test": 8}, image_size=32, seed=5)
    ckpt = shutil.copy(FIXTURE, tmp_path / "old.ckpt")
    assert main(["evaluate", str(ckpt), f"dataset.root={data}", "dataset.num_workers=0",
                 "--out", str(tmp_path / "r"), "-q"]) == 0
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["n"] == 16 and metrics["auroc"] == pytest.approx(0.28125)  # as main reported it
    assert read_meta(ckpt).version == 2  # written back in the new format
    image = str(next(data.rglob("*.jp*g")))
    assert main(["predict", str(FIXTURE), image, "--tta", "-q", "--out", str(tmp_path / "p.csv")]) == 0
    assert "did not record whether it was fitted on TTA" in capsys.readouterr().err
    # once evaluated again, the plain calibration knows it had no TTA
    assert read_meta(ckpt).heads["dermmel"].calibration.tta is False
    assert read_meta(ckpt).heads["dermmel"].calibration_for(False)[1] is None
