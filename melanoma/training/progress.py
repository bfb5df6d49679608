"""The console progress bar, showing the training loss without draining the GPU's queue.

Lightning converts every ``prog_bar=True`` value to a Python number after every batch (a GPU
sync per step, whatever the bar's refresh rate). The module logs no value to the bar; when this
bar redraws (every ``refresh_rate`` batches) it shows the loss the NaN/Inf guard has already
read on the host, one optimizer step late (``FiniteGuard.latest_loss``).
"""

from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar

from melanoma.training.metrics import TRAIN_LOSS_STEP

__all__ = ["TrainProgressBar"]


class TrainProgressBar(TQDMProgressBar):
    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        guard = getattr(pl_module, "guard", None)
        loss = guard.latest_loss() if guard is not None and trainer.training else None
        if loss is not None:
            metrics[TRAIN_LOSS_STEP] = f"{loss:.3g}"
        return metrics
