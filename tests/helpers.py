"""Plain helpers shared by the tests (imported normally; the fixtures live in conftest.py):
shrunk configs, train.py runs, tiny checkpoints, lesion upload bytes, a live server."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict
from PIL import Image

from melanoma.data.synthetic import render_lesion
from melanoma.models.checkpoint_io import build_classifier, save_classifier_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"

# tiny_dermmel (conftest.py): 8 images per class per split, 32 px: 16 train images -> 2 steps of 8 per epoch
TINY_COUNTS = {"train": 8, "val": 8, "test": 8}

# the backbone of every hand-made test checkpoint, and its usual heads
KW = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
HAM = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
SYNTHETIC = ["not_melanoma", "melanoma"]
PH2 = ["common_nevus", "atypical_nevus", "melanoma"]


def tiny_model_overrides() -> list[str]:
    return [
        "model.pretrained=null",
        "model.backbone.kwargs.embed_dim=32",
        "model.backbone.kwargs.depth=2",
        "model.backbone.kwargs.num_heads=2",
        "model.backbone.kwargs.patch_size=8",
        "model.backbone.kwargs.drop_path_rate=0.0",
    ]


def tiny_dataset_overrides(root: Path, batch_size: int = 8) -> list[str]:
    return [
        f"dataset.root={root}",
        "dataset.image_size=32",
        f"dataset.batch_size={batch_size}",
        "dataset.num_workers=0",
        "dataset.pin_memory=false",
        "dataset.persistent_workers=false",
    ]


def tiny_trainer_overrides(max_epochs: int = 2) -> list[str]:
    return [
        "trainer.accelerator=cpu",
        f"trainer.max_epochs={max_epochs}",
        "trainer.enable_progress_bar=false",
        "trainer.num_sanity_val_steps=0",
        "trainer.log_every_n_steps=1",
        "callbacks.model_summary=null",
        "callbacks.progress_bar=null",
        "evaluate=false",
        # tiny models gain nothing from a second thread, and on a busy 2-core box it thrashes
        "num_threads=1",
    ]


def tiny_overrides(root: Path, max_epochs: int = 2, batch_size: int = 8) -> list[str]:
    return ["dataset=dermmel", "model=vit_tiny", "logger=csv", *tiny_dataset_overrides(root, batch_size),
            *tiny_model_overrides(), *tiny_trainer_overrides(max_epochs)]


def compose_cfg(overrides: list[str], output_dir: Path) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"paths.output_dir={output_dir}"])
    return cfg


def run_train_py(args: list[str], cwd: Path, timeout: float = 300, env: dict | None = None,
                 check: bool = True) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                **(env or {})}
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def set_key(cfg: DictConfig, dotted: str, value) -> None:
    with open_dict(cfg):
        node = cfg
        *parents, last = dotted.split(".")
        for p in parents:
            node = node[p]
        node[last] = value


def tiny_checkpoint(path: Path, heads: dict[str, list[str]], seed: int = 0, kw: dict | None = None,
                    image_size: int | None = None, **save_kwargs) -> Path:
    """An untrained vit_tiny classifier with ``heads`` (initialised from ``seed``) saved through
    the checkpoint contract; ``save_kwargs`` go to save_classifier_checkpoint (active_head,
    calibration, data, ...)."""
    kw = dict(KW if kw is None else kw)
    torch.manual_seed(seed)
    model = build_classifier("vit_tiny", kw, heads)
    return save_classifier_checkpoint(path, model, "vit_tiny", kw,
                                      image_size=kw["img_size"] if image_size is None else image_size, **save_kwargs)


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


def module_from_cfg(cfg, dataset_name: str, class_names, image_size: int = 32, **overrides):
    """The LightningModule exactly as train.py builds it from a composed config (the partial
    conf/model node), for tests that drive a Trainer themselves."""
    import hydra

    make = hydra.utils.instantiate(cfg.model, _recursive_=False, _convert_="all")
    return make(dataset_name=dataset_name, class_names=list(class_names), image_size=image_size, **overrides)


def onnx_agrees_with_checkpoint(ckpt: Path, onnx_path: Path) -> dict:
    """The ONNX file's logits equal the checkpoint's model on the same (non-random) pixels;
    returns the export's sidecar (its JSON metadata) for the caller's own checks."""
    import json

    import onnxruntime as ort
    import torch

    from melanoma.models.classifier import Classifier

    model, meta = Classifier.from_checkpoint(ckpt)
    size = meta.preprocessing.image_size
    x = torch.linspace(-2, 2, 3 * 3 * size * size).reshape(3, 3, size, size)
    with torch.no_grad():
        expected = model(x, meta.active_head).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    return json.loads(onnx_path.with_name(onnx_path.name + ".json").read_text())
