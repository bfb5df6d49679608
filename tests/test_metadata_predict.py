"""A checkpoint that fuses patient metadata, everywhere a prediction is made (issue 23):
`melanoma predict --metadata`, ONNX with its `metadata` input, `/api/predict` form fields,
evaluation of a dataset without metadata; and a plain checkpoint refusing metadata."""

import csv
import json
import shutil

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch

from helpers import compose_cfg, tiny_dataset_overrides, tiny_model_overrides, tiny_trainer_overrides
from layouts import HAM_LESIONS, write_ham10000_layout
from melanoma.cli import main
from melanoma.predict import Predictor
from melanoma.predict.predictor import MELANOMA_DECISION, NOT_MELANOMA_DECISION


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    """(checkpoint, folder of 6 test images, metadata table) of a concat model trained with evaluation
    (so its head has a calibration and an operating point)."""
    from melanoma.workflows.training_run import run

    tmp = tmp_path_factory.mktemp("fused")
    root = write_ham10000_layout(tmp / "HAM10000", HAM_LESIONS, images_per_lesion=(1, 2), seed=6)
    meta = pd.read_csv(root / "HAM10000_metadata.csv")
    rng = np.random.default_rng(0)
    meta["age"] = rng.integers(20, 85, len(meta)).astype(float)
    meta["sex"] = rng.choice(["male", "female"], len(meta))
    meta["localization"] = rng.choice(["back", "face", "lower extremity"], len(meta))
    meta.to_csv(root / "HAM10000_metadata.csv", index=False)
    cfg = compose_cfg(["dataset=ham10000", "model=vit_tiny", "logger=csv", *tiny_dataset_overrides(root),
                       *tiny_model_overrides(), *tiny_trainer_overrides(2), "evaluate=true",
                       "dataset.metadata=[age,sex,site]", "model.fusion=concat"], tmp / "run")
    run(cfg)
    ckpt = json.loads((tmp / "run" / "report" / "metrics.json").read_text())["checkpoint"]
    folder = tmp / "imgs"
    folder.mkdir()
    names = sorted(meta.image_id)[:6]
    for n in names:
        shutil.copy(next(root.glob(f"*/{n}.jpg")), folder / f"{n}.jpg")
    table = tmp / "table.csv"
    rows = meta.set_index("image_id").loc[names[:5]]  # the sixth image has no row
    pd.DataFrame({"image": [f"{n}.jpg" for n in names[:5]], "age": rows.age.to_numpy(),
                  "sex": ["male", "female", "", "male", "female"], "localization": rows.localization.to_numpy(),
                  "dx_type": "histo"}).to_csv(table, index=False)
    return ckpt, folder, table


def _read(path):
    with open(path) as f:
        return {r["path"].rsplit("/", 1)[1]: r for r in csv.DictReader(f)}


def test_predict_with_metadata_table_says_what_is_missing(fused, tmp_path, capsys):
    ckpt, folder, table = fused
    assert main(["predict", ckpt, str(folder), "--metadata", str(table), "--out", str(tmp_path / "p.csv"), "-q"]) == 0
    err = capsys.readouterr().err
    assert "1 image(s) have no row" in err and "dx_type (HAM10000's dx_type" in err
    rows = _read(tmp_path / "p.csv")
    names = sorted(rows)
    assert rows[names[5]]["metadata_missing"] == "age;sex;site"  # no row: every value missing
    assert rows[names[2]]["metadata_missing"] == "sex"  # an empty cell
    assert rows[names[0]]["metadata_missing"] == ""
    assert all(r["decision"] in (MELANOMA_DECISION, NOT_MELANOMA_DECISION) for r in rows.values())
    # without the table every value is missing, and the probabilities change: the metadata is used
    assert main(["predict", ckpt, str(folder), "--out", str(tmp_path / "none.csv"), "-q"]) == 0
    assert "no --metadata table was given" in capsys.readouterr().err
    none = _read(tmp_path / "none.csv")
    assert none[names[5]]["melanoma_probability"] == rows[names[5]]["melanoma_probability"]
    assert any(none[n]["melanoma_probability"] != rows[n]["melanoma_probability"] for n in names[:5])


def test_onnx_metadata_input_agrees_with_predict(fused, tmp_path):
    ckpt, folder, table = fused
    assert main(["predict", ckpt, str(folder), "--metadata", str(table), "--out", str(tmp_path / "p.csv"), "-q"]) == 0
    rows = _read(tmp_path / "p.csv")
    assert main(["export", ckpt, "--out", str(tmp_path / "m.onnx"), "-q"]) == 0
    sidecar = json.loads((tmp_path / "m.onnx.json").read_text())
    assert sidecar["metadata"]["fields"] == ["age", "sex", "site"] and "metadata" in sidecar["inputs"]
    from melanoma.metadata import MetadataSchema, read_metadata_table

    schema = MetadataSchema.from_dict(sidecar["metadata"])
    predictor = Predictor(ckpt, progress=False)
    paths = sorted(folder.iterdir())
    records, _ = read_metadata_table(table, paths, schema.fields)
    x = torch.stack([predictor.transform(predictor_image) for predictor_image in map(_image, paths)]).numpy()
    m = np.stack([schema.encode_row(r or {})[0] for r in records])
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image", "metadata"]
    _, probs = session.run(["logits", "probabilities"], {"image": x, "metadata": m})
    pos, threshold = sidecar["positive_index"], sidecar["operating_point"]["threshold"]
    for p, prob in zip(paths, probs):
        r = rows[p.name]
        assert prob[pos] == pytest.approx(float(r["melanoma_probability"]), abs=1e-5)
        assert (MELANOMA_DECISION if prob[pos] >= threshold else NOT_MELANOMA_DECISION) == r["decision"]


def _image(path):
    from melanoma.data.io import load_rgb

    return load_rgb(path)


def test_serve_form_fields_agree_with_predict(fused, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from melanoma.serve import create_app

    ckpt, folder, table = fused
    paths = sorted(folder.iterdir())[:2]
    pd.DataFrame({"image": [p.name for p in paths], "age": [70, 30], "sex": ["male", "female"],
                  "site": ["back", "face"]}).to_csv(tmp_path / "t.csv", index=False)
    assert main(["predict", ckpt, *map(str, paths), "--metadata", str(tmp_path / "t.csv"),
                 "--out", str(tmp_path / "p.csv"), "-q"]) == 0
    rows = _read(tmp_path / "p.csv")
    with TestClient(create_app(ckpt)) as client:
        files = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
        r = client.post("/api/predict", files=files, data={"overlay": "none", "age": ["70", "30"],
                                                           "sex": ["male", "female"], "site": ["back", "face"]})
        assert r.status_code == 200, r.text
        for p, got in zip(paths, r.json()["predictions"]):
            assert got["melanoma_probability"] == pytest.approx(float(rows[p.name]["melanoma_probability"]), abs=1e-6)
            assert got["decision"] == rows[p.name]["decision"] and got["metadata_missing"] == ""
        bad = client.post("/api/predict", files=files, data={"overlay": "none", "age": ["1", "2", "3"]})
        assert bad.status_code == 400 and "one per image" in bad.text
        # the page learns from /api/model which inputs to show
        assert client.get("/api/model").json()["heads"]["ham10000"]["metadata"]["fields"] == ["age", "sex", "site"]
        page = client.get("/").text
        assert all(f'id="{f}"' in page for f in ("age", "sex", "site"))


def test_external_dataset_without_metadata_is_scored_all_missing(fused, ph2_flat_root, tmp_path, caplog):
    ckpt, _, _ = fused
    import logging

    with caplog.at_level(logging.WARNING):
        rc = main(["evaluate", ckpt, "dataset=ph2", f"dataset.root={ph2_flat_root}", "dataset.num_workers=0",
                   "--external", "--out", str(tmp_path / "ext"), "-q"])
    assert rc == 0
    assert "has no patient metadata ['age', 'sex', 'site']" in caplog.text


def test_a_checkpoint_without_metadata_refuses_a_table(two_head_ckpt, fused, tmp_path, capsys):
    _, folder, table = fused
    assert main(["predict", str(two_head_ckpt), str(folder), "--metadata", str(table), "-q"]) != 0
    assert "trained on images alone" in capsys.readouterr().err


def test_tta_views_share_the_metadata(fused):
    from melanoma.predict.tta import DIHEDRAL_VIEWS, dihedral_view

    ckpt, folder, _ = fused
    predictor = Predictor(ckpt, tta=True, progress=False)
    x = torch.stack([predictor.transform(_image(p)) for p in sorted(folder.iterdir())[:3]])
    m = predictor.metadata_schema.encode([{"age": 70, "sex": "male", "site": "back"}, {}, {"sex": "female"}])
    with torch.no_grad():
        want = sum(predictor.model(dihedral_view(x, k, f), predictor.head, metadata=torch.from_numpy(m))
                   for k, f in DIHEDRAL_VIEWS) / len(DIHEDRAL_VIEWS)
    torch.testing.assert_close(predictor.logits(x, m), want)


def test_attention_maps_of_a_fused_head_use_the_same_metadata(fused, tmp_path):
    ckpt, folder, table = fused
    paths = sorted(folder.iterdir())[:2]
    args = ["predict", ckpt, *map(str, paths), "--metadata", str(table), "-q"]
    assert main([*args, "--out", str(tmp_path / "plain.csv")]) == 0
    assert main([*args, "--out", str(tmp_path / "maps.csv"), "--attention", str(tmp_path / "maps")]) == 0
    plain, maps = _read(tmp_path / "plain.csv"), _read(tmp_path / "maps.csv")
    for name in plain:
        assert float(maps[name]["melanoma_probability"]) == pytest.approx(float(plain[name]["melanoma_probability"]), abs=1e-6)
    assert len(list((tmp_path / "maps").glob("*_rollout.png"))) == 2
