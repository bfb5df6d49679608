"""Writing a checkpoint in the training module's format without Lightning.

The file is what Classifier.from_checkpoint reads ({"state_dict": {"model." + key: tensor},
"melanoma": META}). Used for models trained outside the Lightning module (tests, benchmarks,
a quick experiment) so that evaluate / predict / export work on them unchanged."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from melanoma.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from melanoma.models import build_backbone
from melanoma.models.classifier import META_KEY, STATE_PREFIX, Classifier, checkpoint_meta
from melanoma.models.heads import DatasetHeads, LinearHead


def build_classifier(backbone: str, backbone_kwargs: dict, heads: dict[str, Sequence[str]]) -> Classifier:
    """A Classifier with a linear head per dataset name -> class names."""
    vit = build_backbone(backbone, **backbone_kwargs)
    dataset_heads = DatasetHeads()
    for name, class_names in heads.items():
        dataset_heads.add(name, LinearHead(vit.embed_dim, list(class_names)))
    return Classifier(vit, dataset_heads)


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
    config: dict | None = None,
    calibration: dict | None = None,
    operating_point: dict | None = None,
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = checkpoint_meta(
        model, backbone, backbone_kwargs, image_size=image_size, mean=mean, std=std,
        active_head=active_head, calibration=calibration, operating_point=operating_point, config=config,
    )
    state = {STATE_PREFIX + k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, META_KEY: meta}, path)
    return path
