"""ONNX export of one head of a checkpoint, checked against onnxruntime before it is kept.

The graph takes normalised images (B, 3, S, S) and returns logits and probabilities; with
calibration the stored temperature is folded into both. Everything a deployment needs besides
the graph (class names, mean/std, image size, operating point) goes into the ONNX metadata and
a JSON file beside it."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from melanoma.inference import choose_head, head_operating_point, head_temperature, meta_interpolation
from melanoma.models.classifier import Classifier

log = logging.getLogger(__name__)

ONNX_OPSET = 17


class ExportError(RuntimeError):
    """The exported graph does not reproduce the PyTorch model."""


class HeadModel(nn.Module):
    """Classifier restricted to one head, temperature folded in: x -> (logits, probabilities)."""

    def __init__(self, model: Classifier, head: str, temperature: float = 1.0):
        super().__init__()
        self.model = model
        self.head = head
        self.register_buffer("temperature", torch.tensor(float(temperature)), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x, self.head) / self.temperature
        return logits, torch.softmax(logits, dim=1)


def export_onnx(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike | None = None,
    head: str | None = None,
    calibrated: bool = False,
    atol: float = 1e-4,
    check_batch: int = 2,
) -> dict:
    """Write `out` (default: the checkpoint's path with .onnx) and `out`.json; verify with
    onnxruntime on a random batch. Returns the sidecar dict plus "max_abs_diff"."""
    import onnx
    import onnxruntime as ort

    checkpoint = Path(checkpoint)
    model, meta = Classifier.from_checkpoint(checkpoint)
    head = choose_head(meta, head)
    temperature = head_temperature(meta, head) if calibrated else 1.0
    wrapped = HeadModel(model, head, temperature).eval()
    size = int(meta["image_size"])
    out = Path(out) if out else checkpoint.with_suffix(".onnx")
    out.parent.mkdir(parents=True, exist_ok=True)

    example = torch.randn(check_batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        # the legacy exporter is chosen on purpose (dynamo=False); its deprecation notice and the
        # tracer's note on the patch-size check (a constant for a fixed-size model) are noise
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            wrapped, (example,), str(out),
            dynamo=False,  # the TorchScript-based exporter: no onnxscript needed, dynamic batch works
            input_names=["image"], output_names=["logits", "probabilities"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}, "probabilities": {0: "batch"}},
            opset_version=ONNX_OPSET,
        )
        expected = [t.numpy() for t in wrapped(example)]

    op = head_operating_point(meta, head)
    sidecar = {
        "checkpoint": str(checkpoint),
        "head": head,
        "class_names": list(meta["heads"][head]["class_names"]),
        "image_size": size,
        "mean": list(meta["mean"]),
        "std": list(meta["std"]),
        "interpolation": meta_interpolation(meta),
        "calibrated": bool(calibrated),
        "temperature": float(temperature),
        "operating_point": op,
        "inputs": {"image": "float32 (batch, 3, %d, %d), RGB scaled to [0, 1] then (x - mean) / std" % (size, size)},
        "outputs": {"logits": "(batch, classes)", "probabilities": "(batch, classes), softmax of logits"},
    }
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    for key, value in sidecar.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(proto, str(out))

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    # a second batch size too: the batch axis must really be dynamic
    other = torch.randn(check_batch + 1, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        other_expected = [t.numpy() for t in wrapped(other)]
    diff = 0.0
    for x, want in ((example, expected), (other, other_expected)):
        got = session.run(["logits", "probabilities"], {"image": x.numpy()})
        diff = max(diff, *(float(np.abs(g - e).max()) for g, e in zip(got, want)))
    if not diff <= atol:
        raise ExportError(
            f"onnxruntime output differs from PyTorch by {diff:.2e} (> {atol:.0e}) for {out}; "
            f"the export is not faithful. Please report it with the checkpoint's backbone {meta['backbone']}"
        )
    sidecar["max_abs_diff"] = diff
    Path(f"{out}.json").write_text(json.dumps(sidecar, indent=2))
    log.info("exported %s (head %r, max |onnxruntime - torch| = %.2e)", out, head, diff)
    return {**sidecar, "path": str(out)}
