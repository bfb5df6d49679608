"""An exponential moving average of the weights that is what gets validated, tested, checkpointed
and exported, and that resumes exactly.

Lightning's ``EMAWeightAveraging`` already swaps the EMA in for validation, writes it as the
checkpoint's ``state_dict`` (which the checkpoint contract, ``melanoma.models.checkpoint``, reads:
evaluate, predict and export use the EMA) and the raw weights as ``current_model_state``. Two
gaps for this project's flow, closed here:

* at the end of fit it copies the EMA into the model *before* ``ModelCheckpoint`` writes the final
  ``last.ckpt`` (Lightning runs checkpoint callbacks last), so that file's raw weights were the EMA
  and extending a finished run restarted from the EMA: the raw weights are kept for that save;
* it restores ``current_model_state`` into the model on every checkpoint load, also in
  ``trainer.test(ckpt_path=best)`` after fit: the test then ran on the raw weights. Outside fit
  the checkpoint's ``state_dict`` (the EMA) is left in place;
* its update runs ``avg_fn`` once per tensor (a Python loop of ~150 kernel pairs for a ViT):
  34% of a vit_small step on an H100 (experiments/results/bench_ema.md). Here the same EMA is one
  foreach lerp over all tensors (torch's ``get_ema_multi_avg_fn``).
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from torch.optim.swa_utils import get_ema_multi_avg_fn

__all__ = ["EMAWeights"]


class EMAWeights(EMAWeightAveraging):
    """``EMAWeightAveraging`` (same arguments: ``decay``, ``update_every_n_steps``,
    ``update_starting_at_step`` ...) with exact resume and EMA testing; see the module doc."""

    def __init__(self, decay: float = 0.999, **kwargs):
        super().__init__(decay=decay, **kwargs)
        # the parent hands AveragedModel a per-tensor avg_fn (its only way to set the decay);
        # AveragedModel takes one of avg_fn / multi_avg_fn: the same EMA, as one foreach lerp
        if "avg_fn" not in self._kwargs:
            raise RuntimeError("EMAWeights: Lightning's EMAWeightAveraging no longer passes avg_fn; "
                               "check melanoma/training/ema.py against the installed Lightning")
        del self._kwargs["avg_fn"]
        self._kwargs["multi_avg_fn"] = get_ema_multi_avg_fn(decay)
        self._raw_state: dict | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._raw_state = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._raw_state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._raw_state is not None and "current_model_state" in checkpoint:
            checkpoint["current_model_state"] = self._raw_state

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
