"""`melanoma export --format onnx`: onnxruntime reproduces PyTorch within 1e-4."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from helpers import PH2, SYNTHETIC, tiny_checkpoint

from melanoma.cli import main
from melanoma.models.checkpoint import Calibration
from melanoma.models.classifier import Classifier

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("export") / "tiny.ckpt", {"synthetic": SYNTHETIC, "ph2": PH2},
                           active_head="synthetic",
                           calibration={"ph2": Calibration(1.7, threshold=0.3, target_sensitivity=0.95)})


@pytest.mark.parametrize("calibrated", [False, True])
def test_onnx_equals_pytorch(ckpt, tmp_path, calibrated, capsys):
    out = tmp_path / "model.onnx"
    args = ["export", str(ckpt), "--format", "onnx", "--head", "ph2", "--out", str(out), "-q"]
    assert main(args + ([] if calibrated else ["--uncalibrated"])) == 0
    assert "max |onnxruntime - torch|" in capsys.readouterr().out
    model, _ = Classifier.from_checkpoint(ckpt)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    t = 1.7 if calibrated else 1.0
    with torch.no_grad():
        logits = model(x, "ph2")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got_logits, got_probs = session.run(["logits", "probabilities"], {"image": x.numpy()})
    np.testing.assert_allclose(got_logits, logits.numpy(), atol=1e-4, rtol=0)  # raw logits
    np.testing.assert_allclose(got_probs, torch.softmax(logits / t, 1).numpy(), atol=1e-4, rtol=0)
    sidecar = json.loads((tmp_path / "model.onnx.json").read_text())
    assert sidecar["class_names"] == ["common_nevus", "atypical_nevus", "melanoma"] and sidecar["positive_index"] == 2
    assert sidecar["calibrated"] is calibrated
    if calibrated:
        assert sidecar["calibration"]["temperature"] == t and sidecar["operating_point"]["threshold"] == 0.3
    else:  # three classes: no threshold on raw probabilities reproduces the operating point
        assert sidecar["calibration"] is None and sidecar["operating_point"] is None
    assert sidecar["max_abs_diff"] <= 1e-4
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(out)).metadata_props}
    assert meta["image_size"] == 32 and meta["head"] == "ph2"
