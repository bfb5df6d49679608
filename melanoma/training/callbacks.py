"""The run's callbacks: those of the `callbacks` config group, and the split writer."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ModelSummary
from lightning.pytorch.callbacks.progress import ProgressBar
from omegaconf import DictConfig

from melanoma.training.guard import NonFiniteLossError

__all__ = ["FiniteModelCheckpoint", "ParameterSummary", "SaveSplit", "build_callbacks"]

log = logging.getLogger(__name__)


class FiniteModelCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, except that ``save_on_exception`` writes nothing when the
    exception is the NaN/Inf guard's: the weights in memory are the damaged ones, and saving them
    would overwrite best.ckpt / last.ckpt. (Any other save of non-finite weights is refused by
    LesionClassifier.on_save_checkpoint.)"""

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, NonFiniteLossError):
            if self.save_on_exception:
                log.warning("not saving a checkpoint on this exception: the weights are not finite; the last "
                            "good checkpoints in %s are kept", self.dirpath)
            return
        super().on_exception(trainer, pl_module, exception)


class ParameterSummary(ModelSummary):
    """Lightning's model summary without rows for parameter-free containers (the metric
    collections, confusion matrices and loss trackers): the table lists what trains."""

    def _summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        summary = super()._summary(trainer, pl_module)
        layers = getattr(summary, "_layer_summary", None)
        if isinstance(layers, dict):
            summary._layer_summary = {k: v for k, v in layers.items() if v.num_parameters > 0}
        return summary


class SaveSplit(Callback):
    """Write the datamodule's split table to <run>/splits.csv once the data is set up."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and trainer.datamodule is not None and hasattr(trainer.datamodule, "save_split"):
            trainer.datamodule.save_split(self.path)


def build_callbacks(cfg: DictConfig | None, progress_bar: bool = True) -> list[Callback]:
    """Every entry of the `callbacks` group (null entries switched off); a progress-bar callback
    is dropped when the bar is off (Lightning refuses the combination)."""
    callbacks = []
    for name, entry in (cfg or {}).items():
        if entry is None:
            continue
        if "_target_" not in entry:
            raise ValueError(f"callbacks.{name} has no _target_; found keys {list(entry)}")
        callback = hydra.utils.instantiate(entry)
        if progress_bar or not isinstance(callback, ProgressBar):
            callbacks.append(callback)
    return callbacks
