"""Device values read on the host without draining the GPU's queue.

Reading a device tensor in Python (``.item()``, ``float``, ``.tolist()``) waits for every kernel
queued so far; the GPU then idles while Python prepares the next step. ``HostCopy`` starts a
non-blocking copy into pinned host memory and records an event; ``value()`` later waits only for
that copy (the kernels queued after it keep the GPU busy). On a CPU the copy is the tensor itself.
"""

from __future__ import annotations

import torch

__all__ = ["HostCopy", "is_host_copy"]

# set on a tensor that lives in host memory by design (melanoma.training.debug.HostSyncCounter
# leaves reads of it out)
_MARK = "_melanoma_host_copy"


def is_host_copy(tensor: torch.Tensor) -> bool:
    return bool(getattr(tensor, _MARK, False))


class HostCopy:
    """A detached device tensor on its way to host memory."""

    def __init__(self, tensor: torch.Tensor):
        tensor = tensor.detach()
        self._event = None
        if tensor.is_cuda:
            tensor = tensor.to("cpu", non_blocking=True)  # pinned memory, no wait
            self._event = torch.cuda.Event()
            self._event.record()
        setattr(tensor, _MARK, True)
        self._tensor = tensor

    def value(self) -> torch.Tensor:
        """The host tensor, once its copy finished (waiting for that copy only)."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._tensor
