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
* its update (``AveragedModel.update_parameters``) runs ``avg_fn`` once per tensor (a Python loop
  of ~150 kernel pairs for a ViT) and reads ``n_averaged`` from the device every step (a host
  sync that stalls the GPU's queue): 40% of a vit_small step on an H100, still 10% with torch's
  foreach ``multi_avg_fn`` (experiments/results/bench_ema.md). Here the same EMA (the first
  update copies, then ``ema += (1 - decay) * (w - ema)``) is one foreach lerp over tensor lists
  built once per fit, with the update count mirrored on the host.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EMAWeightAveraging
import itertools

import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

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
        self.decay = float(decay)
        # (averaged, current) float tensors, other tensors, host copy of n_averaged: set per fit
        self._pairs: tuple[list, list, list, list] | None = None
        self._n_averaged: int | None = None
        self._raw_state: dict | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._raw_state = None
        self._pairs = self._n_averaged = None  # modules may have been rebuilt (heads on resume)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        # the parent's hook, with the update below in place of AveragedModel.update_parameters
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=trainer.global_step - 1):
            self._update(pl_module)
            self._latest_update_step = trainer.global_step

    def _update(self, pl_module: pl.LightningModule) -> None:
        average = self._average_model
        if self._pairs is None:
            tensors = lambda m: [t.detach() for t in itertools.chain(  # noqa: E731
                m.parameters(), m.buffers() if self._use_buffers else ())]
            avg, cur = tensors(average.module), tensors(pl_module)
            if len(avg) != len(cur):
                raise RuntimeError(f"EMAWeights: the averaged copy has {len(avg)} tensors, the model "
                                   f"{len(cur)}; the model changed after fit started")
            floats = [i for i, t in enumerate(avg) if t.is_floating_point()]
            others = [i for i in range(len(avg)) if i not in set(floats)]
            self._pairs = ([avg[i] for i in floats], [cur[i] for i in floats],
                           [avg[i] for i in others], [cur[i] for i in others])
            self._n_averaged = int(average.n_averaged)  # one device read per fit
        avg_f, cur_f, avg_o, cur_o = self._pairs
        if self._n_averaged == 0:
            torch._foreach_copy_(avg_f, cur_f)
        else:
            torch._foreach_lerp_(avg_f, cur_f, 1.0 - self.decay)
        if avg_o:
            torch._foreach_copy_(avg_o, cur_o)
        average.n_averaged += 1
        self._n_averaged += 1

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._raw_state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._raw_state is not None and "current_model_state" in checkpoint:
            checkpoint["current_model_state"] = self._raw_state

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            # the averaged copy was made in setup, before LesionClassifier.on_load_checkpoint
            # rebuilt the checkpoint's other heads: copy the model again so the state fits
            self._average_model = AveragedModel(model=pl_module, device=self._device or pl_module.device,
                                                use_buffers=self._use_buffers, **self._kwargs)
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
            self._pairs = self._n_averaged = None
