"""Prediction, attention maps and the report on CUDA agree with CPU (skipped without a GPU)."""

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import SYNTHETIC, tiny_checkpoint

from melanoma.cli import main
from melanoma.data.synthetic import SyntheticDataModule, render_lesion
from melanoma.workflows.evaluate import evaluate_checkpoint
from melanoma.explain.attention import compute_attention_maps
from melanoma.predict import Predictor

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

KW = dict(img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=4)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("cuda") / "m.ckpt", {"synthetic": SYNTHETIC}, kw=KW)


def test_cuda_prediction_and_maps_equal_cpu(ckpt, tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        p = tmp_path / f"{i}.png"
        Image.fromarray(render_lesion(rng, bool(i % 2), 80)[0]).save(p)
        paths.append(p)
    cpu = Predictor(ckpt, progress=False).predict_paths(paths)
    gpu = Predictor(ckpt, device="cuda", progress=False).predict_paths(paths, attention_dir=tmp_path / "maps",
                                                                          attention_methods=("rollout", "grad_rollout"))
    np.testing.assert_allclose([r["prob_melanoma"] for r in gpu], [r["prob_melanoma"] for r in cpu], atol=1e-4)
    assert all((tmp_path / "maps" / f"{i}_grad_rollout.png").is_file() for i in range(6))
    pred = Predictor(ckpt, progress=False)
    x = torch.stack([pred.transform(Image.open(p).convert("RGB")) for p in paths])
    maps = {}
    for device in ("cpu", "cuda"):
        model = pred.model.to(device)
        maps[device] = compute_attention_maps(lambda v, **k: model(v, "synthetic", **k), x.to(device), model.backbone.grid_size,
                                              methods=("last_layer", "rollout", "grad_rollout"))
    for m in ("last_layer", "rollout", "grad_rollout"):
        np.testing.assert_allclose(maps["cuda"].maps[m], maps["cpu"].maps[m], atol=1e-4, rtol=1e-3)
    assert main(["predict", str(ckpt), str(tmp_path / "0.png"), "--device", "cuda", "--tta", "-q",
                 "--out", str(tmp_path / "r.csv")]) == 0


def test_report_on_cuda_equals_cpu(ckpt, tmp_path):
    import shutil

    import pandas as pd

    reports = {}
    for device in ("cpu", "cuda"):
        dm = SyntheticDataModule(root=tmp_path / "data", counts={"train": 4, "val": 20, "test": 20},
                                 generate_size=64, image_size=64, batch_size=16, num_workers=0)
        copy = shutil.copy(ckpt, tmp_path / f"{device}.ckpt")
        reports[device] = evaluate_checkpoint(copy, dm, tmp_path / device, device=device, tta=True, progress=False)
    cpu, gpu = reports["cpu"], reports["cuda"]
    assert gpu["n"] == cpu["n"] == 40
    for key in ("temperature", "threshold", "auroc", "accuracy", "sensitivity_at_threshold"):
        assert gpu[key] == pytest.approx(cpu[key], abs=1e-3), key
    tables = {d: pd.read_csv(tmp_path / d / "predictions.csv") for d in reports}
    np.testing.assert_allclose(tables["cuda"]["melanoma_probability"], tables["cpu"]["melanoma_probability"], atol=1e-4)
