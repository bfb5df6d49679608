"""The console progress bar, showing the training loss without a host sync every step.

Lightning converts every ``prog_bar=True`` value to a Python number after every batch (a GPU
sync per step, whatever the bar's refresh rate). The module logs no value to the bar; this bar
reads the module's latest training loss only when it redraws (every ``refresh_rate`` batches).
"""

from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar

from melanoma.training.metrics import TRAIN_LOSS_STEP

__all__ = ["TrainProgressBar"]


class TrainProgressBar(TQDMProgressBar):
    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        loss = getattr(pl_module, "latest_train_loss", None)
        if loss is not None and trainer.training:
            metrics[TRAIN_LOSS_STEP] = f"{float(loss):.3g}"
        return metrics
