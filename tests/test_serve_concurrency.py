"""One model, many clients: 8 concurrent clients x 10 requests against a live uvicorn on
127.0.0.1 all succeed and get the same numbers as one client alone."""

from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="httpx is part of the test extra")

from melanoma.serve import create_app  # noqa: E402
from helpers import LiveServer, lesion_bytes  # noqa: E402

CLIENTS, REQUESTS = 8, 10
IMAGES = [lesion_bytes(seed, melanoma=bool(seed % 2)) for seed in range(4)]


def test_eight_clients_ten_requests_each(two_head_ckpt):
    with LiveServer(create_app(two_head_ckpt)) as server:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            reference = []
            for data in IMAGES:
                r = c.post("/api/predict", files=[("file", ("x.jpg", data, "image/jpeg"))], data={"overlay": "none"})
                reference.append(r.json()["predictions"][0]["melanoma_probability"])
        assert len(set(reference)) > 1  # different images: a mixed-up answer would be caught

        def client(k: int) -> list[tuple[int, int, float | None, bool]]:
            out = []
            with httpx.Client(base_url=server.url, timeout=60) as c:
                for i in range(REQUESTS):
                    image = (k + i) % len(IMAGES)
                    # a mix of plain, overlay and TTA requests, so predictors are created concurrently too
                    options = {"overlay": ["none", "rollout", "heads"][i % 3], "tta": "true" if i == 5 else "false"}
                    r = c.post("/api/predict", files=[("file", (f"{k}-{i}.jpg", IMAGES[image], "image/jpeg"))], data=options)
                    rec = r.json()["predictions"][0] if r.status_code == 200 else {}
                    out.append((image, r.status_code, rec.get("melanoma_probability"), options["tta"] == "true"))
            return out

        with ThreadPoolExecutor(CLIENTS) as pool:
            results = [x for xs in pool.map(client, range(CLIENTS)) for x in xs]
    assert len(results) == CLIENTS * REQUESTS
    assert all(status == 200 for _, status, _, _ in results), [s for _, s, _, _ in results if s != 200]
    for image, _, p, tta in results:
        if not tta:
            assert p == pytest.approx(reference[image], abs=1e-5)
