"""`melanoma evaluate` and `melanoma check-data` compose the training configs (conf/) with
Hydra overrides, exactly as `python train.py` would describe the dataset."""

import json

import pytest

from helpers import SYNTHETIC, tiny_checkpoint

from melanoma.cli import main
from melanoma.data.synthetic import write_dermmel_layout
from melanoma.data.dermmel import DermMelDataModule
from melanoma.models.checkpoint_io import training_data
from melanoma.models.checkpoint import read_meta



@pytest.fixture(scope="module")
def dermmel(tmp_path_factory):
    root = tmp_path_factory.mktemp("dermmel")
    write_dermmel_layout(root, {"train": 4, "val": 6, "test": 6}, image_size=40, seed=3)
    return root


def _checkpoint(path, dermmel, with_data=True):
    dm = DermMelDataModule(root=dermmel, image_size=32, num_workers=0)
    dm.setup()
    config = {"_target_": "melanoma.data.dermmel.DermMelDataModule", "root": str(dermmel), "num_workers": 0,
              "persistent_workers": False}
    return tiny_checkpoint(
        path, {"dermmel": SYNTHETIC}, data={"dermmel": training_data(dm, config)} if with_data else None,
    )


def test_evaluate_writes_report_and_stores_calibration(dermmel, tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "m.ckpt", dermmel)
    out = tmp_path / "report"
    rc = main(["evaluate", str(ckpt), "--out", str(out), "--target-sensitivity", "0.8", "-q"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "sensitivity_at_threshold" in printed and str(out) in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"] == "dermmel" and metrics["n"] == 12 and metrics["val"]["n"] == 12
    assert (out / "predictions.csv").is_file() and (out / "reliability.png").is_file()
    cal = read_meta(ckpt).heads["dermmel"].calibration
    assert cal.target_sensitivity == 0.8 and cal.temperature == pytest.approx(metrics["temperature"])
    # another dataset is not the trained split: refused, with the way to test on it
    assert main(["evaluate", str(ckpt), "dataset=synthetic", f"dataset.root={tmp_path / 'synth'}", "-q"]) == 2
    assert "split" in capsys.readouterr().err


def test_evaluate_reads_the_checkpoint_once_and_writes_it_once(dermmel, tmp_path, monkeypatch):
    """`melanoma evaluate CKPT` loads the file once and passes the object down (the Predictor,
    the report); the calibration is written back once, through the checkpoint contract."""
    import torch

    ckpt = _checkpoint(tmp_path / "m.ckpt", dermmel)
    loads, saves = [], []
    real_load, real_save = torch.load, torch.save
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    monkeypatch.setattr(torch, "save", lambda *a, **k: saves.append(a[1]) or real_save(*a, **k))
    assert main(["evaluate", str(ckpt), "--out", str(tmp_path / "a"), "-q"]) == 0
    assert len(loads) == 1 and len(saves) == 1
    monkeypatch.undo()
    assert read_meta(ckpt).heads["dermmel"].calibration is not None
    # --external (a model that records no training data, so dermmel is external to it): one read,
    # and the file is not written
    ckpt = _checkpoint(tmp_path / "n.ckpt", dermmel, with_data=False)
    loads.clear(), saves.clear()
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    monkeypatch.setattr(torch, "save", lambda *a, **k: saves.append(a[1]) or real_save(*a, **k))
    assert main(["evaluate", str(ckpt), "dataset=dermmel", f"dataset.root={dermmel}", "dataset.num_workers=0",
                 "--external", "--out", str(tmp_path / "x"), "-q"]) == 0
    assert len(loads) == 1 and saves == []


def test_the_calibration_records_its_precision_and_predict_says_when_it_differs(dermmel, tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "m.ckpt", dermmel)
    assert main(["evaluate", str(ckpt), "--out", str(tmp_path / "a"), "-q"]) == 0
    assert read_meta(ckpt).heads["dermmel"].calibration.precision == "32-true"  # inference's auto
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["precision"] == "32-true"
    image = str(next(dermmel.rglob("*.jp*g")))
    capsys.readouterr()
    assert main(["predict", str(ckpt), image, "-q"]) == 0
    assert "fitted on" not in capsys.readouterr().err
    assert main(["evaluate", str(ckpt), "--precision", "bf16-mixed", "--out", str(tmp_path / "b"), "-q"]) == 0
    assert read_meta(ckpt).heads["dermmel"].calibration.precision == "bf16-mixed"
    capsys.readouterr()
    out = tmp_path / "p.json"
    assert main(["predict", str(ckpt), image, "-q", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "fitted on bf16-mixed logits and these are 32-true" in err and "--precision bf16-mixed" in err
    assert json.loads(out.read_text())["precision"] == "32-true"
    assert main(["predict", str(ckpt), image, "-q", "--precision", "bf16-mixed"]) == 0
    assert "fitted on" not in capsys.readouterr().err


def test_no_calibration_stores_t1_with_its_own_threshold(dermmel, tmp_path):
    ckpt = _checkpoint(tmp_path / "m.ckpt", dermmel)
    assert main(["evaluate", str(ckpt), "--out", str(tmp_path / "a"), "-q"]) == 0
    assert main(["evaluate", str(ckpt), "--no-calibration", "--out", str(tmp_path / "b"), "-q"]) == 0
    cal = read_meta(ckpt).heads["dermmel"].calibration
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert cal.method == "none" and cal.temperature == 1.0 and cal.threshold == pytest.approx(metrics["threshold"])
    # the threshold was fitted on T=1 probabilities: val sensitivity is the target, not more
    assert metrics["val"]["sensitivity_at_threshold"] >= 0.95


def test_tta_calibration_is_stored_beside_the_plain_one(dermmel, tmp_path):
    ckpt = _checkpoint(tmp_path / "m.ckpt", dermmel)
    assert main(["evaluate", str(ckpt), "--out", str(tmp_path / "a"), "-q"]) == 0
    plain = read_meta(ckpt).heads["dermmel"].calibration
    assert main(["evaluate", str(ckpt), "--tta", "--out", str(tmp_path / "b"), "-q"]) == 0
    head = read_meta(ckpt).heads["dermmel"]
    assert head.calibration == plain and head.calibration_tta.tta and not plain.tta
    assert head.calibration_for(tta=True) == (head.calibration_tta, None)


def test_a_checkpoint_without_training_data_evaluates_only_externally(dermmel, tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "m.ckpt", dermmel, with_data=False)
    assert main(["evaluate", str(ckpt), f"dataset.root={dermmel}", "-q"]) == 2
    assert "--external" in capsys.readouterr().err
    assert main(["evaluate", str(ckpt), "dataset=dermmel", f"dataset.root={dermmel}", "dataset.num_workers=0",
                 "--external", "--out", str(tmp_path / "x"), "-q"]) == 0
    assert json.loads((tmp_path / "x" / "metrics.json").read_text())["n"] == 32


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


def test_check_data_with_a_cache_reads_the_originals_and_lists_every_bad_one(tmp_path, capsys):
    """With dataset.cache_dir set, check-data must decode the downloaded files, not the cache (a
    cache built before a file was damaged would hide it), and list every bad file instead of
    stopping at the first one as building the cache would."""
    root, cache = tmp_path / "data", tmp_path / "cache"
    dermmel = write_dermmel_layout(root, {"train": 2, "val": 1, "test": 1}, image_size=32, seed=4, masks=False)
    dm = DermMelDataModule(root=root, image_size=32, num_workers=0, cache_dir=cache)
    dm.setup()  # caches all 8 images while they are intact (and the 4 val/test ones' eval pixels)
    cached = sorted(p for p in cache.rglob("*") if p.is_file())
    assert len(cached) == 8 + 4
    empty = dermmel / "train_sep" / "Melanoma" / "synth_train_sep_00000.jpeg"
    truncated = dermmel / "test" / "NotMelanoma" / "synth_test_00000.jpg"
    empty.write_bytes(b"")
    truncated.write_bytes(truncated.read_bytes()[:200])

    rc = main(["check-data", "dataset=dermmel", f"dataset.root={root}", f"dataset.cache_dir={cache}",
               "dataset.num_workers=0", "-q"])
    captured = capsys.readouterr()
    assert rc == 1
    listed = [line.split(": ", 1)[0] for line in captured.out.splitlines()]
    assert sorted(listed) == sorted([str(empty), str(truncated)])
    assert "6 of 8 images readable, 2 unreadable" in captured.err
    assert sorted(p for p in cache.rglob("*") if p.is_file()) == cached  # the cache was not touched
