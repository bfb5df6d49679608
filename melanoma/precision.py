"""Numeric precision: resolving ``precision=auto`` and running a forward pass under it.

Training (``trainer.precision``, resolved by melanoma/workflows/training_run.py before the Trainer is built:
Lightning does not know "auto"):

- bf16-mixed on CUDA GPUs that support bf16;
- 16-mixed on older CUDA GPUs;
- on a CPU with native bf16 matmuls (flags ``amx_bf16`` or ``avx512_bf16``) bf16-mixed only for
  models wide enough that it pays (``embed_dim >= BF16_CPU_MIN_EMBED_DIM``, measured by
  experiments/bench_precision_cpu.py): on narrow models the casts cost more than the matmuls save;
- 32-true otherwise. On a CPU without those flags bf16 is emulated and several times slower
  than fp32, so auto never picks it there.

Inference (``melanoma predict/evaluate/recalibrate --precision``, serve, the post-fit report):
"auto" is full precision (``inference_precision``), so one checkpoint gives the same
probabilities and decisions on every machine and in ONNX. Lower precision only when asked.

The CPU flags come from /proc/cpuinfo, or from the file named by $MELANOMA_CPUINFO (how the test
suite mocks a machine with or without native bf16, subprocesses included).

Ground level: imports nothing from training, evaluation, inference or the CLI.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

__all__ = ["AUTO", "PRECISIONS", "BF16_CPU_FLAGS", "BF16_CPU_MIN_EMBED_DIM", "INFERENCE_DEFAULT",
           "autocast_context", "choose_precision", "cpu_flags", "inference_precision", "resolve_precision"]

AUTO = "auto"
# the values `--precision` accepts and auto resolves to (Lightning accepts more spellings in
# trainer.precision; those pass through resolve_precision unchanged)
PRECISIONS = (AUTO, "32-true", "bf16-mixed", "16-mixed")
# CPU flags of native bf16 matrix support (Intel AMX, AVX512-BF16; AMD Zen 4+ has avx512_bf16)
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# Training on a native-bf16 CPU: the narrowest ViT width (embed_dim) at which bf16-mixed trained
# faster than 32-true in every round of both recorded runs (experiments/results/bench_precision_cpu.md:
# width 64 about even in step time and 1.32x slower for the whole quickstart, 128 1.23x faster).
BF16_CPU_MIN_EMBED_DIM = 128
# what inference's "auto" means on every device: the precision calibrations are fitted at
INFERENCE_DEFAULT = "32-true"
CPUINFO = Path("/proc/cpuinfo")
CPUINFO_ENV = "MELANOMA_CPUINFO"


def cpu_flags(path: str | Path | None = None) -> set[str]:
    """The CPU feature flags of the first processor in /proc/cpuinfo, or in the file named by
    $MELANOMA_CPUINFO (empty when unreadable, e.g. on macOS or Windows: auto then keeps fp32 on
    the CPU)."""
    if path is None:
        path = os.environ.get(CPUINFO_ENV) or CPUINFO
    try:
        text = Path(path).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def _cuda_device(accelerator: str) -> bool:
    """Whether ``accelerator`` (a Lightning accelerator or a torch device string) means CUDA here."""
    kind = str(accelerator).split(":")[0].lower()
    if kind in ("gpu", "cuda"):
        return True
    if kind == "auto":
        return torch.cuda.is_available()
    return False


def choose_precision(
    accelerator: str = "auto",
    *,
    flags: Iterable[str] | Callable[[], Iterable[str]] | None = None,
    cuda_bf16: Callable[[], bool] | None = None,
    embed_dim: int | None = None,
) -> tuple[str, str]:
    """(precision, reason) for training on ``accelerator`` ("auto", "cpu", "gpu", "cuda", "cuda:1", "mps").

    ``embed_dim``: the model's width; on a native-bf16 CPU bf16 is picked only from
    BF16_CPU_MIN_EMBED_DIM on (None: width unknown, bf16 assumed to pay).

    ``flags``: the CPU flags, or a callable returning them (None: ``cpu_flags()``, /proc/cpuinfo).
    ``cuda_bf16``: a callable telling whether the GPU supports bf16 (default:
    ``torch.cuda.is_bf16_supported``). Both are injectable so tests can mock a machine.
    """
    if _cuda_device(accelerator):
        supported = (cuda_bf16 or _cuda_bf16_supported)()
        if supported:
            return "bf16-mixed", "CUDA GPU with bf16 support"
        return "16-mixed", "CUDA GPU without bf16 support"
    if str(accelerator).split(":")[0].lower() not in ("auto", "cpu"):
        return "32-true", f"accelerator {accelerator!r}: no mixed-precision rule, full precision"
    if flags is None:
        flags = cpu_flags  # looked up at call time, so tests can patch the module attribute
    found = set(flags() if callable(flags) else flags)
    native = [f for f in BF16_CPU_FLAGS if f in found]
    if native and embed_dim is not None and int(embed_dim) < BF16_CPU_MIN_EMBED_DIM:
        return "32-true", (f"CPU with native bf16 ({', '.join(native)}), but a model of width {embed_dim} < "
                           f"{BF16_CPU_MIN_EMBED_DIM} trains faster in fp32 there")
    if native:
        return "bf16-mixed", f"CPU with native bf16 ({', '.join(native)})"
    return "32-true", f"CPU without {' or '.join(BF16_CPU_FLAGS)} (bf16 would be emulated, slower than fp32)"


def _cuda_bf16_supported() -> bool:
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def resolve_precision(precision, accelerator: str = "auto", **machine) -> str:
    """``precision`` unchanged unless it is "auto"; then the rule above for ``accelerator``.
    ``machine``: the ``flags`` / ``cuda_bf16`` injections of ``choose_precision``."""
    if str(precision) != AUTO:
        return precision
    value, reason = choose_precision(accelerator, **machine)
    log.info("precision auto -> %s (%s)", value, reason)
    return value


def inference_precision(precision, device: str | torch.device = "cpu") -> str:
    """The forward-pass precision of inference: ``precision`` unchanged unless it is "auto", which
    is INFERENCE_DEFAULT (full precision) on every device, so that the same checkpoint gives the
    same decisions everywhere and at the precision its calibration was fitted at."""
    if str(precision) != AUTO:
        if str(precision) not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        return str(precision)
    return INFERENCE_DEFAULT


def autocast_context(precision, device: str | torch.device = "cpu", **machine):
    """A context manager running a forward pass at ``precision`` on ``device``: autocast to
    bf16/fp16 for the mixed precisions, nothing for full precision. "auto" is resolved for
    ``device`` first."""
    device = torch.device(device)
    value = str(resolve_precision(precision, device.type, **machine))
    dtype = {"bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16,
             "16-mixed": torch.float16, "16": torch.float16}.get(value)
    if dtype is None:
        if value not in ("32-true", "32", "64-true", "64"):
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
