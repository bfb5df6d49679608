"""One checkpoint, head and image give one melanoma decision, whichever way it is asked for:
`predict`, `predict --uncalibrated`, `evaluate --external`'s predictions.csv, and the ONNX export
run by the consumer snippet of docs/predict.md (PIL + numpy + onnxruntime only), with and without TTA."""

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import PH2, SYNTHETIC, tiny_checkpoint

from melanoma.cli import main
from melanoma.data.synthetic import write_dermmel_layout
from melanoma.predict import Predictor
from melanoma.models.checkpoint import Calibration, update_meta

CONSUMER_DOC = Path(__file__).resolve().parents[1] / "docs" / "predict.md"  # the ONNX consumer snippet
T = 3.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("decision")
    data = write_dermmel_layout(tmp / "data", {"train": 2, "val": 2, "test": 10}, image_size=48, seed=4)
    images = sorted(str(p) for p in data.rglob("*.jp*g"))
    ckpt = tiny_checkpoint(tmp / "t3.ckpt", {"synthetic": SYNTHETIC, "ph2": PH2}, seed=1, active_head="synthetic",
                           calibration={h: Calibration(T) for h in ("synthetic", "ph2")})
    # thresholds at the median calibrated melanoma probability: decisions fall on both sides
    thresholds = {}
    for head in ("synthetic", "ph2"):
        for tta in (False, True):
            p = Predictor(ckpt, head=head, tta=tta, progress=False, announce=False)
            p_mel = p.calibrated_probabilities(p.logits_of_paths(images))[:, p.positive_index]
            thresholds[head, tta] = float(np.median(p_mel))
    update_meta(ckpt, lambda m: [m.set_calibration(h, Calibration(T, threshold=thresholds[h, tta], tta=tta,
                                                                  target_sensitivity=0.95))
                                 for h in ("synthetic", "ph2") for tta in (False, True)])
    return {"tmp": tmp, "data": data, "images": images, "ckpt": ckpt}


def _predict(setup, *flags) -> dict[str, dict]:
    out = setup["tmp"] / f"p{'_'.join(f.strip('-') for f in flags)}.csv"
    assert main(["predict", str(setup["ckpt"]), *setup["images"], "--out", str(out), "-q", *flags]) == 0
    return {r["path"]: r for r in csv.DictReader(out.open())}


def _evaluate_external(setup, head, *flags) -> dict[str, str]:
    out = setup["tmp"] / f"ext_{head}{'_'.join(flags)}"
    assert main(["evaluate", str(setup["ckpt"]), "dataset=dermmel", f"dataset.root={setup['data']}",
                 "dataset.num_workers=0", "--external", "--head", head, "--out", str(out), "-q", *flags]) == 0
    with (out / "predictions.csv").open() as f:
        return {r["path"]: r["decision"] for r in csv.DictReader(f)}


def _consumer_snippet() -> str:
    text = CONSUMER_DOC.read_text()
    return re.search(r"<!-- onnx-consumer .*?-->\n```python\n(.*?)```", text, re.S).group(1)


def _onnx_decisions(setup, head, monkeypatch) -> dict[str, str]:
    work = setup["tmp"] / f"onnx_{head}"
    work.mkdir()
    assert main(["export", str(setup["ckpt"]), "--head", head, "--out", str(work / "model.onnx"), "-q"]) == 0
    monkeypatch.chdir(work)
    code, decisions = _consumer_snippet(), {}
    for path in setup["images"]:
        shutil.copy(path, work / "lesion.jpg")
        scope: dict = {}
        exec(code, scope)
        decisions[path] = scope["decision"]
    return decisions


@pytest.mark.parametrize("head", ["synthetic", "ph2"])
def test_predict_uncalibrated_evaluate_and_onnx_decide_alike(setup, head, monkeypatch):
    calibrated = _predict(setup, "--head", head)
    raw = _predict(setup, "--head", head, "--uncalibrated")
    decisions = {p: r["decision"] for p, r in calibrated.items()}
    assert set(decisions.values()) == {"melanoma", "not_melanoma"}  # the test can tell them apart
    assert {p: r["decision"] for p, r in raw.items()} == decisions
    assert _evaluate_external(setup, head) == decisions
    assert _onnx_decisions(setup, head, monkeypatch) == decisions
    # the uncalibrated probabilities really are another scale (T = 3)
    some = next(iter(calibrated))
    assert float(raw[some]["melanoma_probability"]) != pytest.approx(float(calibrated[some]["melanoma_probability"]))
    if head == "synthetic":  # two classes: the threshold shown is on the scale shown
        thr = float(raw[some]["threshold"])
        assert all((float(r["melanoma_probability"]) >= thr) == (r["decision"] == "melanoma") for r in raw.values())
    else:  # three classes: no such threshold exists, and none is shown
        assert raw[some]["threshold"] == ""


def test_tta_uses_the_calibration_fitted_with_tta(setup):
    plain = _predict(setup)
    tta = _predict(setup, "--tta")
    assert _evaluate_external(setup, "synthetic", "--tta") == {p: r["decision"] for p, r in tta.items()}
    some = next(iter(tta))
    assert float(tta[some]["threshold"]) != float(plain[some]["threshold"])  # the TTA record's threshold


def test_an_uncalibrated_head_says_so(setup, tmp_path, capsys):
    ckpt = shutil.copy(setup["ckpt"], tmp_path / "u.ckpt")
    update_meta(ckpt, lambda m: m.heads["synthetic"].drop_calibration("backbone changed (a test)"))
    out = tmp_path / "p.csv"
    assert main(["predict", str(ckpt), *setup["images"][:3], "--out", str(out), "-q"]) == 0
    assert "uncalibrated: backbone changed (a test)" in capsys.readouterr().err
    rows = list(csv.DictReader(out.open()))
    assert all(r["calibrated"] == "False" and r["decision"] == "" for r in rows)
    # a calibrated head of the same checkpoint is unaffected
    rows = json.loads(_json(ckpt, setup, tmp_path, "ph2"))["predictions"]
    assert all(r["calibrated"] is True and r["decision"] in ("melanoma", "not_melanoma") for r in rows)


def _json(ckpt, setup, tmp_path, head) -> str:
    out = tmp_path / f"{head}.json"
    assert main(["predict", str(ckpt), *setup["images"][:3], "--head", head, "--out", str(out), "-q"]) == 0
    return out.read_text()


@pytest.fixture(scope="module")
def setup_bias(setup, tmp_path_factory):
    """The same model with a calibration that has a class bias (temperature+bias, as site
    recalibration or a class-weighted model's calibration stores it)."""
    tmp = tmp_path_factory.mktemp("decision_bias")
    ckpt = Path(shutil.copy(setup["ckpt"], tmp / "bias.ckpt"))
    bias = {"synthetic": (0.6, -0.6), "ph2": (0.3, -0.5, 0.2)}
    thresholds = {}
    for head in ("synthetic", "ph2"):
        cal = Calibration(T, bias=bias[head], method="temperature+bias")
        p = Predictor(ckpt, head=head, progress=False, announce=False)
        p_mel = cal.probabilities(p.logits_of_paths(setup["images"]))[:, p.positive_index]
        thresholds[head] = float(np.median(p_mel))
    update_meta(ckpt, lambda m: [m.set_calibration(h, Calibration(T, bias=bias[h], method="temperature+bias",
                                                                  threshold=thresholds[h], target_sensitivity=0.95))
                                 for h in ("synthetic", "ph2")])
    return {**setup, "tmp": tmp, "ckpt": ckpt}


@pytest.mark.parametrize("head", ["synthetic", "ph2"])
def test_a_calibration_with_a_bias_decides_alike_everywhere(setup_bias, setup, head, monkeypatch):
    calibrated = _predict(setup_bias, "--head", head)
    raw = _predict(setup_bias, "--head", head, "--uncalibrated")
    decisions = {p: r["decision"] for p, r in calibrated.items()}
    assert set(decisions.values()) == {"melanoma", "not_melanoma"}
    assert {p: r["decision"] for p, r in raw.items()} == decisions
    assert _evaluate_external(setup_bias, head) == decisions
    assert _onnx_decisions(setup_bias, head, monkeypatch) == decisions
    # the bias really moves the probabilities: not those of temperature alone
    plain = _predict(setup, "--head", head)
    some = next(iter(calibrated))
    assert float(calibrated[some]["melanoma_probability"]) != pytest.approx(float(plain[some]["melanoma_probability"]))
    if head == "synthetic":  # the raw-scale threshold accounts for the bias
        thr = float(raw[some]["threshold"])
        assert all((float(r["melanoma_probability"]) >= thr) == (r["decision"] == "melanoma") for r in raw.values())
