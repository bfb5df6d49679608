"""The console progress bar, showing the training loss without a host sync every step.

Lightning converts every ``prog_bar=True`` value to a Python number after every batch (a GPU
sync per step, whatever the bar's refresh rate). The module logs ``train/loss`` without
``prog_bar`` and this bar reads it only when it redraws (every ``refresh_rate`` batches).
"""

from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar

__all__ = ["TrainProgressBar", "TRAIN_LOSS_STEP"]

# the per-step key Lightning gives `self.log("train/loss", on_step=True, on_epoch=True)`
TRAIN_LOSS_STEP = "train/loss_step"


class TrainProgressBar(TQDMProgressBar):
    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        loss = trainer.callback_metrics.get(TRAIN_LOSS_STEP)
        if loss is not None and trainer.training:
            metrics[TRAIN_LOSS_STEP] = f"{float(loss):.3g}"
        return metrics
