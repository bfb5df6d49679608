"""One training run from a composed config: fit, test the best checkpoint, write the report.

``train.py`` (Hydra) calls ``run(cfg)``; tests call it with configs from Hydra's compose API.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import hydra
import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from melanoma.models.compile import DEFAULT_BACKEND
from melanoma.precision import AUTO, resolve_precision
from melanoma.training.loggers import build_loggers, finish_wandb, wandb_sync_hint
from melanoma.training.module import LesionClassifier
from melanoma.training.unfreeze import GradualUnfreezing

log = logging.getLogger(__name__)

__all__ = ["run"]


class SaveSplit(Callback):
    """Write the datamodule's split table to <run>/splits.csv once the data is set up."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and trainer.datamodule is not None and hasattr(trainer.datamodule, "save_split"):
            trainer.datamodule.save_split(self.path)


def _instantiate_callbacks(cfg: DictConfig | None) -> list[Callback]:
    callbacks = []
    for name, entry in (cfg or {}).items():
        if entry is None:
            continue
        if "_target_" not in entry:
            raise ValueError(f"callbacks.{name} has no _target_; found keys {list(entry)}")
        callbacks.append(hydra.utils.instantiate(entry))
    return callbacks


def _num_devices(devices) -> int | None:
    if isinstance(devices, int):
        return devices if devices > 0 else None
    if isinstance(devices, str) and devices.strip().isdigit():
        return int(devices)
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return len(devices)
    return None


def _strategy(cfg: DictConfig, callbacks: list[Callback]):
    """DDP needs find_unused_parameters when layers are frozen (they produce no gradient)."""
    strategy = cfg.trainer.get("strategy", "auto")
    n = _num_devices(cfg.trainer.get("devices", 1))
    multi = (n is not None and n > 1) or int(cfg.trainer.get("num_nodes", 1)) > 1
    unfreezing = any(isinstance(c, GradualUnfreezing) for c in callbacks)
    if multi and strategy in ("auto", "ddp"):
        return "ddp_find_unused_parameters_true" if unfreezing else "ddp"
    return strategy


@contextmanager
def _ddp_relaunch_argv(trainer_cfg: DictConfig, run_dir: Path):
    """Make Lightning's DDP relaunch of train.py land in this run's folder as a single run.

    Lightning starts ranks > 0 as ``python train.py <argv> hydra.run.dir=<run.dir>``: in a
    multirun (``-m``, or hparams_search setting hydra.mode) that argv would start a whole sweep
    in every child, and ``run.dir`` with ``${now:...}`` may resolve to another second. So: argv
    becomes this job's own overrides plus hydra.mode=RUN, and run.dir is pinned to the folder.
    """
    n = _num_devices(trainer_cfg.get("devices", 1))
    from hydra.core.hydra_config import HydraConfig

    if not (n and n > 1) or "LOCAL_RANK" in os.environ or not HydraConfig.initialized():
        yield
        return
    from omegaconf import open_dict, read_write

    hc = HydraConfig.get()
    saved_argv, saved_dir = list(sys.argv), hc.run.dir
    with read_write(hc), open_dict(hc):
        hc.run.dir = str(run_dir)
    sys.argv = [sys.argv[0], *[o for o in hc.overrides.task if not o.startswith("hydra.mode=")],
                "hydra.mode=RUN"]
    try:
        yield
    finally:
        sys.argv = saved_argv
        with read_write(hc), open_dict(hc):
            hc.run.dir = saved_dir


def _best_checkpoint(trainer: pl.Trainer) -> tuple[str | None, float | None]:
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.monitor and cb.best_model_path:
            score = cb.best_model_score
            return cb.best_model_path, (None if score is None else float(score))
    return None, None


@rank_zero_only
def _write_test_outputs(run_dir: Path, metrics: dict, module: LesionClassifier, loggers: list) -> None:
    out = run_dir / "test"
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    for name, fig in module.test_figures.items():
        fig.savefig(out / f"{name}.png", dpi=100)
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=f"test/{name}", images=[fig])
    import matplotlib.pyplot as plt

    for fig in module.test_figures.values():
        plt.close(fig)


def _print_report(metrics: dict, dataset: str, ckpt: str | None) -> None:
    lines = [f"Test report ({dataset}; checkpoint {ckpt or 'final weights'})"]
    for key in sorted(metrics):
        lines.append(f"  {key:<24} {metrics[key]:.4f}")
    print("\n".join(lines), flush=True)


def _evaluate(ckpt: str, dm, run_dir: Path, loggers: list) -> dict:
    from melanoma.evaluation.report import evaluate_checkpoint

    wandb_run = None
    for logger in loggers:
        if isinstance(logger, WandbLogger) and getattr(logger, "_melanoma_mode", "") != "disabled":
            wandb_run = logger.experiment
    return evaluate_checkpoint(ckpt, dm, run_dir / "report", wandb_run=wandb_run)


def run(cfg: DictConfig) -> float | None:
    """Train, test and report as ``cfg`` says; return the best ``cfg.optimized_metric``."""
    import torch

    threads = torch.get_num_threads()
    # Lightning's DDP launcher leaves LOCAL_RANK, MASTER_PORT, ... in os.environ and the process
    # group open; the next multirun job in this process would then take itself for a DDP child
    launcher_env = None if "LOCAL_RANK" in os.environ else dict(os.environ)
    try:
        return _run(cfg)
    finally:
        finish_wandb()
        torch.set_num_threads(threads)  # num_threads is this run's setting, not the process's
        if launcher_env is not None:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            os.environ.clear()
            os.environ.update(launcher_env)


def _single_console_handler() -> None:
    # importing `lightning` gives its top logger a stderr handler that also propagates to the
    # root handler Hydra set up, so each of its lines would print twice
    if logging.getLogger().handlers:
        top = logging.getLogger("lightning")
        for handler in list(top.handlers):
            if type(handler) is logging.StreamHandler:
                top.removeHandler(handler)


def _resolve_trainer_precision(cfg: DictConfig) -> None:
    """Replace trainer.precision=auto (which Lightning does not know) by its value on this machine,
    in cfg itself: the resolved config stored in checkpoints and logged hyperparameters then says
    what the run really used."""
    from omegaconf import open_dict

    requested = cfg.trainer.get("precision", AUTO)
    value = resolve_precision(requested, str(cfg.trainer.get("accelerator", "auto")))
    if requested != AUTO:
        log.info("trainer.precision %s (as configured)", value)
    with open_dict(cfg):
        cfg.trainer.precision = value


def _run(cfg: DictConfig) -> float | None:
    _single_console_handler()
    pl.seed_everything(int(cfg.seed), workers=True)
    if cfg.get("num_threads"):
        import torch

        torch.set_num_threads(int(cfg.num_threads))
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _resolve_trainer_precision(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)

    mean, std = list(cfg.model.mean), list(cfg.model.std)
    dm = hydra.utils.instantiate(cfg.dataset, mean=mean, std=std, _convert_="all")
    image_size = int(getattr(dm, "image_size", cfg.dataset.image_size))
    model_cfg = resolved["model"]
    module = LesionClassifier(
        backbone=model_cfg["backbone"], dataset_name=dm.name, class_names=list(dm.class_names),
        head=model_cfg.get("head"), optimizer=model_cfg.get("optimizer"),
        scheduler=model_cfg.get("scheduler"), loss=model_cfg.get("loss"), image_size=image_size,
        mean=mean, std=std, pretrained=model_cfg.get("pretrained"),
        init_from=model_cfg.get("init_from"), config=resolved,
        compile=bool(model_cfg.get("compile", False)),
        compile_backend=model_cfg.get("compile_backend") or DEFAULT_BACKEND,
    )
    if cfg.get("ckpt_path"):
        log.info("resuming from %s (pretrained / init_from weights are not reloaded)", cfg.ckpt_path)
    else:
        module.load_initial_weights()

    callbacks = _instantiate_callbacks(cfg.get("callbacks"))
    if cfg.trainer.get("enable_progress_bar") is False:
        # Lightning refuses a progress-bar callback with the bar switched off
        from lightning.pytorch.callbacks.progress import ProgressBar

        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    callbacks.append(SaveSplit(run_dir / "splits.csv"))
    loggers = build_loggers(cfg.get("logger"))
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, strategy=_strategy(cfg, callbacks),
    )
    if trainer.is_global_zero:
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                hint = wandb_sync_hint(logger)
                if hint:
                    log.info("W&B is offline; upload this run later with: %s", hint)

    with _ddp_relaunch_argv(cfg.trainer, run_dir):
        trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))

    best_ckpt, best_score = _best_checkpoint(trainer)
    if trainer.is_global_zero:
        log.info("best checkpoint %s (%s = %s)", best_ckpt, cfg.optimized_metric, best_score)

    test_metrics: dict = {}
    if cfg.get("test", True):
        # fast_dev_run writes no checkpoint: test the weights in memory then
        results = trainer.test(module, datamodule=dm, ckpt_path=best_ckpt if best_ckpt else None)
        test_metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
        _write_test_outputs(run_dir, test_metrics, module, loggers)
        if cfg.get("print_report") and trainer.is_global_zero:
            _print_report(test_metrics, dm.name, best_ckpt)

    if cfg.get("evaluate", True) and best_ckpt and trainer.is_global_zero:
        _evaluate(best_ckpt, dm, run_dir, loggers)
        if cfg.get("print_report"):
            print(f"Calibrated report written to {run_dir / 'report'}", flush=True)

    if best_score is not None:
        return best_score
    value = trainer.callback_metrics.get(cfg.optimized_metric)
    return None if value is None else float(value)

