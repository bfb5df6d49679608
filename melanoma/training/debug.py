"""Instrumentation and fault injection for tests of the training loop (DDP, resume, NaN).

Added from the command line like any callback, so it also reaches DDP child processes:
    python train.py +callbacks.debug._target_=melanoma.training.debug.RecordTraining \
        +callbacks.debug.out_dir=/tmp/rec +callbacks.debug.kill_at_step=7
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

__all__ = ["RecordTraining"]


class RecordTraining(Callback):
    """Per rank: the trainable layers at the first batch of every train epoch
    (``stages_rank<r>.jsonl``) and the parameters at the start and end of fit
    (``params_start_rank<r>.pt``, ``params_rank<r>.pt``); optionally SIGKILL the process after a
    given optimizer step, poison the head with NaN before a given step, or put an Inf into a
    gradient just before a given optimizer step."""

    def __init__(self, out_dir: str, kill_at_step: int | None = None, nan_at_step: int | None = None,
                 inf_grad_at_step: int | None = None):
        self.out_dir = Path(out_dir)
        self.kill_at_step = kill_at_step
        self.nan_at_step = nan_at_step
        self.inf_grad_at_step = inf_grad_at_step

    def _rank_file(self, trainer: pl.Trainer, stem: str, suffix: str) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return self.out_dir / f"{stem}_rank{trainer.global_rank}{suffix}"

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save_params(trainer, pl_module, "params_start")

    def _save_params(self, trainer, pl_module, stem: str) -> None:
        state = {k: v.detach().cpu().clone() for k, v in pl_module.model.state_dict().items()}
        torch.save(state, self._rank_file(trainer, stem, ".pt"))

    def _record_stage(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        layers = sorted(pl_module._trainable_layers) if pl_module._trainable_layers is not None else None
        record = {"epoch": trainer.current_epoch, "global_step": trainer.global_step,
                  "layers": layers, "trainable_params": pl_module.trainable_parameter_count(),
                  "frozen_prefix": pl_module._frozen_prefix}
        with self._rank_file(trainer, "stages", ".jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        # first batch of each epoch in this process: after a mid-epoch resume Lightning does not
        # rerun on_train_epoch_start, so recording there would miss the resumed epoch
        if getattr(self, "_recorded_epoch", None) != trainer.current_epoch:
            self._recorded_epoch = trainer.current_epoch
            self._record_stage(trainer, pl_module)
        if self.nan_at_step is not None and trainer.global_step == self.nan_at_step:
            with torch.no_grad():
                for p in pl_module.head.parameters():
                    p.fill_(float("nan"))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # callbacks run before the module's own hook, which must then refuse the step
        if self.inf_grad_at_step is not None and trainer.global_step == self.inf_grad_at_step:
            grad = next(p.grad for p in pl_module.head.parameters() if p.grad is not None)
            grad.view(-1)[0] = float("inf")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.kill_at_step is not None and trainer.global_step == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save_params(trainer, pl_module, "params")
