"""`melanoma predict` on files and folders, with a corrupt file among them."""

import csv
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import HAM

from melanoma.cli import main
from melanoma.data.synthetic import render_lesion
from melanoma.predict import Predictor

@pytest.fixture()
def ckpt(two_head_ckpt):
    """Heads synthetic (calibrated at T=2, threshold 0.5) and ham10000 (no operating point)."""
    return two_head_ckpt


@pytest.fixture()
def folder(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "imgs" / "nested").mkdir(parents=True)
    names = ["a.jpg", "b.png", "nested/c.jpeg", "nested/d.bmp"]
    for i, name in enumerate(names):
        Image.fromarray(render_lesion(rng, bool(i % 2), 40)[0]).save(tmp_path / "imgs" / name)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image, ignored")
    return tmp_path / "imgs"


def test_predict_folder_with_a_corrupt_file(ckpt, folder, tmp_path, capsys):
    out = tmp_path / "results.csv"
    rc = main(["predict", str(ckpt), str(folder), "--out", str(out), "--batch-size", "2", "-q"])
    err = capsys.readouterr().err
    assert rc == 1  # partial failure is visible to scripts
    assert "broken.jpg" in err and "4 of 5 images predicted" in err
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 5
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in rows}
    assert by_name["broken.jpg"]["error"] and by_name["broken.jpg"]["predicted_class"] == ""
    good = [r for n, r in by_name.items() if n != "broken.jpg"]
    for r in good:
        assert r["error"] == ""
        p = np.array([float(r["prob_not_melanoma"]), float(r["prob_melanoma"])])
        assert p.sum() == pytest.approx(1, abs=1e-6)
        assert r["predicted_class"] == ["not_melanoma", "melanoma"][p.argmax()]
        assert float(r["melanoma_probability"]) == pytest.approx(p[1])
        assert r["decision"] == ("melanoma" if p[1] >= 0.5 else "not_melanoma")
        assert float(r["threshold"]) == 0.5


def test_predict_applies_temperature_and_matches_the_model(ckpt, folder):
    paths = sorted(folder.glob("*.jpg"))[:1] + sorted(folder.glob("*.png"))
    paths = [p for p in paths if p.name != "broken.jpg"]
    calibrated = Predictor(ckpt, progress=False)
    raw = Predictor(ckpt, progress=False, calibrated=False)
    assert calibrated.temperature == 2.0 and raw.temperature == 1.0
    rec_c, rec_r = calibrated.predict_paths(paths), raw.predict_paths(paths)
    x = torch.stack([calibrated.transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        logits = calibrated.model(x, "synthetic")
    np.testing.assert_allclose([r["prob_melanoma"] for r in rec_c], torch.softmax(logits / 2, 1)[:, 1], atol=1e-5)
    np.testing.assert_allclose([r["prob_melanoma"] for r in rec_r], torch.softmax(logits, 1)[:, 1], atol=1e-5)


def test_predict_json_other_head_attention_and_tta(ckpt, folder, tmp_path):
    out, maps = tmp_path / "r.json", tmp_path / "maps"
    rc = main(["predict", str(ckpt), str(folder / "a.jpg"), str(folder / "nested"), "--head", "ham10000",
               "--out", str(out), "--attention", str(maps), "--attention-method", "rollout",
               "--attention-method", "grad_rollout", "--tta", "-q"])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["head"] == "ham10000" and result["threshold"] is None and result["tta"] is True
    assert len(result["predictions"]) == 3
    for r in result["predictions"]:
        assert set(f"prob_{c}" for c in HAM) <= set(r) and r["decision"] is None  # no operating point stored
        assert r["predicted_class"] in HAM
        stem = r["path"].rsplit("/", 1)[-1].split(".")[0]
        for kind in ("rollout", "grad_rollout", "heads"):
            png = maps / f"{stem}_{kind}.png"
            assert png.is_file() and Image.open(png).width >= 224
    # TTA averages 8 views, so it differs from a single view
    single = Predictor(ckpt, head="ham10000", progress=False).predict_paths([folder / "a.jpg"])[0]
    assert single["prob_mel"] != pytest.approx(result["predictions"][0]["prob_mel"], abs=1e-7)


def test_named_files_that_cannot_be_read_are_rows_too(ckpt, folder, tmp_path, capsys):
    out = tmp_path / "r.csv"
    rc = main(["predict", str(ckpt), str(folder / "a.jpg"), str(tmp_path / "missing.jpg"),
               str(folder / "notes.txt"), "--out", str(out), "-q"])
    assert rc == 1
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in csv.DictReader(out.open())}
    assert rows["missing.jpg"]["error"] == "file not found" and rows["notes.txt"]["error"]
    assert rows["a.jpg"]["error"] == "" and rows["a.jpg"]["predicted_class"]
    err = capsys.readouterr().err
    assert "missing.jpg" in err and "notes.txt" in err and "1 of 3 images predicted" in err


def test_predict_errors_say_what_to_do(ckpt, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(ckpt), str(tmp_path / "empty")]) == 2
    assert "no image files" in capsys.readouterr().err
    (tmp_path / "x.jpg").write_bytes(b"")
    assert main(["predict", str(ckpt), str(tmp_path / "x.jpg"), "--head", "ph2", "-q"]) == 2
    assert "no head named 'ph2'" in capsys.readouterr().err


def test_predict_without_out_writes_the_same_csv_to_stdout(ckpt, folder, tmp_path, capsys):
    """No --out: stdout is the CSV alone (pipe-able; messages go to stderr), row for row the file
    --out writes, the unreadable image's row included."""
    out = tmp_path / "results.csv"
    assert main(["predict", str(ckpt), str(folder), "--out", str(out), "-q"]) == 1
    capsys.readouterr()
    assert main(["predict", str(ckpt), str(folder), "-q"]) == 1
    captured = capsys.readouterr()
    from_stdout = list(csv.DictReader(io.StringIO(captured.out)))
    from_file = list(csv.DictReader(out.open(newline="")))
    assert len(from_file) == 5 and from_stdout == from_file
    assert "4 of 5 images predicted" in captured.err and "4 of 5" not in captured.out
