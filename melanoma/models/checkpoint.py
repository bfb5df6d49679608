"""The checkpoint contract: what a melanoma checkpoint means, as one typed object.

A checkpoint file is a dict (Lightning's, or one written by ``save_checkpoint``)::

    {"state_dict": {"model.backbone.*": tensor, "model.heads.<name>.*": tensor, ...},
     "melanoma": CheckpointMeta.to_dict(),
     ...Lightning's own entries (optimizer, loops, callbacks, datamodule state)...}

``CheckpointMeta`` holds everything needed to use the weights without a config file or dataset:

- the backbone: its family (``vit``, our DeiT-configured ViT, or ``timm``), name and keyword
  arguments, and where its initial weights came from (``weights``: a file's name and sha256 or a
  hub name, and the licence the user stated; None when trained from random weights);
- per head: its spec (class names and the positive class with them), its calibration records
  (one fitted without and one with test-time augmentation), and a description of the data it
  was trained on (dataset, label set, every setting that determines the split, and the split's
  fingerprint);
- the eval preprocessing (image size, mean/std, the PIL resampling used for the resize);
- what the model has seen (``SeenImages``): per head and split, the ids and content
  fingerprints of its train and val images, its training datasets' test images (marked as such),
  and those of every checkpoint in its ``init_from`` lineage; ``None`` in checkpoints written
  before it was recorded (then overlap with a test set cannot be checked);
- the resolved training config, for the record.

Every writer and reader of that metadata goes through this module: nothing else parses the
``"melanoma"`` entry. Version 1 checkpoints (written before this module) are read and upgraded
in memory by ``CheckpointMeta.from_checkpoint``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pickle
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from melanoma.conventions import CONFIG_TO_PIL_RESAMPLING, PIL_RESAMPLING_NAMES
from melanoma.conventions import SYNTHETIC_DATASET, positive_index

log = logging.getLogger(__name__)

__all__ = [
    "CALIBRATION_METHODS", "METHOD_NONE", "METHOD_PRIOR_TEMPERATURE", "METHOD_TEMPERATURE",
    "METHOD_TEMPERATURE_BIAS", "META_KEY", "META_VERSION", "STATE_PREFIX", "TEMPERATURE_BOUNDS", "Calibration", "CheckpointError",
    "Checkpoint", "CheckpointMeta", "HeadRecord", "Preprocessing", "SEEN_SPLITS", "SeenImages", "TrainingData", "load_checkpoint",
    "non_finite_tensors", "read_meta",
    "save_checkpoint", "update_meta",
]

META_KEY = "melanoma"
META_VERSION = 2
STATE_PREFIX = "model."
#: a fitted temperature is kept inside these bounds (an uninformative model drives it to ~1e5)
TEMPERATURE_BOUNDS = (0.05, 20.0)
#: Calibration.method values: how a calibration map was fitted (melanoma.evaluation.calibration)
METHOD_NONE = "none"  # stored with T = 1 on purpose
METHOD_TEMPERATURE = "temperature"  # softmax(z / T)
METHOD_PRIOR_TEMPERATURE = "prior+temperature"  # the training reweighting's known offset undone, then T
METHOD_TEMPERATURE_BIAS = "temperature+bias"  # T and a fitted per-class bias
CALIBRATION_METHODS = (METHOD_NONE, METHOD_TEMPERATURE, METHOD_PRIOR_TEMPERATURE, METHOD_TEMPERATURE_BIAS)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read as a melanoma checkpoint."""


# --- the records ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Preprocessing:
    """The exact eval preprocessing: ``ImageOps.exif_transpose(Image.open(p)).convert("RGB")``,
    ``.resize((image_size, image_size), <interpolation>)``, / 255, then (x - mean) / std."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"  # a PIL resampling filter name

    def __post_init__(self):
        if self.interpolation not in PIL_RESAMPLING_NAMES:
            raise CheckpointError(
                f"preprocessing interpolation {self.interpolation!r} is not a PIL resampling name; "
                f"expected one of {PIL_RESAMPLING_NAMES}"
            )
        object.__setattr__(self, "image_size", int(self.image_size))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))


@dataclass(frozen=True)
class Calibration:
    """How one head's logits become the probabilities and the decision users see.

    Probabilities are ``softmax(logits / temperature + bias)`` (bias: per-class offsets, empty
    for plain temperature scaling); the melanoma decision is ``p_melanoma >= threshold``.
    ``method`` is one of CALIBRATION_METHODS (how T and bias were fitted).
    ``fitted_on`` names the data it was fitted on (dataset, split, split fingerprint; for a site
    recalibration the site's dataset and root and the fingerprint of the sample).
    ``precision`` is the forward-pass precision of the logits it was fitted on (None: not recorded,
    checkpoints written before it was); predicting at another precision is reported.
    Non-finite numbers are refused, whether a calibration is being stored or read back.
    """

    temperature: float = 1.0
    bias: tuple[float, ...] = ()
    method: str = "temperature"
    threshold: float | None = None
    target_sensitivity: float | None = None
    tta: bool | None = False  # None: not known (version 1 checkpoints did not record it)
    fitted_on: dict | None = None
    precision: str | None = None

    def __post_init__(self):
        t = float(self.temperature)
        if not (math.isfinite(t) and t > 0):
            raise CheckpointError(f"calibration temperature must be a positive finite number, got {self.temperature}; "
                                  f"the logits it was fitted on were probably not finite: refit it with `melanoma evaluate`")
        object.__setattr__(self, "temperature", t)
        bias = tuple(float(b) for b in self.bias)
        if not all(math.isfinite(b) for b in bias):
            raise CheckpointError(f"calibration bias must be finite, got {list(bias)}; refit it with `melanoma evaluate`")
        object.__setattr__(self, "bias", bias)
        if self.threshold is not None:
            th = float(self.threshold)
            if not math.isfinite(th):
                raise CheckpointError(f"calibration threshold must be a finite number (or absent), got {self.threshold}; "
                                      f"refit it with `melanoma evaluate`")
            object.__setattr__(self, "threshold", th)

    def calibrated_logits(self, logits) -> np.ndarray:
        z = np.asarray(logits, dtype=np.float64) / self.temperature
        if self.bias:
            z = z + np.asarray(self.bias, dtype=np.float64)
        return z

    def probabilities(self, logits) -> np.ndarray:
        """(N, C) calibrated class probabilities from raw (N, C) logits, in float64."""
        return softmax(self.calibrated_logits(logits))

    def threshold_on_raw_scale(self, num_classes: int, pos: int) -> float | None:
        """The threshold on *uncalibrated* probabilities that gives the same decisions, where one
        exists: for two classes, p_cal >= t  <=>  d / T + db >= logit(t)  <=>  p_raw >=
        sigmoid(T (logit(t) - db)), with d the logit difference. None for more classes (there the
        calibrated melanoma probability is not a function of the raw one)."""
        if self.threshold is None or num_classes != 2:
            return None
        t = float(self.threshold)
        if t <= 0.0 or t >= 1.0:
            return t
        db = (self.bias[pos] - self.bias[1 - pos]) if self.bias else 0.0
        z = self.temperature * (math.log(t) - math.log1p(-t) - db)
        return float(1.0 / (1.0 + math.exp(-z))) if z > -700 else 0.0


@dataclass(frozen=True)
class TrainingData:
    """The data one head was trained on: enough to rebuild exactly its split."""

    dataset: str  # the DataModule's name (also the head's name when trained alone)
    config: dict  # the dataset config as trained (Hydra, with _target_; root included)
    label_set: str
    class_names: tuple[str, ...]
    split_settings: dict  # every setting that determines the split (seed, fractions, folds, ...)
    fingerprint: str | None  # hash of (file name, label, split) over all images
    counts: dict = field(default_factory=dict)  # images per split
    #: class frequencies of the train split (sums to 1); None in checkpoints written before it
    prior: tuple[float, ...] | None = None
    #: the cross-entropy's class weights when model.loss.class_weights was on, else None
    class_weights: tuple[float, ...] | None = None
    #: the training sampler ("random" | "balanced"); with the two above, the logit offset the
    #: training reweighting added (melanoma.evaluation.calibration.prior_offsets)
    sampler: str = "random"
    #: file names moved from val/test into train because the init_from lineage had seen them
    #: (rebuilding the split moves them again, so the fingerprint still matches)
    moved_to_train: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: Mapping) -> TrainingData:
        def floats(v):
            return None if v is None else tuple(float(x) for x in v)

        return cls(
            dataset=str(d["dataset"]), config=dict(d.get("config") or {}), label_set=str(d.get("label_set")),
            class_names=tuple(d.get("class_names") or ()), split_settings=dict(d.get("split_settings") or {}),
            fingerprint=d.get("fingerprint"), counts=dict(d.get("counts") or {}),
            prior=floats(d.get("prior")), class_weights=floats(d.get("class_weights")),
            sampler=str(d.get("sampler") or "random"), moved_to_train=tuple(d.get("moved_to_train") or ()),
        )

    @property
    def reweighted(self) -> bool:
        """Whether training shifted the class balance (weighted loss or balanced sampler)."""
        return self.class_weights is not None or self.sampler == "balanced"


#: the splits a SeenImages record can name: trained on, calibrated on (val, a site sample), and
#: the held-out test images of a training dataset (not external either)
SEEN_SPLITS = ("train", "val", "test", "site sample")


@dataclass(frozen=True)
class SeenImages:
    """Images one split of one dataset showed the model: ids and content fingerprints.

    ``ids``: ``ISIC_xxxxxxx`` where the file has one, else the file stem (matched by content
    only). ``hashes``: (N, B) uint8, row 0 of ``melanoma.data.fingerprints`` (the image as it is).
    ``model``: which model in the lineage saw them (its run id), kept as records are inherited.
    Stored compactly: the ids as one zlib-compressed text, the hashes as one uint8 tensor.
    """

    dataset: str
    split: str
    head: str
    ids: tuple[str, ...]
    hashes: np.ndarray
    model: str = ""

    def __post_init__(self):
        if self.split not in SEEN_SPLITS:
            raise CheckpointError(f"seen-images split {self.split!r}; expected one of {SEEN_SPLITS}")
        hashes = np.asarray(self.hashes, dtype=np.uint8)
        if hashes.ndim != 2 or len(hashes) != len(self.ids):
            raise CheckpointError(f"seen images of {self.dataset}/{self.split}: {len(self.ids)} ids but hashes "
                                  f"of shape {hashes.shape}")
        object.__setattr__(self, "hashes", hashes)
        object.__setattr__(self, "ids", tuple(str(i) for i in self.ids))

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "split": self.split, "head": self.head, "model": self.model,
                "ids": zlib.compress("\n".join(self.ids).encode(), 9), "hashes": torch.from_numpy(self.hashes.copy())}

    @classmethod
    def from_dict(cls, d: Mapping) -> SeenImages:
        text = zlib.decompress(d["ids"]).decode() if d["ids"] else ""
        hashes = d["hashes"].numpy() if isinstance(d["hashes"], torch.Tensor) else np.asarray(d["hashes"])
        return cls(dataset=str(d["dataset"]), split=str(d["split"]), head=str(d["head"]),
                   ids=tuple(text.split("\n")) if text else (), hashes=hashes.reshape(len(hashes), -1),
                   model=str(d.get("model") or ""))


@dataclass
class HeadRecord:
    """One dataset head: its spec, calibration records and training data."""

    spec: dict
    calibration: Calibration | None = None  # fitted on logits without TTA
    calibration_tta: Calibration | None = None  # fitted on 8-view TTA logits
    data: TrainingData | None = None
    #: why the head carries no calibration (shown to users when they predict with it)
    uncalibrated_reason: str | None = None

    @property
    def class_names(self) -> list[str]:
        return list(self.spec["class_names"])

    @property
    def metadata_schema(self) -> dict | None:
        """The patient-metadata schema this head was trained with (fields, encodings, scaling,
        encoded columns: melanoma.metadata), or None for a head on images alone."""
        return dict(self.spec["metadata"]) if self.spec.get("type") == "fusion" else None

    @property
    def positive_index(self) -> int | None:
        return positive_index(self.class_names)

    def calibration_for(self, tta: bool) -> tuple[Calibration | None, str | None]:
        """The record to use for plain or TTA predictions, and a warning when it does not fit."""
        if tta and self.calibration_tta is not None:
            return self.calibration_tta, None
        if self.calibration is not None and self.calibration.tta is None:
            return self.calibration, (
                "the stored calibration comes from a version-1 checkpoint, which did not record whether it was "
                "fitted on TTA logits; it is used unchanged for these "
                f"{'TTA' if tta else 'plain'} predictions (run `melanoma evaluate CKPT{' --tta' if tta else ''}` "
                "to fit one that says)"
            )
        if tta and self.calibration is not None:
            return self.calibration, (
                "the stored calibration was fitted without TTA; TTA probabilities and decisions use "
                "it unchanged (run `melanoma evaluate CKPT --tta` to fit one with TTA)"
            )
        if self.calibration is not None:
            return self.calibration, None
        reason = self.uncalibrated_reason or "no calibration has been fitted for it (run `melanoma evaluate CKPT`)"
        return None, f"this head is uncalibrated: {reason}; probabilities are uncalibrated and no decision is made"

    def drop_calibration(self, reason: str) -> None:
        self.calibration = self.calibration_tta = None
        self.uncalibrated_reason = reason

    def data_warning(self, name: str) -> str | None:
        """What a reader of this head's output must know about its training data (a head named
        `name`, trained on the built-in synthetic lesions), or None."""
        dataset = self.data.dataset if self.data is not None else name
        if dataset != SYNTHETIC_DATASET:
            return None
        return ("this head was trained on the built-in synthetic lesions (dataset=synthetic), a "
                "demonstration: its probabilities and decisions say nothing about real skin lesions")


@dataclass
class CheckpointMeta:
    backbone: str
    backbone_kwargs: dict
    heads: dict[str, HeadRecord]
    active_head: str
    preprocessing: Preprocessing
    config: dict = field(default_factory=dict)
    version: int = META_VERSION
    #: every image the model and its init_from lineage saw; None: not recorded (older checkpoint)
    seen: list[SeenImages] | None = None
    #: this model's run id (names its own records in ``seen``)
    model_id: str = ""
    #: the backbone family (melanoma.models.FAMILIES); checkpoints written before it are ``vit``
    backbone_family: str = "vit"
    #: provenance of the backbone's initial weights (melanoma.models.pretrained.weights_provenance):
    #: {"source": "file"|"hub"|"init_from"|None, "name", "sha256", "license"}; None: not recorded
    weights: dict | None = None

    # --- provenance ----------------------------------------------------------------------------
    def backbone_record(self) -> dict:
        """What the backbone is and where its weights came from, as users read it (/api/model,
        the report's metrics.json, the ONNX sidecar): family, name, and the weights' source (file
        name and sha256, or hub name; ``init_from`` with the lineage's record), licence as stated.
        ``weights`` None: not recorded (a checkpoint written before it was)."""
        return {"family": self.backbone_family, "name": self.backbone,
                "weights": None if self.weights is None else dict(self.weights)}

    # --- heads ---------------------------------------------------------------------------------
    def choose_head(self, head: str | None = None) -> str:
        """`head` if given, else the active head; a clear error naming the heads otherwise."""
        name = head or self.active_head
        if name not in self.heads:
            raise ValueError(f"no head named {name!r} in this checkpoint; it has heads {list(self.heads)} "
                             f"(choose one with --head)")
        return name

    def head_specs(self) -> dict[str, dict]:
        return {name: dict(rec.spec) for name, rec in self.heads.items()}

    def set_calibration(self, head: str, calibration: Calibration) -> None:
        rec = self.heads[head]
        if calibration.tta:
            rec.calibration_tta = calibration
        else:
            rec.calibration = calibration
        rec.uncalibrated_reason = None

    # --- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain Python values only: the file loads with torch.load(weights_only=True)."""
        def cal(c):
            return None if c is None else dataclasses.asdict(c) | {"bias": list(c.bias)}

        return {
            "version": self.version,
            "backbone": {"family": self.backbone_family, "name": self.backbone, "kwargs": dict(self.backbone_kwargs),
                         "weights": None if self.weights is None else dict(self.weights)},
            "heads": {
                name: {
                    "spec": dict(rec.spec),
                    "calibration": cal(rec.calibration),
                    "calibration_tta": cal(rec.calibration_tta),
                    "data": None if rec.data is None else dataclasses.asdict(rec.data) | {
                        "class_names": list(rec.data.class_names),
                        "prior": None if rec.data.prior is None else list(rec.data.prior),
                        "class_weights": None if rec.data.class_weights is None else list(rec.data.class_weights)},
                    "uncalibrated_reason": rec.uncalibrated_reason,
                }
                for name, rec in self.heads.items()
            },
            "active_head": self.active_head,
            "preprocessing": dataclasses.asdict(self.preprocessing) | {
                "mean": list(self.preprocessing.mean), "std": list(self.preprocessing.std)},
            "config": dict(self.config),
            "seen": None if self.seen is None else [r.to_dict() for r in self.seen],
            "model_id": self.model_id,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> CheckpointMeta:
        version = int(d.get("version", 1))
        if version == 1:
            return _upgrade_v1(d, {})
        if version > META_VERSION:
            raise CheckpointError(f"checkpoint metadata version {version} is newer than this melanoma "
                                  f"(reads up to {META_VERSION}); update the package")

        def cal(c):
            return None if c is None else Calibration(**{**c, "bias": tuple(c.get("bias") or ())})

        heads = {
            name: HeadRecord(
                spec=dict(h["spec"]), calibration=cal(h.get("calibration")),
                calibration_tta=cal(h.get("calibration_tta")),
                data=None if h.get("data") is None else TrainingData.from_dict(h["data"]),
                uncalibrated_reason=h.get("uncalibrated_reason"),
            )
            for name, h in d["heads"].items()
        }
        return cls(
            backbone=d["backbone"]["name"], backbone_kwargs=dict(d["backbone"].get("kwargs") or {}),
            heads=heads, active_head=d["active_head"], preprocessing=Preprocessing(**d["preprocessing"]),
            config=dict(d.get("config") or {}), version=version,
            seen=None if d.get("seen") is None else [SeenImages.from_dict(r) for r in d["seen"]],
            model_id=str(d.get("model_id") or ""),
            backbone_family=str(d["backbone"].get("family") or "vit"),
            weights=None if d["backbone"].get("weights") is None else dict(d["backbone"]["weights"]),
        )

    @classmethod
    def from_checkpoint(cls, ckpt: Mapping) -> CheckpointMeta:
        """The metadata of a loaded checkpoint dict, upgrading version 1 (whose split fingerprint
        lives in Lightning's datamodule entry)."""
        meta = ckpt[META_KEY]
        if int(meta.get("version", 1)) == 1:
            return _upgrade_v1(meta, ckpt)
        return cls.from_dict(meta)


# --- version 1 (checkpoints written before this module) ---------------------------------------


def _upgrade_v1(meta: Mapping, ckpt: Mapping) -> CheckpointMeta:
    config = dict(meta.get("config") or {})
    dataset_cfg = dict(config.get("dataset") or {})
    interpolation = ((dataset_cfg.get("augment") or {}).get("interpolation")) or "bicubic"
    # Lightning stored the datamodule's state_dict under its class name
    dm_state = next((v for v in ckpt.values() if isinstance(v, Mapping) and "split_fingerprint" in v), None)
    calibration, operating = meta.get("calibration") or {}, meta.get("operating_point") or {}
    heads = {}
    for name, spec in meta["heads"].items():
        cal = None
        if name in calibration or name in operating:
            op = operating.get(name) or {}
            cal = Calibration(
                temperature=float((calibration.get(name) or {}).get("temperature", 1.0)),
                method="temperature" if name in calibration else "none",
                threshold=op.get("threshold"), target_sensitivity=op.get("target_sensitivity"),
                tta=None,  # version 1 did not record it: unknown, not "without TTA"
            )
        data = None
        if dm_state is not None and dm_state.get("name") == name and dataset_cfg:
            data = TrainingData(
                dataset=name, config=dataset_cfg, label_set=str(dm_state.get("label_set")),
                class_names=tuple(spec["class_names"]),
                split_settings={k: dataset_cfg.get(k) for k in SPLIT_SETTING_KEYS_V1 if k in dataset_cfg},
                fingerprint=dm_state.get("split_fingerprint"), counts=dict(dm_state.get("split_counts") or {}),
            )
        heads[name] = HeadRecord(spec=dict(spec), calibration=cal, data=data)
    return CheckpointMeta(
        backbone=meta["backbone"]["name"], backbone_kwargs=dict(meta["backbone"].get("kwargs") or {}),
        heads=heads, active_head=meta.get("active_head") or next(iter(heads)),
        preprocessing=Preprocessing(meta["image_size"], meta["mean"], meta["std"],
                                    CONFIG_TO_PIL_RESAMPLING.get(interpolation, "bicubic")),
        config=config, version=META_VERSION,
    )


#: the v1 dataset config keys that determined a split (v2 records the DataModule's own list)
SPLIT_SETTING_KEYS_V1 = ("label_set", "seed", "val_fraction", "test_fraction", "num_folds", "fold")


# --- files ------------------------------------------------------------------------------------

def softmax(z) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


#: what the train.py side of a file that is not a checkpoint should be used as
_AS_PRETRAINED = "as pretrained backbone weights for training, pass it as model.pretrained=FILE"


def _not_a_torch_file(path: Path) -> str | None:
    """What a file is when torch.save did not write it (ONNX, text, safetensors, empty), read
    from its first bytes; None for a torch file (a zip archive or a legacy pickle)."""
    with path.open("rb") as f:
        head = f.read(4096)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return None
    if not head:
        return "an empty file"
    if path.suffix.lower() == ".onnx" or (head[:1] == b"\x08" and b"onnx" in head.lower()):
        return ("an ONNX model (as `melanoma export` writes): run it with onnxruntime, and give "
                "`melanoma` the .ckpt it was exported from")
    if len(head) > 8 and head[8:10] == b'{"':
        return f"a safetensors weights file (tensors without the melanoma metadata); {_AS_PRETRAINED}"
    if b"\x00" not in head:
        try:
            first = head.decode("utf-8").strip().splitlines()[0][:60]
            return f"a text file (it starts {first!r})"
        except (UnicodeDecodeError, IndexError):
            pass
    return f"not a file torch.save writes (it starts with bytes {head[:8]!r})"


def _describe(ckpt) -> str:
    """What a loaded object is, for a file that holds no melanoma metadata."""
    if isinstance(ckpt, dict):
        inner = ckpt.get("model") if isinstance(ckpt.get("model"), dict) else ckpt
        if inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return (f"a plain state dict of {len(inner)} tensors (e.g. {next(iter(inner))!r}), weights "
                    f"without the melanoma metadata; {_AS_PRETRAINED}")
        keys = sorted(map(str, ckpt))
        return f"found {keys[:12]}{' ...' if len(keys) > 12 else ''}"
    return f"found {type(ckpt).__name__}"


def _load_dict(path: Path, map_location="cpu") -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    what = _not_a_torch_file(path)
    if what:
        raise CheckpointError(f"{path} is not a melanoma checkpoint: it is {what}. Expected a .ckpt "
                              f"written by `python train.py` (runs/train/<stamp>/checkpoints/)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} holds objects that torch.load(weights_only=True) refuses to unpickle ({e}). "
            f"Checkpoints must contain only tensors and plain Python values."
        ) from e
    if not isinstance(ckpt, dict) or META_KEY not in ckpt or "state_dict" not in ckpt:
        found = _describe(ckpt)
        raise CheckpointError(
            f"{path} is not a melanoma checkpoint: expected a dict with 'state_dict' and '{META_KEY}' "
            f"(written by training or melanoma.models.checkpoint.save_checkpoint); {found}"
        )
    return ckpt


@dataclass
class Checkpoint:
    """One checkpoint file, read once: the metadata, the Classifier's weights and every other
    entry the file holds (Lightning's), so that a command passes this object down instead of a
    path and writes the file back at most once (``write``)."""

    path: Path
    meta: CheckpointMeta
    #: the file's dict as read (Lightning's entries, the raw state dict); the metadata entry is
    #: rewritten from ``meta`` by ``write``
    entries: dict
    #: the file as read (size, mtime): an in-place write refuses a file changed since
    stamp: tuple | None = None

    @classmethod
    def read(cls, path: str | os.PathLike, map_location="cpu") -> Checkpoint:
        path = Path(path)
        ckpt = _load_dict(path, map_location)
        try:
            meta = CheckpointMeta.from_checkpoint(ckpt)
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: its '{META_KEY}' metadata is incomplete ({type(e).__name__}: {e})") from e
        checkpoint = cls(path=path, meta=meta, entries=ckpt, stamp=_stamp(path))
        bad = non_finite_tensors(checkpoint.state)
        if bad:
            raise CheckpointError(
                f"{path}: the weights are not finite (NaN or Inf in {len(bad)} tensors, e.g. {bad[:3]}); nothing it "
                f"predicts would mean anything. Use an earlier checkpoint of the run (training never writes one "
                f"with non-finite weights), or train again with a lower learning rate."
            )
        return checkpoint

    @classmethod
    def of(cls, checkpoint: Checkpoint | str | os.PathLike, map_location="cpu") -> Checkpoint:
        """``checkpoint`` itself when it is already read, else the file read now."""
        return checkpoint if isinstance(checkpoint, Checkpoint) else cls.read(checkpoint, map_location)

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """The Classifier's state dict (without the ``model.`` prefix)."""
        return {k[len(STATE_PREFIX):]: v for k, v in self.entries["state_dict"].items() if k.startswith(STATE_PREFIX)}

    def write(self, path: str | os.PathLike | None = None) -> Path:
        """Write the file (to ``path``, default its own) atomically with the metadata as it is
        now; every other entry (weights, Lightning state) as it was read. A link (Lightning's
        last.ckpt may be one) keeps pointing at the updated file."""
        target = Path(path) if path is not None else self.path.resolve()
        if path is None and self.stamp is not None and _stamp(self.path) != self.stamp:
            raise CheckpointError(
                f"{self.path} changed on disk while this command ran (training still writing it, or another "
                f"command); nothing was written, so the newer file is kept. Run the command again on it.")
        target.parent.mkdir(parents=True, exist_ok=True)
        _atomic_save({**self.entries, META_KEY: self.meta.to_dict()}, target)
        return target


def _stamp(path: Path) -> tuple:
    st = Path(path).resolve().stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
    """(the Classifier's state dict, without the ``model.`` prefix; the metadata)."""
    checkpoint = Checkpoint.read(path, map_location)
    return checkpoint.state, checkpoint.meta


def non_finite_tensors(state_dict: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an Inf (one host read in all)."""
    names = [k for k, v in state_dict.items() if torch.is_tensor(v) and v.is_floating_point()]
    if not names:
        return []
    finite = torch.stack([torch.isfinite(state_dict[k]).all() for k in names]).cpu()
    return [] if bool(finite.all()) else [n for n, ok in zip(names, finite.tolist()) if not ok]


def read_meta(path: str | os.PathLike) -> CheckpointMeta:
    return load_checkpoint(path)[1]


def save_checkpoint(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], meta: CheckpointMeta) -> Path:
    """Write a checkpoint (outside Lightning): the Classifier's state dict and the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {STATE_PREFIX + k: v.detach().cpu() for k, v in state_dict.items()}
    _atomic_save({"state_dict": state, META_KEY: meta.to_dict()}, path)
    return path


def update_meta(path: str | os.PathLike, change: Callable[[CheckpointMeta], None]) -> CheckpointMeta:
    """Apply `change` to the stored metadata and rewrite the file atomically (a crash never
    leaves half a checkpoint); every other entry (weights, Lightning state) is kept as it is."""
    checkpoint = Checkpoint.read(path)
    change(checkpoint.meta)
    checkpoint.write()
    return checkpoint.meta


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def preprocessing_from(image_size: int, mean: Sequence[float], std: Sequence[float],
                       config_interpolation: str = "bicubic") -> Preprocessing:
    """The eval preprocessing of a model trained with the dataset config's interpolation."""
    if config_interpolation not in CONFIG_TO_PIL_RESAMPLING:
        raise ValueError(f"interpolation {config_interpolation!r}; expected one of {sorted(CONFIG_TO_PIL_RESAMPLING)}")
    return Preprocessing(image_size, tuple(mean), tuple(std), CONFIG_TO_PIL_RESAMPLING[config_interpolation])
