"""Shared helpers for the training tests: a miniature DermMel, shrunk configs, train.py runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from melanoma.data.synthetic import write_dermmel_layout

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"

# 8 images per class per split, 32 px: 16 train images -> 2 steps of 8 per epoch
TINY_COUNTS = {"train": 8, "val": 8, "test": 8}


@pytest.fixture(scope="session")
def tiny_dermmel(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_dermmel")
    write_dermmel_layout(root, TINY_COUNTS, image_size=32, seed=5)
    return root


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
