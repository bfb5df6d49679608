"""The console progress bar, showing the training loss without draining the GPU's queue.

Lightning converts every ``prog_bar=True`` value to a Python number after every batch (a GPU
sync per step, whatever the bar's refresh rate). The module logs no value to the bar; when this
bar redraws (every ``refresh_rate`` batches) it shows the previous step's loss, copied to the
host without waiting (``LesionClassifier.train_loss_copies``): reading it waits for that copy
only, while the current step's kernels keep the GPU busy.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar

from melanoma.training.metrics import TRAIN_LOSS_STEP

__all__ = ["TrainProgressBar"]


class TrainProgressBar(TQDMProgressBar):
    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        copies = getattr(pl_module, "train_loss_copies", None)
        if copies and trainer.training:
            metrics[TRAIN_LOSS_STEP] = f"{float(copies[0].value()):.3g}"
        return metrics
