"""The model side of `melanoma serve`: checks uploads, runs `Predictor`, returns records.

One Predictor per (head, tta), built on first use. Every use of a model holds one lock: a
request runs the model alone (torch already uses every core for one batch), and concurrent
requests queue instead of racing on the same modules.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from melanoma.explain.gradcam import default_method, methods_for
from melanoma.predict import NonFiniteOutputError, Predictor
from melanoma.predict.predictor import HEADS_MAP, MAPS_FIELD
from melanoma.serve.limits import ServeLimits
from melanoma.serve.model_info import calibration_summary, describe_model

log = logging.getLogger(__name__)

HEADS_OVERLAY = HEADS_MAP  # last-layer attention per head (the Predictor's per-head grid)
NO_OVERLAY = "none"
#: the overlays of a ViT checkpoint (a CNN's: ``gradcam`` and ``none``; ``ModelService.overlay_methods``)
OVERLAY_METHODS = ("rollout", "grad_rollout", "last_layer", HEADS_OVERLAY, NO_OVERLAY)
DEFAULT_OVERLAY = "rollout"


def overlays_for(backbone) -> tuple[str, ...]:
    """The overlays the web page offers for a backbone: its map methods (melanoma.explain), the
    per-head grid where attention weights are read, and none."""
    methods = methods_for(backbone)
    if getattr(backbone, "reads_attention", False):
        return OVERLAY_METHODS
    return (*methods, NO_OVERLAY)
IN_MEMORY_FILE = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")
# record fields that name files in the request's temp dir: replaced by `filename` / `overlay_png`
SERVER_ONLY_FIELDS = ("path", "attention", MAPS_FIELD)


@dataclass(frozen=True)
class Upload:
    filename: str
    data: bytes


@dataclass
class ServeError(Exception):
    """A request the server refuses: HTTP status, a message, and per-file reasons."""

    status: int
    message: str
    files: list[dict] = field(default_factory=list)

    def __str__(self) -> str:
        return self.message


class ModelService:
    def __init__(self, checkpoint: str | os.PathLike, head: str | None = None, device: str = "cpu",
                 limits: ServeLimits | None = None):
        self.checkpoint = Path(checkpoint)
        self.device = device
        self.limits = limits or ServeLimits()
        self.predictors: dict[tuple[str, bool], Predictor] = {}
        self._lock = threading.Lock()
        # built now: a bad checkpoint, head or device fails at start, not on the first upload
        default = self._predictor(head, False)
        self.default_head = default.head
        self.model = describe_model(default.meta)
        self.overlay_methods = overlays_for(default.model.backbone)
        self.default_overlay = default_method(default.model.backbone) or NO_OVERLAY

    def _predictor(self, head: str | None, tta: bool) -> Predictor:
        if (head, tta) in self.predictors:
            return self.predictors[(head, tta)]
        predictor = Predictor(self.checkpoint, head=head, device=self.device, tta=tta, progress=False)
        self.predictors[(predictor.head, tta)] = predictor  # head None resolves to the active head
        return predictor

    def check_options(self, head: str | None, overlay: str) -> str:
        head = head or self.default_head
        if head not in self.model["heads"]:
            raise ServeError(400, f"no head named {head!r} in this checkpoint; choose one of {list(self.model['heads'])}")
        if overlay not in self.overlay_methods:
            raise ServeError(400, f"unknown overlay {overlay!r} for this checkpoint's backbone; choose one of "
                                  f"{list(self.overlay_methods)}")
        return head

    def check_uploads(self, uploads: list[Upload]) -> None:
        """Refuse, before decoding anything, what cannot be an image or is too large to decode."""
        if not uploads:
            raise ServeError(400, "no files in the request: send one or more images as multipart/form-data "
                                  "fields named 'file'")
        if len(uploads) > self.limits.max_files:
            raise ServeError(413, f"{len(uploads)} files in one request; this server takes at most "
                                  f"{self.limits.max_files} (send several requests, or start it with --max-files)")
        too_large, unreadable = [], []
        for up in uploads:
            if not up.data:
                unreadable.append({"filename": up.filename, "error": "file is empty (0 bytes)"})
                continue
            try:
                with Image.open(io.BytesIO(up.data)) as img:  # reads the header only
                    width, height = img.size
            except Image.DecompressionBombError as e:
                too_large.append({"filename": up.filename, "error": f"too many pixels to decode ({e})"})
                continue
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
                # PIL names the in-memory buffer (<_io.BytesIO object at 0x...>): name the file
                reason = IN_MEMORY_FILE.sub(up.filename, f"{type(e).__name__}: {e}")
                unreadable.append({"filename": up.filename,
                                   "error": f"not a readable image ({reason}); "
                                            f"send a JPEG, PNG, BMP or TIFF photograph"})
                continue
            if width * height > self.limits.max_pixels:
                too_large.append({"filename": up.filename,
                                  "error": f"{width}x{height} = {width * height} pixels, above this server's limit "
                                           f"of {self.limits.max_pixels} pixels (resize the image, or start the "
                                           f"server with --max-pixels)"})
        if unreadable or too_large:
            status = 413 if not unreadable else 422
            names = ", ".join(f["filename"] for f in unreadable + too_large)
            raise ServeError(status, f"cannot predict {names}: see the reason per file", unreadable + too_large)

    def per_image_metadata(self, predictor: Predictor, metadata: dict[str, list[str]] | None,
                           n: int) -> list[dict] | None:
        """Form fields age/sex/site (one value for all images, or one per image) as per-image
        records for a head that fuses metadata; None (no fields) scores every value as missing."""
        if not metadata:
            return None
        if predictor.metadata_schema is None:
            raise ServeError(400, f"head {predictor.head!r} was trained on images alone: it takes no patient metadata "
                                  f"(leave out the fields {sorted(metadata)})")
        records: list[dict] = [{} for _ in range(n)]
        for field, values in metadata.items():
            if field not in predictor.metadata_schema.fields:
                raise ServeError(400, f"head {predictor.head!r} takes metadata {list(predictor.metadata_schema.fields)}, "
                                      f"not {field!r}")
            if len(values) not in (1, n):
                raise ServeError(400, f"field {field!r} has {len(values)} values for {n} images: give one (for every "
                                      f"image) or one per image, in the order of the files")
            for i in range(n):
                records[i][field] = values[0] if len(values) == 1 else values[i]
        for i, r in enumerate(records):
            try:
                predictor.metadata_schema.encode_row(r)
            except ValueError as e:
                raise ServeError(400, f"image {i + 1}: {e}") from None
        return records

    def predict(self, uploads: list[Upload], head: str | None = None, tta: bool = False,
                overlay: str | None = None, metadata: dict[str, list[str]] | None = None) -> dict:
        overlay = overlay or self.default_overlay
        head = self.check_options(head, overlay)
        self.check_uploads(uploads)
        with tempfile.TemporaryDirectory(prefix="melanoma-serve-") as tmp:
            tmp = Path(tmp)
            paths = []
            for i, up in enumerate(uploads):
                paths.append(tmp / f"upload_{i:03d}")
                paths[-1].write_bytes(up.data)
            maps_dir = None if overlay == NO_OVERLAY else tmp / "maps"
            methods = () if overlay in (HEADS_OVERLAY, NO_OVERLAY) else (overlay,)
            with self._lock:
                predictor = self._predictor(head, tta)
                try:
                    records = predictor.predict_paths(paths, attention_dir=maps_dir, attention_methods=methods,
                                                      metadata=self.per_image_metadata(predictor, metadata, len(paths)))
                except NonFiniteOutputError as e:
                    names = {str(p): up.filename for up, p in zip(uploads, paths)}
                    bad = [{"filename": names.get(p, p), "error": "the model's output is not finite (NaN/Inf): "
                                                                  "no probability or decision"} for p in e.paths]
                    raise ServeError(422, f"cannot predict {', '.join(f['filename'] for f in bad)}: the model's output "
                                          f"is not finite; nothing was decided", bad) from None
            # the reason may quote the temp file's path: name the upload instead
            failed = [{"filename": up.filename, "error": r["error"].replace(str(p), up.filename)}
                      for up, p, r in zip(uploads, paths, records) if r["error"]]
            if failed:
                names = ", ".join(f["filename"] for f in failed)
                raise ServeError(422, f"cannot predict {names}: see the reason per file", failed)
            predictions = [self._response_record(up, rec, overlay) for up, rec in zip(uploads, records)]
        return {
            "head": predictor.head,
            "tta": tta,
            "overlay": overlay,
            "class_names": predictor.class_names,
            "threshold": predictor.threshold,
            "target_sensitivity": predictor.target_sensitivity,
            # the record these predictions used (the TTA one with TTA, when fitted), and why not
            "calibration": calibration_summary(predictor.calibration),
            "calibration_warning": predictor.calibration_warning,
            "data_warning": predictor.data_warning,
            **({"metadata": predictor.metadata_schema.to_dict()} if predictor.metadata_schema is not None else {}),
            "predictions": predictions,
        }

    @staticmethod
    def _response_record(upload: Upload, record: dict, overlay: str) -> dict:
        out = {"filename": upload.filename}
        # every other field passes through as Predictor wrote it, so new columns reach the API
        out.update({k: v for k, v in record.items() if k not in SERVER_ONLY_FIELDS})
        if overlay != NO_OVERLAY:
            png = (record.get(MAPS_FIELD) or {}).get(overlay)
            if png is None:
                raise RuntimeError(f"Predictor wrote no {overlay!r} map for {upload.filename} (it wrote "
                                   f"{sorted(record.get(MAPS_FIELD) or {})})")
            out["overlay_png"] = base64.b64encode(Path(png).read_bytes()).decode("ascii")
        return out
