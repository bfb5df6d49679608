"""A tiny two-head checkpoint, lesion images as upload bytes, and a live server for the
`melanoma serve` tests (imported by tests/test_serve_*.py)."""

from __future__ import annotations

import io
import socket
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from melanoma.data.synthetic import render_lesion
from melanoma.evaluation.checkpoint_io import build_classifier, save_classifier_checkpoint
from melanoma.models.checkpoint import Calibration

KW = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
HAM = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
SYNTHETIC = ["not_melanoma", "melanoma"]


@pytest.fixture(scope="session")
def serve_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = build_classifier("vit_tiny", KW, {"synthetic": SYNTHETIC, "ham10000": HAM})
    path = tmp_path_factory.mktemp("serve_ckpt") / "tiny.ckpt"
    save_classifier_checkpoint(
        path, model, "vit_tiny", KW, image_size=32, active_head="synthetic",
        calibration={"synthetic": Calibration(2.0, threshold=0.5, target_sensitivity=0.95)},
    )
    return path


def lesion_bytes(seed: int = 0, fmt: str = "JPEG", size: int = 48, melanoma: bool = True) -> bytes:
    image = Image.fromarray(render_lesion(np.random.default_rng(seed), melanoma, size)[0])
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn on 127.0.0.1 in a daemon thread; stops when the context exits."""

    def __init__(self, app):
        import uvicorn

        self.port = free_loopback_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
