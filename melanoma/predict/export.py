"""ONNX export of one head of a checkpoint, checked against onnxruntime before it is kept.

The graph takes normalised images (B, 3, S, S) and returns the raw `logits` and the calibrated
`probabilities` (the head's calibration map folded in; raw softmax with ``calibrated=False`` or
for an uncalibrated head). Everything an outside consumer needs to reproduce `melanoma predict`
with PIL and numpy alone (image size, mean/std, PIL resampling, class names, positive index, the
operating point on the `probabilities` scale) goes into the ONNX metadata and `<out>.json`."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from melanoma.models.checkpoint import Calibration
from melanoma.models.classifier import Classifier

log = logging.getLogger(__name__)

ONNX_OPSET = 17


class ExportError(RuntimeError):
    """The exported graph does not reproduce the PyTorch model."""


class HeadModel(nn.Module):
    """Classifier restricted to one head, calibration folded in: x -> (raw logits, calibrated
    probabilities = softmax(logits / T + bias))."""

    def __init__(self, model: Classifier, head: str, calibration: Calibration | None = None):
        super().__init__()
        self.model = model
        self.head = head
        cal = calibration or Calibration()
        num_classes = len(model.heads[head].class_names)
        bias = cal.bias or (0.0,) * num_classes
        self.register_buffer("temperature", torch.tensor(cal.temperature), persistent=False)
        self.register_buffer("bias", torch.tensor(bias, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor, metadata: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x, self.head, metadata=metadata)
        return logits, torch.softmax(logits / self.temperature + self.bias, dim=1)


def export_onnx(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike | None = None,
    head: str | None = None,
    calibrated: bool = True,
    atol: float = 1e-4,
    check_batch: int = 2,
) -> dict:
    """Write `out` (default: the checkpoint's path with .onnx) and `out`.json; verify with
    onnxruntime on a random batch. Returns the sidecar dict plus "max_abs_diff"."""
    import onnx
    import onnxruntime as ort

    checkpoint = Path(checkpoint)
    model, meta = Classifier.from_checkpoint(checkpoint)
    head = meta.choose_head(head)
    record = meta.heads[head]
    stored, warning = record.calibration_for(tta=False)
    if warning:
        log.warning("head %r: %s", head, warning)
    calibration = stored if calibrated else None
    wrapped = HeadModel(model, head, calibration).eval()
    pre = meta.preprocessing
    size = pre.image_size
    out = Path(out) if out else checkpoint.with_suffix(".onnx")
    out.parent.mkdir(parents=True, exist_ok=True)

    example = torch.randn(check_batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    # a head that fuses patient metadata takes it as a second input, `metadata` (melanoma.metadata)
    schema = record.metadata_schema
    width = 0 if schema is None else len(schema["columns"])

    def inputs(x: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
        if schema is None:
            return (x,)
        return (x, torch.rand(len(x), width, generator=torch.Generator().manual_seed(seed)).round())

    def feeds(args: tuple[torch.Tensor, ...]) -> dict:
        return dict(zip(["image", "metadata"], (a.numpy() for a in args)))

    example_in = inputs(example, 0)
    with torch.no_grad(), warnings.catch_warnings():
        # the legacy exporter is chosen on purpose (dynamo=False); its deprecation notice and the
        # tracer's note on the patch-size check (a constant for a fixed-size model) are noise
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            wrapped, example_in, str(out),
            dynamo=False,  # the TorchScript-based exporter: no onnxscript needed, dynamic batch works
            input_names=["image", "metadata"][:len(example_in)], output_names=["logits", "probabilities"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}, "probabilities": {0: "batch"},
                          **({"metadata": {0: "batch"}} if schema is not None else {})},
            opset_version=ONNX_OPSET,
        )
        expected = [t.numpy() for t in wrapped(*example_in)]

    pos = record.positive_index
    threshold = None
    if stored is not None and pos is not None and stored.threshold is not None:
        threshold = stored.threshold if calibrated else stored.threshold_on_raw_scale(len(record.class_names), pos)
        if threshold is None:
            log.warning("--uncalibrated: a %d-class head has no threshold on raw probabilities that reproduces "
                        "its operating point; the sidecar carries none", len(record.class_names))
    sidecar = {
        "checkpoint": str(checkpoint),
        "head": head,
        "backbone": meta.backbone_record(),
        "class_names": record.class_names,
        "positive_index": pos,
        "image_size": size,
        "mean": list(pre.mean),
        "std": list(pre.std),
        "interpolation": pre.interpolation,
        "exif_transpose": True,
        "calibrated": calibration is not None,
        "calibration": None if calibration is None else {
            "method": calibration.method, "temperature": calibration.temperature, "bias": list(calibration.bias)},
        "operating_point": None if threshold is None else {
            "threshold": threshold, "target_sensitivity": stored.target_sensitivity,
            "applies_to": "probabilities", "rule": "melanoma when probabilities[:, positive_index] >= threshold"},
        "inputs": {"image": (f"float32 (batch, 3, {size}, {size}): ImageOps.exif_transpose(Image.open(path))"
                             f".convert('RGB').resize(({size}, {size}), Image.Resampling.{pre.interpolation.upper()}), "
                             f"/ 255, then (x - mean) / std, channels first")},
        "outputs": {"logits": "(batch, classes), raw (uncalibrated)",
                    "probabilities": "(batch, classes), softmax of the calibrated logits" if calibration is not None
                    else "(batch, classes), softmax of the raw logits (uncalibrated)"},
    }
    if schema is not None:
        sidecar["metadata"] = dict(schema)
        sidecar["inputs"]["metadata"] = (f"float32 (batch, {width}): per image the entries {schema['columns']}; age / "
                                         f"{schema['encodings'].get('age', {}).get('scale')}, one-hot sex and site "
                                         f"(see metadata.encodings), 1 in <field>_missing (and 0 elsewhere in that "
                                         f"field) for a value not recorded")
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    for key, value in sidecar.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(proto, str(out))

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    # a second batch size too: the batch axis must really be dynamic
    other = inputs(torch.randn(check_batch + 1, 3, size, size, generator=torch.Generator().manual_seed(1)), 1)
    with torch.no_grad():
        other_expected = [t.numpy() for t in wrapped(*other)]
    diff = 0.0
    for x, want in ((example_in, expected), (other, other_expected)):
        got = session.run(["logits", "probabilities"], feeds(x))
        if not all(np.isfinite(a).all() for a in (*got, *want)):
            out.unlink(missing_ok=True)
            raise ExportError(
                f"the model's outputs are not finite (NaN/Inf) on the verification batch (PyTorch or onnxruntime); "
                f"nothing was exported. Check {checkpoint} (`melanoma evaluate` on it), or export an earlier checkpoint"
            )
        diff = max(diff, *(float(np.abs(g - e).max()) for g, e in zip(got, want)))
    if not diff <= atol:
        raise ExportError(
            f"onnxruntime output differs from PyTorch by {diff:.2e} (> {atol:.0e}) for {out}; "
            f"the export is not faithful. Please report it with the checkpoint's backbone {meta.backbone}"
        )
    sidecar["max_abs_diff"] = diff
    Path(f"{out}.json").write_text(json.dumps(sidecar, indent=2))
    log.info("exported %s (head %r, max |onnxruntime - torch| = %.2e)", out, head, diff)
    return {**sidecar, "path": str(out)}
