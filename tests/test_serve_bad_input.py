"""Bad uploads get a clear 4xx JSON error, and the server keeps serving afterwards."""

import io

import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
from fastapi.testclient import TestClient  # noqa: E402

from melanoma.serve import create_app  # noqa: E402
from melanoma.serve.limits import ServeLimits  # noqa: E402
from helpers import lesion_bytes  # noqa: E402


@pytest.fixture(scope="module")
def client(two_head_ckpt):
    limits = ServeLimits(max_files=3, max_bytes=200_000, max_pixels=100_000)
    with TestClient(create_app(two_head_ckpt, limits=limits)) as c:
        yield c


def good(name="ok.jpg"):
    return ("file", (name, lesion_bytes(), "image/jpeg"))


def png_of_size(w, h) -> bytes:
    buf = io.BytesIO()
    Image.new("1", (w, h)).save(buf, format="PNG")  # 1-bit, all black: a few hundred bytes
    return buf.getvalue()


def assert_error(r, status, *words):
    assert r.status_code == status, r.text
    body = r.json()
    text = (body["error"] + " " + " ".join(f["error"] for f in body.get("files", []))).lower()
    for w in words:
        assert w.lower() in text, (w, body)
    return body


def test_not_an_image(client):
    r = client.post("/api/predict", files=[good(), ("file", ("notes.jpg", b"hello, not a picture", "image/jpeg"))])
    body = assert_error(r, 422, "notes.jpg", "not a readable image")
    assert [f["filename"] for f in body["files"]] == ["notes.jpg"]


def test_truncated_image(client):
    data = lesion_bytes(3)
    r = client.post("/api/predict", files=[("file", ("cut.jpg", data[: len(data) // 2], "image/jpeg"))])
    assert_error(r, 422, "cut.jpg", "truncated")
    assert "melanoma-serve-" not in r.text  # no server temp paths in errors


def test_empty_file(client):
    assert_error(client.post("/api/predict", files=[("file", ("zero.jpg", b"", "image/jpeg"))]), 422, "zero.jpg", "empty")


def test_too_many_pixels(client):
    r = client.post("/api/predict", files=[("file", ("big.png", png_of_size(400, 400), "image/png"))])
    assert_error(r, 413, "big.png", "160000", "100000", "--max-pixels")


def test_decompression_bomb_with_default_limits(two_head_ckpt):
    with TestClient(create_app(two_head_ckpt)) as c:
        side = int((ServeLimits().max_pixels * 1.2) ** 0.5)
        r = c.post("/api/predict", files=[("file", ("bomb.png", png_of_size(side, side), "image/png"))])
    assert_error(r, 413, "bomb.png", "pixels")


def test_empty_request(client):
    assert_error(client.post("/api/predict"), 400, "no files", "file")
    assert_error(client.post("/api/predict", data={"head": "synthetic"}), 400, "no files")


def test_too_many_files(client):
    r = client.post("/api/predict", files=[good(f"{i}.jpg") for i in range(4)])
    assert_error(r, 413, "4 files", "at most 3", "--max-files")


def test_too_many_bytes(client):
    big = ("file", ("big.jpg", b"\xff\xd8" + b"0" * 250_000, "image/jpeg"))
    assert_error(client.post("/api/predict", files=[big]), 413, "200000 bytes", "--max-bytes")


def test_bad_options(client):
    assert_error(client.post("/api/predict", files=[good()], data={"head": "ph2"}), 400, "ph2", "synthetic", "ham10000")
    assert_error(client.post("/api/predict", files=[good()], data={"overlay": "saliency"}), 400, "saliency", "rollout")
    assert_error(client.post("/api/predict", files=[good()], data={"tta": "maybe"}), 400, "tta", "maybe")
    assert_error(client.post("/api/predict", files=[good()], data={"heads": "synthetic"}), 400, "heads", "unknown")
    assert_error(client.post("/api/predict", files=[good(), ("other", ("x", b"y"))]), 400, "other", "unknown")
    assert_error(client.post("/api/predict", data={"file": "a.jpg"}, files=[good()]), 400, "must be a file upload")


def test_server_keeps_serving_after_bad_input(client):
    client.post("/api/predict", files=[("file", ("x.jpg", b"junk", "image/jpeg"))])
    r = client.post("/api/predict", content=b"not multipart", headers={"content-type": "text/plain"})
    assert_error(r, 400, "multipart/form-data")
    r = client.post("/api/predict", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 400 and r.json()["error"]
    assert client.get("/healthz").status_code == 200
    r = client.post("/api/predict", files=[good()])
    assert r.status_code == 200 and r.json()["predictions"][0]["error"] is None
