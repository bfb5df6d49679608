"""Predicting new images from a checkpoint alone: the model, its preprocessing, the chosen
head's class names and its calibration record (temperature, operating point) all come from the
checkpoint contract (melanoma.models.checkpoint), so no config file or dataset is needed.

The decision is made in one place, ``decide``, on calibrated probabilities, whatever scale the
output shows: `predict`, `predict --uncalibrated`, `evaluate` and the ONNX sidecar agree.
"""

from __future__ import annotations

import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from melanoma.data.dataset import ImagePathDataset
from melanoma.data.io import ImageReadError, load_rgb
from melanoma.data.transforms import EvalTransform
from melanoma.data.workers import worker_context
from melanoma.predict.tta import tta_logits
from melanoma.explain.attention import compute_attention_maps
from melanoma.explain.gradcam import GRADCAM, compute_gradcam_maps, maps_to_draw
from melanoma.explain.overlay import METHOD_NAMES, PANEL, save_head_grid, save_overlay
from melanoma.metadata import MetadataSchema
from melanoma.models.checkpoint import Checkpoint, Preprocessing, softmax
from melanoma.models.classifier import Classifier
from melanoma.precision import autocast_context, inference_precision

log = logging.getLogger(__name__)

#: a prediction record's map files by method (``HEADS_MAP``: the last-layer per-head grid); the
#: ``attention`` column lists the same files for people, ``;``-joined
MAPS_FIELD, HEADS_MAP = "maps", "heads"

MELANOMA_DECISION = "melanoma"
NOT_MELANOMA_DECISION = "not_melanoma"


class NonFiniteOutputError(RuntimeError):
    """The model gave NaN or Inf logits for some images: no probability or decision exists for
    them. Carries the images' paths."""

    def __init__(self, paths: Sequence[str | os.PathLike], total: int):
        self.paths = [str(p) for p in paths]
        shown = ", ".join(self.paths[:10]) + (f" and {len(self.paths) - 10} more" if len(self.paths) > 10 else "")
        super().__init__(
            f"the model's output is not finite (NaN/Inf logits) for {len(self.paths)} of {total} images: {shown}. "
            f"Nothing was decided. Check these files, or predict at --precision 32-true if a lower precision "
            f"was asked for; with finite inputs at full precision the checkpoint itself is broken."
        )


def check_finite(logits, paths: Sequence[str | os.PathLike]) -> None:
    """Raise NonFiniteOutputError naming the images whose logits hold a NaN or an Inf."""
    rows = ~np.isfinite(np.asarray(torch.as_tensor(logits).float().cpu())).all(axis=1)
    if rows.any():
        raise NonFiniteOutputError([p for p, bad in zip(paths, rows) if bad], len(paths))


def decide(p_melanoma, threshold: float | None) -> list[str | None]:
    """The melanoma decision at an operating point, from *calibrated* melanoma probabilities."""
    if threshold is None:
        return [None] * len(p_melanoma)
    return [MELANOMA_DECISION if p >= threshold else NOT_MELANOMA_DECISION for p in np.asarray(p_melanoma, dtype=np.float64)]


def decision_caption(record: dict) -> str:
    """The decision of one prediction record in words, with the numbers it compares."""
    p, t, decision = record.get("melanoma_probability"), record.get("threshold"), record.get("decision")
    if p is None:
        return f"most probable class {record['predicted_class']} (no melanoma class: no decision)"
    if decision is None or t is None:
        return f"p(melanoma) {p:.2f}; no decision (no calibrated operating point)"
    d = 2  # enough digits that p and t never look equal when they are not
    while d < 6 and (f"{p:.{d}f}" == f"{t:.{d}f}" and p != t or abs(round(t, d) - t) > 1e-9 and d < 4):
        d += 1
    if decision == MELANOMA_DECISION:
        return f"decision: melanoma (p {p:.{d}f} >= threshold {t:.{d}f})"
    return f"decision: below the melanoma threshold (p {p:.{d}f} < {t:.{d}f})"


def eval_transform_of(pre: Preprocessing) -> EvalTransform:
    return EvalTransform(pre.image_size, pre.mean, pre.std, pre.interpolation)


def _safe_stem(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem) or "image"


class Predictor:
    """Batched prediction of image files with one head of a trained checkpoint.

    tta: average logits over the 8 flips/rotations (and use the calibration fitted with TTA
    when the checkpoint has one).
    calibrated: show calibrated probabilities (default). With False the probabilities shown are
    the raw softmax and ``threshold`` is mapped onto that scale where an exact mapping exists
    (two classes); the decision is the same either way.
    precision: forward-pass precision (melanoma.precision; "auto" is full precision on every
    device: lower precision changes decisions near the threshold, so it is used only when asked).
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike | Checkpoint,
        head: str | None = None,
        device: str = "cpu",
        batch_size: int = 32,
        tta: bool = False,
        calibrated: bool = True,
        progress: bool = True,
        announce: bool = True,
        precision: str = "auto",
    ):
        """announce: warn (log) when the head's calibration does not fit (uncalibrated, or fitted
        without TTA for TTA predictions); evaluation, which is about to fit one, passes False."""
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
        self.device = torch.device(device)
        self.precision = inference_precision(precision, self.device)
        checkpoint = Checkpoint.of(checkpoint, map_location=self.device)  # a path, or a file already read
        self.model, self.meta = Classifier.from_checkpoint(checkpoint, map_location=self.device)
        self.model.requires_grad_(False)  # inference: no parameter gradients, ever
        self.checkpoint = checkpoint.path
        self.head = self.meta.choose_head(head)
        record = self.meta.heads[self.head]
        self.class_names = record.class_names
        self.positive_index = record.positive_index
        #: the head's patient-metadata schema (melanoma.metadata), or None: the image alone
        schema = record.metadata_schema
        self.metadata_schema = None if schema is None else MetadataSchema.from_dict(schema)
        self.tta = bool(tta)
        self.calibration, warning = record.calibration_for(self.tta)
        fitted_at = None if self.calibration is None else self.calibration.precision
        if fitted_at is not None and fitted_at != self.precision:
            warning = "; ".join(filter(None, [warning, (
                f"its calibration and threshold were fitted on {fitted_at} logits and these are {self.precision}: "
                f"probabilities near the threshold may decide differently (use --precision {fitted_at})")]))
        self.calibration_warning = warning
        self.data_warning = record.data_warning(self.head)  # synthetic training data
        self.announce = bool(announce)
        if warning and announce:
            log.warning("head %r of %s: %s", self.head, self.checkpoint, warning)
        self.show_calibrated = bool(calibrated) and self.calibration is not None
        self.image_size = self.meta.preprocessing.image_size
        self.transform = eval_transform_of(self.meta.preprocessing)
        self.batch_size = int(batch_size)
        self.progress = progress
        if (not calibrated and self.calibration is not None and self.positive_index is not None
                and self.calibration.threshold is not None and self.threshold is None):
            log.warning("--uncalibrated: head %r has %d classes, so no threshold on raw probabilities "
                        "reproduces the operating point; decisions are made on calibrated probabilities",
                        self.head, len(self.class_names))

    @property
    def calibrated(self) -> bool:
        """Whether the probabilities shown are calibrated."""
        return self.show_calibrated

    @property
    def temperature(self) -> float:
        return self.calibration.temperature if self.show_calibrated else 1.0

    @property
    def threshold(self) -> float | None:
        """The operating point on the scale of the probabilities shown."""
        cal = self.calibration
        if cal is None or cal.threshold is None or self.positive_index is None:
            return None
        if self.show_calibrated:
            return cal.threshold
        return cal.threshold_on_raw_scale(len(self.class_names), self.positive_index)

    @property
    def target_sensitivity(self) -> float | None:
        return None if self.calibration is None else self.calibration.target_sensitivity

    # --- tensors ----------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor, return_attention: bool = False, metadata: torch.Tensor | None = None):
        with autocast_context(self.precision, self.device):
            return self.model(x, self.head, return_attention=return_attention, metadata=metadata)

    def metadata_tensor(self, metadata, n: int) -> torch.Tensor | None:
        """Encoded metadata (N, D) for a batch of ``n`` images: ``metadata`` as given (an array or
        tensor), or all values missing when None; None for a head on images alone (which refuses
        metadata given to it)."""
        if self.metadata_schema is None:
            if metadata is not None:
                raise ValueError(f"head {self.head!r} of {self.checkpoint} was trained on images alone: it takes no "
                                 f"patient metadata (leave out --metadata)")
            return None
        if metadata is None:
            metadata = self.metadata_schema.encode(None, n)
        return torch.as_tensor(np.asarray(metadata, dtype=np.float32)).to(self.device)

    @torch.no_grad()
    def logits(self, x: torch.Tensor, metadata=None) -> torch.Tensor:
        """Uncalibrated logits (B, C) of a normalised batch, with TTA if enabled (the metadata is
        the same for every view). ``metadata``: (B, D) encoded (melanoma.metadata); None is all
        missing for a fusion head."""
        x = x.to(self.device)
        m = self.metadata_tensor(metadata, len(x))

        def forward(v):
            return self._forward(v, metadata=m)

        return tta_logits(forward, x) if self.tta else forward(x)

    def calibrated_probabilities(self, logits) -> np.ndarray:
        logits = np.asarray(torch.as_tensor(logits).float().cpu(), dtype=np.float64)
        return softmax(logits) if self.calibration is None else self.calibration.probabilities(logits)

    def probabilities(self, logits) -> np.ndarray:
        """The probabilities shown: calibrated unless ``calibrated=False``."""
        logits = np.asarray(torch.as_tensor(logits).float().cpu(), dtype=np.float64)
        return self.calibrated_probabilities(logits) if self.show_calibrated else softmax(logits)

    def decisions(self, logits) -> list[str | None]:
        if self.positive_index is None or self.calibration is None:
            return [None] * len(logits)
        p = self.calibrated_probabilities(logits)[:, self.positive_index]
        return decide(p, self.calibration.threshold)

    def logits_of_paths(self, paths: Sequence[str | os.PathLike], num_workers: int = 0,
                        desc: str = "predict", metadata: np.ndarray | None = None) -> np.ndarray:
        """Raw logits (N, C) of image files, in order, through the exact eval preprocessing
        (loader workers for speed). ``metadata``: (N, D) encoded patient metadata for a fusion head
        (None: all missing). An unreadable file raises ImageReadError naming it, non-finite
        outputs NonFiniteOutputError naming the images."""
        if metadata is not None or self.metadata_schema is not None:
            metadata = self.metadata_tensor(metadata, len(paths)).cpu().numpy()
        loader = DataLoader(ImagePathDataset(paths, self.transform, metadata), batch_size=self.batch_size,
                            num_workers=num_workers, shuffle=False,
                            multiprocessing_context=worker_context(num_workers))
        batches = tqdm(loader, desc=desc, unit="batch", leave=False, disable=not self.progress)
        out = [(self.logits(*b) if isinstance(b, (list, tuple)) else self.logits(b)).float().cpu() for b in batches]
        logits = torch.cat(out).numpy() if out else np.zeros((0, len(self.class_names)), dtype=np.float32)
        check_finite(logits, paths)
        return logits

    # --- files ------------------------------------------------------------------------------
    def _load(self, path: Path) -> tuple[torch.Tensor | None, Image.Image | None, str | None]:
        try:
            image = load_rgb(path)
            return self.transform(image), image, None
        except ImageReadError as e:
            return None, None, e.reason
        except Exception as e:  # noqa: BLE001 - any decoder/transform failure is reported per file
            return None, None, f"{type(e).__name__}: {e}"

    def records(self, paths: Sequence[Path], logits) -> list[dict]:
        probs = self.probabilities(logits)
        decisions = self.decisions(logits)
        return [self._record(p, probs[i], decisions[i]) for i, p in enumerate(paths)]

    def _record(self, path: Path, probs: np.ndarray, decision: str | None) -> dict:
        # None, not "": JSON gets null and the CSV writer an empty cell
        out = {"path": str(path), "error": None, "predicted_class": self.class_names[int(probs.argmax())]}
        for name, p in zip(self.class_names, probs):
            out[f"prob_{name}"] = float(p)
        if self.positive_index is not None:
            out["melanoma_probability"] = float(probs[self.positive_index])
            out["threshold"] = self.threshold
            out["decision"] = decision
        out["calibrated"] = self.calibrated
        return out

    def error_record(self, path: Path, reason: str) -> dict:
        out = {"path": str(path), "error": reason, "predicted_class": None}
        out.update({f"prob_{name}": None for name in self.class_names})
        if self.positive_index is not None:
            out.update({"melanoma_probability": None, "threshold": None, "decision": None})
        out["calibrated"] = None
        return out

    def predict_paths(
        self,
        paths: Sequence[str | os.PathLike],
        attention_dir: str | os.PathLike | None = None,
        attention_methods: Iterable[str] | None = None,
        metadata: Sequence[dict | None] | None = None,
    ) -> list[dict]:
        """One record per path, in order. Unreadable files get a record whose `error` says why
        (and a line in the log) while the rest are predicted; non-finite outputs stop it
        (NonFiniteOutputError naming the images). With `attention_dir`, writes
        `<stem>_<method>.png` (image | heat map | overlay) per method and `<stem>_heads.png`
        (last-layer attention per head) for every image. ``metadata``: per path, its patient
        record (field -> value; None or an absent field is missing) for a fusion head; each record
        then says which fields were missing (``metadata_missing``)."""
        paths = [Path(p) for p in paths]
        encoded, missing = self.encode_metadata(metadata, len(paths))
        backbone = self.model.backbone
        # the maps the backbone offers: attention maps for ViTs (rollout by default), Grad-CAM for CNNs
        methods = maps_to_draw(backbone, attention_methods) if attention_dir is not None or attention_methods else ()
        reads_attention = getattr(backbone, "reads_attention", False)
        if attention_dir is not None:
            attention_dir = Path(attention_dir)
            attention_dir.mkdir(parents=True, exist_ok=True)
        records: list[dict] = []
        used_stems: dict[str, int] = {}
        # PNG encoding releases the GIL: writing maps in threads overlaps it with the next batch
        # one thread: more would compete with the forward pass for the same cores
        writer = ThreadPoolExecutor(max_workers=1) if attention_dir is not None else None
        pending = []
        bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not self.progress)
        for start in range(0, len(paths), self.batch_size):
            chunk = paths[start : start + self.batch_size]
            loaded = [self._load(p) for p in chunk]
            good = [i for i, (t, _, _) in enumerate(loaded) if t is not None]
            chunk_records: list[dict | None] = [None] * len(chunk)
            for i, (_, _, reason) in enumerate(loaded):
                if reason is not None:
                    log.error("cannot read %s: %s", chunk[i], reason)
                    chunk_records[i] = self.error_record(chunk[i], reason)
            if good:
                x = torch.stack([loaded[i][0] for i in good]).to(self.device)
                m = None if encoded is None else encoded[[start + i for i in good]]
                maps = None
                m_t = self.metadata_tensor(m, len(good)) if attention_dir is not None else None
                if attention_dir is not None and not reads_attention:
                    maps = compute_gradcam_maps(lambda v: self._forward(v, metadata=m_t), x, backbone.gradcam_layer())
                elif attention_dir is not None:
                    maps = compute_attention_maps(
                        lambda v, return_attention=False: self._forward(v, return_attention, metadata=m_t),
                        x, self.model.backbone.grid_size,
                        num_prefix_tokens=self.model.backbone.num_prefix_tokens,
                        methods=tuple(dict.fromkeys(("last_layer", *methods))),
                    )
                # with attention maps (and no TTA) the same forward pass gives the logits
                logits = torch.from_numpy(maps.logits) if maps is not None and not self.tta else self.logits(x, m)
                check_finite(logits, [chunk[i] for i in good])
                batch_records = self.records([chunk[i] for i in good], logits)
                for j, i in enumerate(good):
                    rec = batch_records[j]
                    if missing is not None:
                        rec["metadata_missing"] = ";".join(missing[start + i])
                    if maps is not None:
                        stem = _safe_stem(chunk[i])
                        n = used_stems.get(stem, 0)
                        used_stems[stem] = n + 1
                        stem = stem if n == 0 else f"{stem}__{n + 1}"  # two folders may hold the same file name
                        files = [attention_dir / f"{stem}_{m}.png" for m in methods]
                        if maps.last_layer_heads is not None:
                            files.append(attention_dir / f"{stem}_heads.png")
                        rec["attention"] = ";".join(str(f) for f in files)
                        # the same files by method, for programs (serve): no file-name parsing
                        rec[MAPS_FIELD] = dict(zip([*methods, HEADS_MAP][:len(files)], map(str, files)))
                        pending.append(writer.submit(self._write_maps, files, loaded[i][1], maps, j, methods, rec))
                    chunk_records[i] = rec
            records.extend(chunk_records)
            bar.update(len(chunk))
            # bound the queue: finished batches' pictures first, so memory stays flat
            while len(pending) > 2 * self.batch_size:
                pending.pop(0).result()
        if writer is not None:
            for f in pending:
                f.result()  # re-raises a failed write here
            writer.shutdown()
            for r in records:
                r.setdefault("attention", None)
                r.setdefault(MAPS_FIELD, {})
        bar.close()
        return records

    def encode_metadata(self, metadata: Sequence[dict | None] | None, n: int):
        """(encoded (N, D) or None, per image the missing fields or None) of per-image records.
        A fusion head scored without any metadata says so once: every value is then missing."""
        if self.metadata_schema is None:
            if metadata is not None:
                self.metadata_tensor(np.zeros((1, 1)), 1)  # raises: this head takes no metadata
            return None, None
        if metadata is None:
            if self.announce:
                log.warning("head %r takes patient metadata %s and none was given: every value is scored as "
                            "missing (pass --metadata table.csv)", self.head, list(self.metadata_schema.fields))
            metadata = [None] * n
        if len(metadata) != n:
            raise ValueError(f"{len(metadata)} metadata records for {n} images; expected one per image")
        rows = [self.metadata_schema.encode_row(r or {}) for r in metadata]
        return np.stack([v for v, _ in rows]) if rows else None, [miss for _, miss in rows]

    def _write_maps(self, files: list[Path], image: Image.Image, maps, j: int, methods, rec) -> None:
        # what the model saw (the whole field of view, squared), at least PANEL px so it can be read
        side = max(self.image_size, PANEL)
        shown = image.resize((side, side), Image.BICUBIC)
        decision = decision_caption(rec)
        for m, f in zip(methods, files):
            target = f" (gradients of the {rec['predicted_class']} logit)" if m in ("grad_rollout", GRADCAM) else ""
            save_overlay(f, shown, maps.maps[m][j], title=f"{METHOD_NAMES.get(m, m)}{target} · {decision}")
        if maps.last_layer_heads is not None:
            save_head_grid(files[-1], shown, maps.last_layer_heads[j], maps.maps["last_layer"][j],
                           title=f"Last-layer attention per head · {decision}")
