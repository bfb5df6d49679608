"""What Lightning's DDP launcher needs from a Hydra app, in one place.

Lightning starts DDP ranks > 0 by re-running the script: ``python train.py <sys.argv[1:]>
hydra.run.dir=<run.dir>``, and it leaves LOCAL_RANK, MASTER_PORT, ... in ``os.environ`` and the
process group open when the run ends. Inside Hydra that goes wrong twice:

- in a multirun (``-m``, or hparams_search setting hydra.mode) the children's argv would start a
  whole sweep in every child, and a ``run.dir`` with ``${now:...}`` may resolve to another second:
  so argv becomes this job's own overrides plus ``hydra.mode=RUN``, with run.dir pinned;
- the next multirun job in the same process would take itself for a DDP child: so the environment
  is restored and the process group closed after each run.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

__all__ = ["hydra_ddp_launch", "num_devices", "strategy_for"]


def num_devices(devices) -> int | None:
    if isinstance(devices, int):
        return devices if devices > 0 else None
    if isinstance(devices, str) and devices.strip().isdigit():
        return int(devices)
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return len(devices)
    return None


def strategy_for(trainer_cfg: DictConfig, find_unused_parameters: bool):
    """trainer.strategy auto/ddp on several devices or nodes -> DDP; with find_unused_parameters
    when some layers may be frozen (they produce no gradient, see GradualUnfreezing)."""
    strategy = trainer_cfg.get("strategy", "auto")
    n = num_devices(trainer_cfg.get("devices", 1))
    multi = (n is not None and n > 1) or int(trainer_cfg.get("num_nodes", 1)) > 1
    if multi and strategy in ("auto", "ddp"):
        return "ddp_find_unused_parameters_true" if find_unused_parameters else "ddp"
    return strategy


@contextmanager
def hydra_ddp_launch(trainer_cfg: DictConfig, run_dir: Path):
    """Around one run: DDP children land in this run's folder as a single run, and the process
    is left as it was found (environment, process group)."""
    is_child = "LOCAL_RANK" in os.environ
    saved_env = None if is_child else dict(os.environ)
    with _pinned_child_argv(trainer_cfg, run_dir, is_child):
        try:
            yield
        finally:
            if saved_env is not None:
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    torch.distributed.destroy_process_group()
                os.environ.clear()
                os.environ.update(saved_env)


@contextmanager
def _pinned_child_argv(trainer_cfg: DictConfig, run_dir: Path, is_child: bool):
    from hydra.core.hydra_config import HydraConfig

    n = num_devices(trainer_cfg.get("devices", 1))
    if not (n and n > 1) or is_child or not HydraConfig.initialized():
        yield
        return
    from omegaconf import open_dict, read_write

    hc = HydraConfig.get()
    saved_argv, saved_dir = list(sys.argv), hc.run.dir
    with read_write(hc), open_dict(hc):
        hc.run.dir = str(run_dir)
    sys.argv = [sys.argv[0], *[o for o in hc.overrides.task if not o.startswith("hydra.mode=")], "hydra.mode=RUN"]
    try:
        yield
    finally:
        sys.argv = saved_argv
        with read_write(hc), open_dict(hc):
            hc.run.dir = saved_dir
