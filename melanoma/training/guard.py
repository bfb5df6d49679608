"""The NaN/Inf guard of training: a non-finite loss or gradient stops the run before any
checkpoint of the damaged weights is written, without making the host wait for the GPU.

Reading a device value in Python (``.item()``, ``bool``, ``.tolist()``) drains the GPU's queue,
and the GPU then idles while Python prepares the next step; a sync per step cost 10-40% of a step
on an H100 (experiments/results/bench_ema.md). So the guard reads each optimizer step's verdict
one step late: the verdict (bad loss on any rank, gradient norm finite, and the step's loss, which
the progress bar shows) is computed on the device before the optimizer step and copied to the
host without waiting; it is read at the next
optimizer step, when the GPU finished it long ago, and at once wherever the weights leave the
step loop: before validation, before a checkpoint is written, at the end of training. A bad step
therefore reaches the weights in memory, but never a checkpoint, a validation or a report; the
run stops with the step, batch and value that went wrong.
"""

from __future__ import annotations

import torch

from melanoma.training.host import HostCopy

__all__ = ["FiniteGuard", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradients became NaN/Inf; raised before any checkpoint of the damaged
    weights can be written."""


class FiniteGuard:
    """One optimizer step's checks, read one step late (see the module docstring).

    ``loss(loss, batch_idx)`` after each forward (micro-batches of one optimizer step accumulate);
    ``step(...)`` before each optimizer step returns the gradient norm, checks the previous step
    and queues this one; ``check()`` reads a queued verdict now. The verdict carries the step's
    (last micro-batch's) loss too: ``latest_loss()`` is what the progress bar shows."""

    def __init__(self):
        self._loss_finite: torch.Tensor | None = None
        self._last_loss: tuple[torch.Tensor, int] | None = None
        self._pending: dict | None = None
        self._read_loss: float | None = None  # the loss of the latest verdict read on the host
        # the first failure, raised again by every later check: a checkpoint written while the
        # exception unwinds (ModelCheckpoint's save_on_exception) must not find the guard satisfied
        self.failure: str | None = None

    def loss(self, loss: torch.Tensor, batch_idx: int) -> None:
        finite = torch.isfinite(loss.detach())
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
        self._last_loss = (loss.detach(), batch_idx)

    def step(self, grads: list[torch.Tensor], reduce_sum, check_norm: bool, epoch: int,
             global_step: int) -> torch.Tensor | None:
        """Queue this optimizer step's verdict, after reading the previous one. ``reduce_sum``
        sums a tensor over the ranks (every rank must stop at the same step, or the others wait
        forever in the next all-reduce); ``check_norm`` is False under fp16 loss scaling, where
        an overflow is routine and the GradScaler skips that step itself."""
        self.check()
        loss_finite, self._loss_finite = self._loss_finite, None
        # one fused (foreach) norm over all gradients instead of one kernel per tensor
        norm = torch.nn.utils.get_total_norm(grads) if grads else None
        checks = {}
        if loss_finite is not None:
            checks["bad_ranks"] = reduce_sum((~loss_finite).float())
        if norm is not None and check_norm:
            # grads are all-reduced by now, so every rank sees the same norm
            checks["norm_finite"] = torch.isfinite(norm).float()
        if self._last_loss is not None:
            checks["loss"] = self._last_loss[0]  # not a check: carried to the host for the progress bar
        if checks:
            verdict = HostCopy(torch.stack([v.float().reshape(()) for v in checks.values()]))
            self._pending = {"names": list(checks), "verdict": verdict, "norm": norm,
                             "loss": self._last_loss, "epoch": epoch, "global_step": global_step}
        return norm

    def check(self) -> None:
        """Read the queued verdict (waiting for it if the GPU is not there yet) and raise on a
        non-finite loss or gradient norm."""
        if self.failure is not None:
            raise NonFiniteLossError(self.failure)
        pending, self._pending = self._pending, None
        if pending is None:
            return
        verdict = dict(zip(pending["names"], pending["verdict"].value().tolist()))
        self._read_loss = verdict.get("loss", self._read_loss)
        where = f"at epoch {pending['epoch']}, global step {pending['global_step']}"
        if verdict.get("bad_ranks", 0) > 0:
            loss, batch_idx = pending["loss"]
            self.failure = (
                f"training loss is not finite ({loss.item()} on this rank) {where}, batch {batch_idx}. "
                f"The run stopped before writing any checkpoint of that step's weights: the last good "
                f"one is in the checkpoints folder. Lower the learning rate (model.optimizer.lr / "
                f"head_lr), use precision 32-true, set trainer.gradient_clip_val, or check the input "
                f"images."
            )
        elif verdict.get("norm_finite", 1) == 0:
            self.failure = (
                f"gradient norm is {pending['norm'].item()} {where}: the run stopped before writing "
                f"any checkpoint of that step's weights. Lower the learning rate or set "
                f"trainer.gradient_clip_val."
            )
        if self.failure is not None:
            raise NonFiniteLossError(self.failure)

    def latest_loss(self) -> float | None:
        """The training loss of the latest optimizer step read on the host (one step late, so no
        wait); before the first read, the queued step's, waiting for its copy only."""
        if self._read_loss is None and self._pending is not None and "loss" in self._pending["names"]:
            values = self._pending["verdict"].value().tolist()
            return values[self._pending["names"].index("loss")]
        return self._read_loss
