"""Loggers from the ``logger`` config group; W&B goes offline by itself when it cannot upload.

The rule: never block a training run on the network. Without credentials (no WANDB_API_KEY, no
~/.netrc entry for the W&B host) or when the host does not answer within a second or two, the
W&B run is written offline under the run folder and a log line says how to upload it later with
``wandb sync``. WANDB_MODE set in the environment (offline, disabled) is respected as it is.
"""

from __future__ import annotations

import logging
import netrc
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import hydra
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

__all__ = ["build_loggers", "finish_wandb", "wandb_mode", "wandb_sync_hint"]


def _wandb_host() -> str:
    return urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"


def _has_credentials(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _reachable(host: str, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def wandb_mode() -> tuple[str, str]:
    """("online" | "offline" | "disabled", why)."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env == "disabled":
        return "disabled", "WANDB_MODE=disabled"
    if env in ("offline", "dryrun"):
        return "offline", f"WANDB_MODE={env}"
    host = _wandb_host()
    if not _has_credentials(host):
        return "offline", f"no W&B credentials (WANDB_API_KEY or a ~/.netrc entry for {host})"
    if not _reachable(host):
        return "offline", f"{host} is not reachable"
    return "online", "credentials found and host reachable"


def build_loggers(cfg: DictConfig | Mapping | None) -> tuple[list[Logger], str | None]:
    """Instantiate every entry of the ``logger`` group that has a ``_target_``; returns them
    and the W&B mode chosen (None without a W&B logger)."""
    loggers: list[Logger] = []
    chosen = None
    if not cfg:
        return loggers, chosen
    for name, entry in cfg.items():
        if entry is None or "_target_" not in entry:
            continue
        target = str(entry["_target_"])
        if target.endswith("WandbLogger"):
            mode, why = wandb_mode()
            overrides = {}
            if mode == "offline":
                overrides = {"offline": True, "log_model": False}
                log.info("W&B runs offline (%s)", why)
            elif mode == "disabled":
                overrides = {"log_model": False}
            entry = OmegaConf.merge(entry, overrides) if overrides else entry
            logger = hydra.utils.instantiate(entry)
            chosen = mode
        else:
            logger = hydra.utils.instantiate(entry)
        loggers.append(logger)
    return loggers, chosen


def wandb_sync_hint(logger: WandbLogger, mode: str | None) -> str | None:
    """'wandb sync <dir>' for an offline run (after its experiment started), else None."""
    if mode != "offline":
        return None
    run = logger.experiment
    run_dir = getattr(run, "dir", None)
    if not run_dir:
        return None
    # run.dir is .../wandb/offline-run-<stamp>/files; sync takes the offline-run folder
    return f"wandb sync {Path(run_dir).parent}"


def finish_wandb() -> None:
    """End the current W&B run so the next multirun job starts its own."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish()
