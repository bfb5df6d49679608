"""Albumentations pipelines built from the `augment` section of a dataset config.

Dermoscopy has no "up": the whole dihedral group (flips, 90-degree turns, transpose) is a free
augmentation. Colour jitter stays mild because colour is part of the diagnosis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INTERPOLATIONS = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}

# Every key the `augment` config may hold, with its default.
DEFAULT_AUGMENT: dict = {
    "scale": (0.35, 1.0),  # RandomResizedCrop area range
    "ratio": (0.75, 4 / 3),  # RandomResizedCrop aspect range
    "hflip": 0.5,
    "vflip": 0.5,
    "rot90": 0.5,  # probability of a random 90-degree turn and of a transpose
    "color_jitter": {"p": 0.8, "brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.02},
    "blur": 0.0,  # probability of a slight Gaussian blur (focus varies between dermatoscopes)
    "interpolation": "bicubic",
}


def resolve_augment(augment: Mapping | None) -> dict:
    """Defaults overlaid with ``augment``; unknown keys are errors (a typo must not be ignored)."""
    cfg = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in DEFAULT_AUGMENT.items()}
    for key, value in (augment or {}).items():
        if key not in DEFAULT_AUGMENT:
            raise ValueError(
                f"unknown augment option {key!r}; expected one of {sorted(DEFAULT_AUGMENT)}"
            )
        if key == "color_jitter" and isinstance(value, Mapping):
            unknown = set(value) - set(DEFAULT_AUGMENT["color_jitter"])
            if unknown:
                raise ValueError(
                    f"unknown color_jitter option(s) {sorted(unknown)}; expected "
                    f"{sorted(DEFAULT_AUGMENT['color_jitter'])}"
                )
            cfg[key].update(value)
        else:
            cfg[key] = value
    if cfg["interpolation"] not in INTERPOLATIONS:
        raise ValueError(
            f"augment.interpolation={cfg['interpolation']!r}; expected one of {sorted(INTERPOLATIONS)}"
        )
    return cfg


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def _normalise_and_tensor(mean: Sequence[float], std: Sequence[float]) -> list:
    return [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()]


def build_train_pipeline(image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, augment=None) -> A.Compose:
    cfg = resolve_augment(augment)
    interp = INTERPOLATIONS[cfg["interpolation"]]
    ops: list = [
        A.RandomResizedCrop(
            size=_pair(image_size),
            scale=tuple(cfg["scale"]),
            ratio=tuple(cfg["ratio"]),
            interpolation=interp,
            area_for_downscale="image",
        )
    ]
    if cfg["hflip"]:
        ops.append(A.HorizontalFlip(p=float(cfg["hflip"])))
    if cfg["vflip"]:
        ops.append(A.VerticalFlip(p=float(cfg["vflip"])))
    if cfg["rot90"]:
        ops.append(A.RandomRotate90(p=float(cfg["rot90"])))
        ops.append(A.Transpose(p=float(cfg["rot90"])))
    cj = cfg["color_jitter"]
    if cj and cj.get("p", 0) > 0:
        ops.append(
            A.ColorJitter(
                brightness=cj["brightness"],
                contrast=cj["contrast"],
                saturation=cj["saturation"],
                hue=cj["hue"],
                p=float(cj["p"]),
            )
        )
    if cfg["blur"]:
        ops.append(A.GaussianBlur(blur_limit=(3, 3), p=float(cfg["blur"])))
    return A.Compose(ops + _normalise_and_tensor(mean, std))


def build_eval_pipeline(image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic") -> A.Compose:
    # The whole field of view is resized (no centre crop): lesions reach the image border often
    # enough that cropping would cut off the asymmetric part the model should see.
    h, w = _pair(image_size)
    return A.Compose(
        [A.Resize(h, w, interpolation=INTERPOLATIONS[interpolation], area_for_downscale="image")]
        + _normalise_and_tensor(mean, std)
    )


class ImageTransform:
    """Callable(PIL RGB image or HxWx3 uint8 array) -> float32 tensor (3, H, W)."""

    def __init__(self, pipeline: A.Compose):
        self.pipeline = pipeline

    def __call__(self, image) -> torch.Tensor:
        if isinstance(image, Image.Image):
            if image.mode != "RGB":
                raise ValueError(f"expected an RGB image, got mode {image.mode}; use load_rgb()")
            image = np.asarray(image)
        return self.pipeline(image=image)["image"]

    def __repr__(self) -> str:
        return f"ImageTransform({self.pipeline})"


def train_transform(image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, augment=None) -> ImageTransform:
    return ImageTransform(build_train_pipeline(image_size, mean, std, augment))


def eval_transform(image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic") -> ImageTransform:
    return ImageTransform(build_eval_pipeline(image_size, mean, std, interpolation))
