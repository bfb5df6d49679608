"""Albumentations pipelines built from the `augment` section of a dataset config.

Dermoscopy has no "up": the whole dihedral group (flips, 90-degree turns, transpose) is a free
augmentation. Colour jitter stays mild because colour is part of the diagnosis (hue off by
default: blue-grey and red areas are findings, not noise).

The flips and the transpose are done here with OpenCV on the small uint8 crop rather than as
albumentations transforms, whose per-call overhead was a large share of the per-image budget
(experiments/results/bench_loader.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image

from melanoma.conventions import CONFIG_TO_PIL_RESAMPLING, PIL_RESAMPLING_NAMES
from melanoma.conventions import IMAGENET_MEAN, IMAGENET_STD

INTERPOLATIONS = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}

# Every key the `augment` config may hold, with its default: the one home of these values
# (conf/dataset/augment/default.yaml lists the keys as null, which means "this default").
DEFAULT_AUGMENT: dict = {
    "scale": (0.35, 1.0),  # RandomResizedCrop area range
    "ratio": (0.75, 4 / 3),  # RandomResizedCrop aspect range
    "hflip": 0.5,
    "vflip": 0.5,
    # probability of a transpose (a 90-degree turn combined with a flip); with both flips at 0.5
    # all 8 symmetries of the square come out equally often
    "rot90": 0.5,
    "color_jitter": {"p": 0.8, "brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.0},
    "blur": 0.0,  # probability of a slight Gaussian blur (focus varies between dermatoscopes)
    "interpolation": "bicubic",
}


def resolve_augment(augment: Mapping | None) -> dict:
    """Defaults overlaid with ``augment``; a None value (the config's null) keeps the default;
    unknown keys are errors (a typo must not be ignored). Switch an augmentation off with 0."""
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
            cfg[key].update({k: v for k, v in value.items() if v is not None})
        elif value is not None:
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


def build_train_pipeline(image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, augment=None) -> "ImageTransform":
    """Random resized crop -> random flips/transpose -> colour jitter -> normalise -> tensor."""
    cfg = resolve_augment(augment)
    interp = INTERPOLATIONS[cfg["interpolation"]]
    crop = A.Compose([
        A.RandomResizedCrop(
            size=_pair(image_size),
            scale=tuple(cfg["scale"]),
            ratio=tuple(cfg["ratio"]),
            interpolation=interp,
            area_for_downscale="image",
        )
    ])
    ops: list = []
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
    h, w = _pair(image_size)
    flips = (float(cfg["hflip"] or 0), float(cfg["vflip"] or 0), float(cfg["rot90"] or 0) if h == w else 0.0)
    return ImageTransform(A.Compose(ops + _normalise_and_tensor(mean, std)), crop=crop, flips=flips)


def build_eval_pipeline(image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic") -> "EvalTransform":
    """The eval preprocessing, exactly what a consumer with PIL and numpy alone reproduces (see
    ``EvalTransform``). ``interpolation`` is the dataset config's name; the PIL filter it maps to
    is what checkpoints and ONNX sidecars record."""
    if interpolation not in CONFIG_TO_PIL_RESAMPLING:
        raise ValueError(f"interpolation {interpolation!r}; expected one of {sorted(CONFIG_TO_PIL_RESAMPLING)}")
    return EvalTransform(image_size, mean, std, CONFIG_TO_PIL_RESAMPLING[interpolation])


class EvalTransform:
    """RGB PIL image (or HxWx3 uint8 array) -> float32 tensor (3, S, S):
    ``image.resize((S, S), <PIL filter>)``, / 255, (x - mean) / std.

    The whole field of view is resized (no centre crop): lesions reach the image border often
    enough that cropping would cut off the asymmetric part the model should see. PIL rather than
    OpenCV so that the ONNX sidecar's recipe (PIL + numpy) gives the same pixels.
    """

    def __init__(self, image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, resample: str = "bicubic"):
        if resample not in PIL_RESAMPLING_NAMES:
            raise ValueError(f"resample {resample!r} is not a PIL filter name; expected one of {PIL_RESAMPLING_NAMES}")
        self.size = _pair(image_size)
        self.resample = resample
        self._filter = getattr(Image.Resampling, resample.upper())
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)

    def pixels(self, image) -> np.ndarray:
        """The resized uint8 (S, S, 3) picture the model sees before normalisation: what the
        image cache stores for evaluation. An image already of that size passes unchanged
        (PIL's resize to the same size is a copy), so cached pixels give the same tensor."""
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode}; use load_rgb()")
        h, w = self.size
        return np.asarray(image.resize((w, h), self._filter))

    def __call__(self, image) -> torch.Tensor:
        x = self.pixels(image).astype(np.float32) / 255.0
        x = (x - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size}, resample={self.resample!r})"


class ImageTransform:
    """Callable(PIL RGB image or HxWx3 uint8 array) -> float32 tensor (3, H, W).

    ``crop`` (optional albumentations pipeline) runs first, then random horizontal flip,
    vertical flip and transpose with probabilities ``flips``, then ``pipeline`` (which ends in
    normalisation and ToTensorV2).
    """

    def __init__(self, pipeline: A.Compose, crop: A.Compose | None = None,
                 flips: tuple[float, float, float] = (0.0, 0.0, 0.0)):
        self.pipeline = pipeline
        self.crop = crop
        self.flips = tuple(flips)
        self.rng = np.random.default_rng()

    def set_random_seed(self, seed: int) -> None:
        """Seed every random step (DataLoader workers call this with their own seed)."""
        self.rng = np.random.default_rng(seed)
        self.pipeline.set_random_seed(seed)
        if self.crop is not None:
            self.crop.set_random_seed(seed + 1)

    def __call__(self, image) -> torch.Tensor:
        if isinstance(image, Image.Image):
            if image.mode != "RGB":
                raise ValueError(f"expected an RGB image, got mode {image.mode}; use load_rgb()")
            image = np.asarray(image)
        if self.crop is not None:
            image = self.crop(image=image)["image"]
        if any(self.flips):
            hflip, vflip, transpose = self.rng.random(3) < self.flips
            # OpenCV's SIMD flip/transpose: a numpy copy of a transposed 3-channel view gathers
            # byte by byte, far slower (experiments/results/bench_loader.md)
            if hflip and vflip:
                image = cv2.flip(image, -1)
            elif hflip:
                image = cv2.flip(image, 1)
            elif vflip:
                image = cv2.flip(image, 0)
            if transpose:
                image = cv2.transpose(image)
        return self.pipeline(image=image)["image"]

    def __repr__(self) -> str:
        return f"ImageTransform(crop={self.crop}, flips={self.flips}, pipeline={self.pipeline})"


def train_transform(image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, augment=None) -> ImageTransform:
    return build_train_pipeline(image_size, mean, std, augment)


def eval_transform(image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic") -> EvalTransform:
    return build_eval_pipeline(image_size, mean, std, interpolation)
