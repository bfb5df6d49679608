"""How DataLoader worker processes start: never by a plain fork of a process that has threads.

A forked child gets a copy of every lock as it was at that instant, but only the forking thread.
A lock another thread held then (torch's and onnxruntime's thread pools, W&B's and the progress
bar's threads, a logging handler) stays held in the child forever, and the worker that needs it
waits on a futex until someone kills the run. Training forks its loader workers after such
threads ran, and so does `melanoma evaluate`.

``forkserver`` (the default start method from Python 3.14 on) forks workers from a small server
process that started clean and single-threaded; it imports the workers' code once (the preload below),
so each worker starts in milliseconds instead of importing torch again like ``spawn``. Platforms
without it (Windows, and macOS where it is not the default) use ``spawn``.
"""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing.context import BaseContext

__all__ = ["WORKER_START_METHOD", "worker_context"]

WORKER_START_METHOD = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
# imported once by the fork server, before it forks any worker: what workers run (torch, OpenCV,
# albumentations), without the DataModule's Lightning
_FORKSERVER_PRELOAD = ["melanoma.data.dataset"]


def worker_context(num_workers: int) -> BaseContext | None:
    """The multiprocessing context for a DataLoader with ``num_workers`` (None without workers:
    the loader then runs in this process)."""
    if num_workers <= 0:
        return None
    ctx = mp.get_context(WORKER_START_METHOD)
    if WORKER_START_METHOD == "forkserver":
        ctx.set_forkserver_preload(_FORKSERVER_PRELOAD)
    return ctx
