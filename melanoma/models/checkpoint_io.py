"""Writing a checkpoint without Lightning, for models trained elsewhere (tests, benchmarks, a
quick experiment), so that evaluate / predict / export work on them unchanged. The file follows
the checkpoint contract of melanoma.models.checkpoint."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from melanoma.conventions import IMAGENET_MEAN, IMAGENET_STD
from melanoma.models import build_backbone
from melanoma.models.checkpoint import (
    Calibration,
    CheckpointMeta,
    HeadRecord,
    TrainingData,
    preprocessing_from,
    save_checkpoint,
)
from melanoma.models.classifier import Classifier
from melanoma.models.heads import DatasetHeads, LinearHead


def build_classifier(backbone: str, backbone_kwargs: dict, heads: dict[str, Sequence[str]],
                     family: str = "vit") -> Classifier:
    """A Classifier with a linear head per dataset name -> class names."""
    vit = build_backbone(backbone, family=family, **backbone_kwargs)
    dataset_heads = DatasetHeads()
    for name, class_names in heads.items():
        dataset_heads.add(name, LinearHead(vit.embed_dim, list(class_names)))
    return Classifier(vit, dataset_heads)


def training_data(datamodule, config: Mapping | None = None) -> TrainingData:
    """What a checkpoint records about a (set-up) DataModule; `config` is its dataset config
    (with _target_), from which `melanoma evaluate` rebuilds it."""
    d = datamodule.split_description()
    return TrainingData.from_dict({**d, "config": dict(config or {})})


def save_classifier_checkpoint(
    path: str | os.PathLike,
    model: Classifier,
    backbone: str,
    backbone_kwargs: dict,
    *,
    image_size: int,
    active_head: str | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "bicubic",
    config: dict | None = None,
    calibration: Mapping[str, Calibration] | None = None,
    data: Mapping[str, TrainingData] | None = None,
    family: str = "vit",
    weights: dict | None = None,
) -> Path:
    """calibration / data: per head name, its calibration record / training data."""
    calibration, data = dict(calibration or {}), dict(data or {})
    heads = {name: HeadRecord(spec=spec, calibration=calibration.get(name), data=data.get(name))
             for name, spec in model.heads.specs().items()}
    meta = CheckpointMeta(
        backbone=backbone, backbone_kwargs=dict(backbone_kwargs), heads=heads,
        active_head=active_head or next(iter(heads)),
        preprocessing=preprocessing_from(image_size, mean, std, interpolation), config=dict(config or {}),
        backbone_family=family, weights=weights,
    )
    return save_checkpoint(path, model.state_dict(), meta)
