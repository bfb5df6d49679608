"""Predicting new images from a checkpoint alone: the model, its preprocessing (image size,
mean/std), the chosen head's class names, the calibration temperature and the stored operating
point all come from the checkpoint's META, so no config file or dataset is needed."""

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
from tqdm.auto import tqdm

from melanoma.data.io import ImageReadError, load_rgb
from melanoma.data.transforms import eval_transform
from melanoma.evaluation.tta import tta_logits
from melanoma.explain.attention import compute_attention_maps
from melanoma.explain.overlay import save_head_grid, save_overlay
from melanoma.models.classifier import Classifier
from melanoma.models.heads import positive_index
from melanoma.precision import autocast_context, resolve_precision

log = logging.getLogger(__name__)

MELANOMA_DECISION = "melanoma"
NOT_MELANOMA_DECISION = "not_melanoma"


def choose_head(meta: dict, head: str | None) -> str:
    """The head to use: `head` if given, else the checkpoint's active head."""
    heads = list(meta.get("heads", {}))
    name = head or meta.get("active_head") or (heads[0] if len(heads) == 1 else None)
    if name is None:
        raise ValueError(f"the checkpoint has several heads {heads} and no active_head; pass --head NAME")
    if name not in heads:
        raise ValueError(f"no head named {name!r} in this checkpoint; it has heads {heads} (choose with --head)")
    return name


def head_temperature(meta: dict, head: str) -> float:
    return float(((meta.get("calibration") or {}).get(head) or {}).get("temperature", 1.0))


def head_operating_point(meta: dict, head: str) -> dict | None:
    return (meta.get("operating_point") or {}).get(head) or None


def meta_interpolation(meta: dict) -> str:
    """The resize interpolation the model was trained with (the dataset's augment config)."""
    augment = (((meta.get("config") or {}).get("dataset") or {}).get("augment")) or {}
    return str(augment.get("interpolation", "bicubic"))


def _safe_stem(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem) or "image"


class Predictor:
    """Batched prediction of image files with one head of a trained checkpoint.

    calibrated: divide logits by the stored temperature (1.0 when none is stored).
    tta: average logits over the 8 flips/rotations.
    precision: forward-pass precision (melanoma.precision; "auto" picks it for the device).
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        head: str | None = None,
        device: str = "cpu",
        batch_size: int = 32,
        tta: bool = False,
        calibrated: bool = True,
        progress: bool = True,
        precision: str = "auto",
    ):
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device.type)
        self.model, self.meta = Classifier.from_checkpoint(checkpoint, map_location=self.device)
        self.model.requires_grad_(False)  # inference: no parameter gradients, ever
        self.checkpoint = Path(checkpoint)
        self.head = choose_head(self.meta, head)
        self.class_names = list(self.meta["heads"][self.head]["class_names"])
        self.positive_index = positive_index(self.class_names)
        self.temperature = head_temperature(self.meta, self.head) if calibrated else 1.0
        op = head_operating_point(self.meta, self.head)
        self.threshold = float(op["threshold"]) if op else None
        if self.threshold is not None and not calibrated and head_temperature(self.meta, self.head) != 1.0:
            # the stored threshold is on calibrated probabilities; uncalibrated ones would shift it
            log.warning("operating point is defined on calibrated probabilities; decisions use them regardless")
        self.image_size = int(self.meta["image_size"])
        self.transform = eval_transform(self.image_size, self.meta["mean"], self.meta["std"], meta_interpolation(self.meta))
        self.batch_size = int(batch_size)
        self.tta = bool(tta)
        self.progress = progress
        if self.threshold is None and self.positive_index is not None:
            log.warning(
                "checkpoint %s stores no operating point for head %r: decisions are left empty; "
                "run `melanoma evaluate` to choose one on the validation split", checkpoint, self.head
            )

    # --- tensors ----------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor, return_attention: bool = False):
        with autocast_context(self.precision, self.device):
            return self.model(x, self.head, return_attention=return_attention)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Uncalibrated logits (B, C) of a normalised batch, with TTA if enabled."""
        x = x.to(self.device)
        return tta_logits(self._forward, x) if self.tta else self._forward(x)

    def probabilities(self, logits: torch.Tensor) -> np.ndarray:
        """Calibrated class probabilities from logits (temperature applied)."""
        return torch.softmax(logits.float() / self.temperature, dim=1).cpu().numpy()

    # --- files ------------------------------------------------------------------------------
    def _load(self, path: Path) -> tuple[torch.Tensor | None, Image.Image | None, str | None]:
        try:
            image = load_rgb(path, target_size=self.image_size)
            return self.transform(image), image, None
        except ImageReadError as e:
            return None, None, e.reason
        except Exception as e:  # noqa: BLE001 - any decoder/transform failure is reported per file
            return None, None, f"{type(e).__name__}: {e}"

    def record(self, path: Path, probs: np.ndarray) -> dict:
        # None, not "": JSON gets null and the CSV writer an empty cell
        out = {"path": str(path), "error": None, "predicted_class": self.class_names[int(probs.argmax())]}
        for name, p in zip(self.class_names, probs):
            out[f"prob_{name}"] = float(p)
        if self.positive_index is not None:
            p_mel = float(probs[self.positive_index])
            out["melanoma_probability"] = p_mel
            out["threshold"] = self.threshold
            out["decision"] = (
                None if self.threshold is None else MELANOMA_DECISION if p_mel >= self.threshold else NOT_MELANOMA_DECISION
            )
        return out

    def error_record(self, path: Path, reason: str) -> dict:
        out = {"path": str(path), "error": reason, "predicted_class": None}
        out.update({f"prob_{name}": None for name in self.class_names})
        if self.positive_index is not None:
            out.update({"melanoma_probability": None, "threshold": None, "decision": None})
        return out

    def predict_paths(
        self,
        paths: Sequence[str | os.PathLike],
        attention_dir: str | os.PathLike | None = None,
        attention_methods: Iterable[str] = ("rollout",),
    ) -> list[dict]:
        """One record per path, in order. Unreadable files get a record whose `error` says why
        (and a line in the log) while the rest are predicted. With `attention_dir`, writes
        `<stem>_<method>.png` (image | heat map | overlay) per method and `<stem>_heads.png`
        (last-layer attention per head) for every image."""
        paths = [Path(p) for p in paths]
        methods = tuple(dict.fromkeys(attention_methods))
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
                maps = None
                if attention_dir is not None:
                    maps = compute_attention_maps(
                        self._forward, x, self.model.backbone.grid_size,
                        num_prefix_tokens=self.model.backbone.num_prefix_tokens,
                        methods=tuple(dict.fromkeys(("last_layer", *methods))),
                    )
                # with attention maps (and no TTA) the same forward pass gives the logits
                logits = torch.from_numpy(maps.logits) if maps is not None and not self.tta else self.logits(x)
                probs = self.probabilities(logits)
                for j, i in enumerate(good):
                    rec = self.record(chunk[i], probs[j])
                    if maps is not None:
                        stem = _safe_stem(chunk[i])
                        n = used_stems.get(stem, 0)
                        used_stems[stem] = n + 1
                        stem = stem if n == 0 else f"{stem}__{n + 1}"  # two folders may hold the same file name
                        files = [attention_dir / f"{stem}_{m}.png" for m in methods] + [attention_dir / f"{stem}_heads.png"]
                        rec["attention"] = ";".join(str(f) for f in files)
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
        bar.close()
        return records

    def _write_maps(self, files: list[Path], image: Image.Image, maps, j: int, methods, rec) -> None:
        # what the model saw (the whole field of view, squared), at least 224 px so it can be read
        side = max(self.image_size, 224)
        shown = image.resize((side, side), Image.BICUBIC)
        title = f"{rec['predicted_class']} {max(v for k, v in rec.items() if k.startswith('prob_')):.2f}"
        for m, f in zip(methods, files):
            save_overlay(f, shown, maps.maps[m][j], title=title)
        save_head_grid(files[-1], shown, maps.last_layer_heads[j], maps.maps["last_layer"][j])
