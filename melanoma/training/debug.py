"""Instrumentation and fault injection for tests of the training loop (DDP, resume, NaN, host syncs).

Added from the command line like any callback, so it also reaches DDP child processes:
    python train.py +callbacks.debug._target_=melanoma.training.debug.RecordTraining \
        +callbacks.debug.out_dir=/tmp/rec +callbacks.debug.kill_at_step=7
"""

from __future__ import annotations

import json
import os
import signal
import traceback
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils._python_dispatch import TorchDispatchMode

from melanoma.training.host import is_host_copy

__all__ = ["CountHostSyncs", "HostSyncCounter", "RecordTraining"]

_aten = torch.ops.aten
# Operations whose result the host must wait for on a GPU: a value read into Python (item,
# bool, float, equal) or an output whose size depends on the data (nonzero, unique, bincount's
# max, boolean-mask indexing, repeat_interleave without output_size).
_SYNC_OPS = {
    _aten._local_scalar_dense.default, _aten.equal.default, _aten.nonzero.default,
    _aten.masked_select.default, _aten._unique2.default, _aten.unique_dim.default,
    _aten.unique_consecutive.default, _aten.bincount.default, _aten.repeat_interleave.Tensor,
}
_MASK_INDEX_OPS = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default}
# code that reads tensors which stay in host memory in a GPU run: torch's optimizers keep their
# step counters there (unless capturable), the DataLoader's samplers and collation work there
_HOST_SIDE = (f"torch{os.sep}optim{os.sep}", f"torch{os.sep}utils{os.sep}data{os.sep}")
_WRAPPERS = (f"torch{os.sep}_dynamo{os.sep}", f"torch{os.sep}_compile.py", f"torch{os.sep}utils{os.sep}_python_dispatch.py")
# reads of a tensor's data into Python that never reach the dispatcher for a CPU tensor (on a
# GPU each is a device-to-host copy)
_HOST_READS = ("tolist", "numpy", "cpu")


class HostSyncCounter(TorchDispatchMode):
    """Counts, on any device, the operations that would make the host wait for a GPU.

    A GPU runs ahead of Python only while nothing reads its results: every ``.item()``,
    ``bool(tensor)``, ``.tolist()``, ``.cpu()`` or data-dependent shape stalls the host until the
    queue drains, and the GPU then idles while Python catches up. On a CPU nothing waits, so
    these stalls cannot be timed here; they can be counted, which is what a test can assert.
    ``events`` holds (operation, the innermost frame of our code or Lightning's that caused it)."""

    def __init__(self):
        super().__init__()
        self.events: list[tuple[str, str]] = []
        self._saved: dict[str, object] = {}

    def _record(self, what: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-2] if "debug.py" not in f.filename]
        while frames and any(part in frames[-1].filename for part in _WRAPPERS):
            frames.pop()  # torch's own wrappers around __torch_dispatch__
        if frames and any(part in frames[-1].filename for part in _HOST_SIDE):
            return  # the read is that host-side code's own (innermost frame), not a caller's
        ours = [f for f in frames if "/melanoma/" in f.filename or "lightning" in f.filename]
        where = ours[-1] if ours else frames[-1]
        self.events.append((what, f"{Path(where.filename).name}:{where.lineno} {where.name}"))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SYNC_OPS:
            if args and isinstance(args[0], torch.Tensor) and is_host_copy(args[0]):
                return func(*args, **kwargs)  # a finished copy in host memory: nothing to wait for
            self._record(str(func.overloadpacket.__name__))
        elif func in _MASK_INDEX_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices):
                self._record(f"{func.overloadpacket.__name__} (boolean mask)")
        return func(*args, **kwargs)

    def __enter__(self):
        for name in _HOST_READS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def read(tensor, *a, _name=name, _original=original, **kw):
                if not is_host_copy(tensor):
                    self._record(_name)
                return _original(tensor, *a, **kw)

            setattr(torch.Tensor, name, read)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()
        return super().__exit__(*exc)


class CountHostSyncs(Callback):
    """Host syncs per training step, counted from one ``on_train_batch_start`` to the next (the
    step, Lightning's bookkeeping after it and the next batch's fetch), from batch ``start`` of
    the first epoch on. ``steps`` holds one list of ``HostSyncCounter.events`` per step;
    ``out`` (optional) receives them as JSON at the end of fit."""

    def __init__(self, start: int = 1, out: str | None = None):
        self.start = int(start)
        self.out = Path(out) if out else None
        self.steps: list[list[tuple[str, str]]] = []
        self._counter: HostSyncCounter | None = None

    def _close(self) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.steps.append(self._counter.events)
            self._counter = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._close()
        if trainer.current_epoch == 0 and batch_idx >= self.start:
            self._counter = HostSyncCounter()
            self._counter.__enter__()

    def on_validation_start(self, trainer, pl_module) -> None:
        # a step ends where validation (or, without it, the epoch's end) begins
        self._close()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._close()

    def on_train_end(self, trainer, pl_module) -> None:
        self._close()
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(json.dumps(self.steps, indent=1))


class RecordTraining(Callback):
    """Per rank: the trainable layers at the first batch of every train epoch
    (``stages_rank<r>.jsonl``) and the parameters at the start and end of fit
    (``params_start_rank<r>.pt``, ``params_rank<r>.pt``), each step's loss and batch size
    (``losses_rank<r>.jsonl``); optionally SIGKILL the process after a
    given optimizer step, poison the head with NaN before a given step, or put an Inf into a
    gradient just before a given optimizer step."""

    def __init__(self, out_dir: str, kill_at_step: int | None = None, nan_at_step: int | None = None,
                 inf_grad_at_step: int | None = None, nan_rank: int | None = None):
        self.out_dir = Path(out_dir)
        self.kill_at_step = kill_at_step
        self.nan_at_step = nan_at_step
        self.inf_grad_at_step = inf_grad_at_step
        self.nan_rank = nan_rank  # poison only this rank (None: every rank)

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
        if (self.nan_at_step is not None and trainer.global_step == self.nan_at_step
                and self.nan_rank in (None, trainer.global_rank)):
            with torch.no_grad():
                for p in pl_module.head.parameters():
                    p.fill_(float("nan"))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # callbacks run before the module's own hook, which must then refuse the step
        if self.inf_grad_at_step is not None and trainer.global_step == self.inf_grad_at_step:
            grad = next(p.grad for p in pl_module.head.parameters() if p.grad is not None)
            grad.view(-1)[0] = float("inf")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        record = {"epoch": trainer.current_epoch, "step": trainer.global_step - 1,
                  "loss": float(outputs["loss"]), "images": len(batch[1])}
        with self._rank_file(trainer, "losses", ".jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.kill_at_step is not None and trainer.global_step == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save_params(trainer, pl_module, "params")
