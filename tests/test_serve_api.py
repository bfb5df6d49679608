"""`melanoma serve`: the JSON API through FastAPI's TestClient, the page, and the CLI entry."""

import base64
import io
import re
import tomllib
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
from fastapi.testclient import TestClient  # noqa: E402

from melanoma.cli import build_parser, main  # noqa: E402
from melanoma.predict import Predictor  # noqa: E402
from melanoma.serve import create_app  # noqa: E402
from melanoma.serve.engine import SERVER_ONLY_FIELDS  # noqa: E402
from melanoma.serve.limits import ServeLimits  # noqa: E402
from helpers import HAM, SYNTHETIC, lesion_bytes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def client(two_head_ckpt):
    with TestClient(create_app(two_head_ckpt)) as c:
        yield c


def test_healthz_and_model_description(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    model = client.get("/api/model").json()
    assert model["active_head"] == "synthetic" and model["image_size"] == 32
    assert model["heads"]["synthetic"]["class_names"] == SYNTHETIC
    assert model["heads"]["ham10000"]["class_names"] == HAM
    assert model["heads"]["synthetic"]["operating_point"] == {"threshold": 0.5, "target_sensitivity": 0.95}
    assert model["heads"]["synthetic"]["calibration"]["temperature"] == 2.0
    assert model["heads"]["synthetic"]["calibrated"] is True and model["heads"]["synthetic"]["positive_index"] == 1
    assert model["heads"]["ham10000"]["operating_point"] is None
    assert model["heads"]["ham10000"]["calibration"] is None and model["heads"]["ham10000"]["calibrated"] is False
    assert "uncalibrated" in model["heads"]["ham10000"]["uncalibrated_reason"]
    assert model["overlay_methods"] == ["rollout", "grad_rollout", "last_layer", "heads", "none"]


def test_predict_passes_the_predictor_records_through(client, two_head_ckpt, tmp_path):
    data = lesion_bytes(1)
    (tmp_path / "x.jpg").write_bytes(data)
    expected = Predictor(two_head_ckpt, progress=False).predict_paths([tmp_path / "x.jpg"])[0]
    r = client.post("/api/predict", files=[("file", ("lesion one.jpg", data, "image/jpeg"))], data={"overlay": "none"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["head"] == "synthetic" and body["tta"] is False and body["class_names"] == SYNTHETIC
    assert body["threshold"] == 0.5 and body["target_sensitivity"] == 0.95 and body["calibration"]["temperature"] == 2.0
    assert body["calibration_warning"] is None
    (rec,) = body["predictions"]
    assert rec["filename"] == "lesion one.jpg" and "overlay_png" not in rec
    for key, value in expected.items():
        if key in SERVER_ONLY_FIELDS:
            assert key not in rec  # temp-file paths stay on the server
        elif isinstance(value, float):
            assert rec[key] == pytest.approx(value, abs=1e-6), key
        else:
            assert rec[key] == value, key
    assert rec["melanoma_probability"] == pytest.approx(rec["prob_melanoma"])
    assert rec["decision"] == ("melanoma" if rec["melanoma_probability"] >= 0.5 else "not_melanoma")


def test_predict_several_files_other_head_tta_and_overlay(client, two_head_ckpt, tmp_path):
    files = [("file", (f"img{i}.png", lesion_bytes(i, "PNG"), "image/png")) for i in range(3)]
    r = client.post("/api/predict", files=files, data={"head": "ham10000", "tta": "true", "overlay": "grad_rollout"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["head"] == "ham10000" and body["tta"] is True and body["threshold"] is None
    assert body["target_sensitivity"] is None and body["overlay"] == "grad_rollout"
    assert [p["filename"] for p in body["predictions"]] == ["img0.png", "img1.png", "img2.png"]
    (tmp_path / "a.png").write_bytes(files[0][1][1])
    expected = Predictor(two_head_ckpt, head="ham10000", tta=True, progress=False).predict_paths([tmp_path / "a.png"])[0]
    first = body["predictions"][0]
    assert first["prob_mel"] == pytest.approx(expected["prob_mel"], abs=1e-6)
    for rec in body["predictions"]:
        assert rec["decision"] is None and rec["predicted_class"] in HAM
        assert sum(rec[f"prob_{c}"] for c in HAM) == pytest.approx(1, abs=1e-5)
        png = Image.open(io.BytesIO(base64.b64decode(rec["overlay_png"])))
        assert png.format == "PNG" and png.width >= 224


@pytest.mark.parametrize("overlay", ["rollout", "last_layer", "heads"])
def test_every_overlay_method_returns_a_picture(client, overlay):
    r = client.post("/api/predict", files=[("file", ("a.jpg", lesion_bytes(2), "image/jpeg"))], data={"overlay": overlay})
    assert r.status_code == 200, r.text
    assert Image.open(io.BytesIO(base64.b64decode(r.json()["predictions"][0]["overlay_png"]))).width >= 224


def test_one_predictor_per_head_and_tta_created_lazily(two_head_ckpt):
    app = create_app(two_head_ckpt)
    service = app.state.service
    with TestClient(app) as c:
        assert set(service.predictors) == {("synthetic", False)}  # the default, built at start
        for _ in range(2):
            c.post("/api/predict", files=[("file", ("a.jpg", lesion_bytes(), "image/jpeg"))], data={"tta": "1"})
        assert set(service.predictors) == {("synthetic", False), ("synthetic", True)}


def test_page_is_served_offline_with_the_research_note(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "research tool" in page.text.lower() and "not a diagnosis" in page.text.lower()
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert assets, "the page links its script and stylesheet"
    for asset in assets:
        assert not re.match(r"(https?:)?//", asset), f"external asset {asset}: the page must work offline"
        assert client.get(asset).status_code == 200, asset
    static = REPO / "melanoma" / "serve" / "static"
    for f in static.iterdir():
        assert not re.search(r"(src|href)=[\"']https?://|url\(['\"]?https?://|import .* from ['\"]https?://", f.read_text()), f


def test_static_files_are_package_data():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["melanoma.serve"]
    static = REPO / "melanoma" / "serve"
    shipped = {p for pattern in patterns for p in static.glob(pattern)}
    assert {static / "static" / n for n in ("index.html", "app.js", "style.css")} <= shipped
    extras = config["project"]["optional-dependencies"]
    assert "fastapi" in " ".join(extras["serve"])
    # `pip install -e ".[test]"` (the README's and CI's command) must bring what the serve tests need
    test_extra = " ".join(" ".join(extras["serve"]) if e == "melanoma[serve]" else e for e in extras["test"])
    for needed in ("fastapi", "uvicorn", "python-multipart", "httpx", "selenium"):
        assert needed in test_extra, needed


def test_cli_serve_parses_options_and_starts_uvicorn(two_head_ckpt, monkeypatch):
    args = build_parser().parse_args(["serve", str(two_head_ckpt)])
    assert (args.host, args.port, args.device, args.head) == ("127.0.0.1", 8000, "cpu", None)
    started = {}
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(app=app, **kw))
    rc = main(["serve", str(two_head_ckpt), "--port", "8123", "--head", "ham10000", "--max-files", "3", "-q"])
    assert rc == 0 and started["host"] == "127.0.0.1" and started["port"] == 8123
    service = started["app"].state.service
    assert service.default_head == "ham10000" and service.limits.max_files == 3


def test_cli_serve_warns_when_exposed(two_head_ckpt, monkeypatch, caplog):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    assert main(["serve", str(two_head_ckpt), "-q"]) == 0
    assert "no authentication" not in caplog.text
    assert main(["serve", str(two_head_ckpt), "--host", "0.0.0.0", "-q"]) == 0
    assert "listening on 0.0.0.0" in caplog.text and "no authentication" in caplog.text


def test_cli_serve_rejects_a_bad_head(two_head_ckpt, capsys):
    assert main(["serve", str(two_head_ckpt), "--head", "ph2", "-q"]) == 2
    assert "no head named 'ph2'" in capsys.readouterr().err


def test_limits_have_sane_defaults():
    limits = ServeLimits()
    assert 1 <= limits.max_files <= 64 and 1e6 <= limits.max_bytes <= 1e9 and 1e6 <= limits.max_pixels <= 2e8


def test_favicon_and_head_warnings(client):
    r = client.get("/favicon.ico")
    assert r.status_code == 200 and r.headers["content-type"].startswith("image/svg+xml") and b"<svg" in r.content
    heads = client.get("/api/model").json()["heads"]
    assert "synthetic lesions" in heads["synthetic"]["data_warning"]
    assert heads["ham10000"]["data_warning"] is None
    r = client.post("/api/predict", files=[("file", ("a.jpg", lesion_bytes(2), "image/jpeg"))], data={"overlay": "none"})
    assert "synthetic lesions" in r.json()["data_warning"]


def test_rejected_file_reason_names_the_file_not_a_buffer(client):
    r = client.post("/api/predict", files=[("file", ("notes.png", b"not an image at all", "image/png"))])
    assert r.status_code == 422
    (f,) = r.json()["files"]
    assert f["filename"] == "notes.png" and "not a readable image" in f["error"]
    assert "BytesIO" not in f["error"] and "0x" not in f["error"] and "notes.png" in f["error"]
