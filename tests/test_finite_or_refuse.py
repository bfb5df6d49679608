"""Finite or refuse: non-finite weights, outputs and calibrations never become a decision.

A checkpoint whose weights hold a NaN is refused at load (predict, evaluate, export); a model
whose outputs overflow stops predict, evaluate, recalibrate, export and serve with an error naming
the images; a calibration with a non-finite number is refused when built, stored or read."""

import math

import numpy as np
import pytest
import torch
from helpers import SYNTHETIC, lesion_bytes, tiny_checkpoint
from PIL import Image

from melanoma.cli import main
from melanoma.models.checkpoint import META_KEY, Calibration, CheckpointError, read_meta
from melanoma.predict import NonFiniteOutputError, Predictor
from melanoma.predict.export import ExportError, export_onnx

CAL = {"synthetic": Calibration(1.0, threshold=0.5, target_sensitivity=0.95)}


def _edit(path, change):
    ckpt = torch.load(path, weights_only=True)
    change(ckpt)
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for i in range(3):
        (folder / f"lesion_{i}.jpg").write_bytes(lesion_bytes(seed=i, size=40))
    return sorted(folder.glob("*.jpg"))


@pytest.fixture(scope="module")
def nan_weights(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory.mktemp("nan") / "nan.ckpt", {"synthetic": SYNTHETIC}, calibration=CAL)
    return _edit(path, lambda c: c["state_dict"]["model.backbone.blocks.0.attn.qkv.weight"].view(-1)[:4].fill_(math.nan))


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory):
    """Finite weights whose logits overflow float32 to Inf/NaN."""
    path = tiny_checkpoint(tmp_path_factory.mktemp("inf") / "inf.ckpt", {"synthetic": SYNTHETIC}, calibration=CAL)

    def huge_head(ckpt):
        w = ckpt["state_dict"]["model.heads.synthetic.fc.weight"]
        w.copy_(torch.sign(torch.randn_like(w)) * 3e38)
    return _edit(path, huge_head)


def test_a_checkpoint_with_nan_weights_is_refused_at_load(nan_weights, images, tmp_path, capsys):
    with pytest.raises(CheckpointError, match=r"weights are not finite \(NaN or Inf in 1 tensors, e.g. "
                                              r"\['backbone.blocks.0.attn.qkv.weight'\]\)"):
        Predictor(nan_weights, progress=False)
    assert main(["predict", str(nan_weights), str(images[0]), "-q"]) == 1
    assert "weights are not finite" in capsys.readouterr().err
    assert main(["evaluate", str(nan_weights), "-q"]) == 1
    assert "weights are not finite" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="not finite"):
        export_onnx(nan_weights, out=tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_non_finite_outputs_stop_predict_naming_the_images(overflowing, images, capsys):
    predictor = Predictor(overflowing, progress=False)
    with pytest.raises(NonFiniteOutputError) as e:
        predictor.logits_of_paths(images)
    assert e.value.paths == [str(p) for p in images]
    with pytest.raises(NonFiniteOutputError, match="lesion_1.jpg"):
        predictor.predict_paths(images)
    capsys.readouterr()
    assert main(["predict", str(overflowing), *map(str, images), "-q"]) == 1
    out, err = capsys.readouterr()
    assert "not finite" in err and "lesion_0.jpg" in err and "melanoma," not in out  # no decision printed


def test_the_check_names_only_the_bad_rows():
    from melanoma.predict.predictor import check_finite

    check_finite(np.zeros((2, 2)), ["a", "b"])
    with pytest.raises(NonFiniteOutputError, match=r"for 1 of 3 images: b\.") as e:
        check_finite(np.array([[0.0, 1.0], [np.inf, 0.0], [2.0, 3.0]]), ["a", "b", "c"])
    assert e.value.paths == ["b"]


def test_export_refuses_non_finite_outputs(overflowing, tmp_path):
    with pytest.raises(ExportError, match="not finite"):
        export_onnx(overflowing, out=tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_serve_answers_a_json_error_not_a_decision(overflowing):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from melanoma.serve import create_app

    with TestClient(create_app(overflowing)) as client:
        r = client.post("/api/predict", files=[("file", ("mole.jpg", lesion_bytes(1), "image/jpeg"))],
                        data={"overlay": "none"})
    assert r.status_code == 422
    body = r.json()
    assert "predictions" not in body and "mole.jpg" in str(body) and "not finite" in str(body)


@pytest.mark.parametrize("bad", [dict(temperature=math.nan), dict(temperature=math.inf), dict(bias=(0.0, math.nan)),
                                 dict(threshold=math.nan), dict(threshold=-math.inf)])
def test_a_non_finite_calibration_is_refused_when_built_stored_or_read(bad, tmp_path):
    with pytest.raises(CheckpointError, match="finite"):
        Calibration(**{"temperature": 1.0, **bad})
    # read back: a file whose stored record holds the number (written by an older version, or edited)
    path = tiny_checkpoint(tmp_path / "m.ckpt", {"synthetic": SYNTHETIC}, calibration=CAL)

    def poison(ckpt):
        ckpt[META_KEY]["heads"]["synthetic"]["calibration"].update(
            {k: list(v) if isinstance(v, tuple) else v for k, v in bad.items()})
    _edit(path, poison)
    with pytest.raises(CheckpointError, match="finite"):
        read_meta(path)
    assert main(["predict", str(path), str(_png(tmp_path)), "-q"]) == 1


def _png(tmp_path):
    p = tmp_path / "x.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(p)
    return p


def test_evaluate_stops_on_non_finite_outputs_naming_the_images(overflowing, dermmel_root, tmp_path, capsys):
    rc = main(["evaluate", str(overflowing), "dataset=dermmel", f"dataset.root={dermmel_root}", "dataset.num_workers=0",
               "--external", "--out", str(tmp_path / "ext"), "-q"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "not finite" in err and ".jp" in err
    assert not (tmp_path / "ext" / "metrics.json").exists()
