"""Synthetic dermoscopy-like lesions, written in the DermMel on-disk layout.

Benign: small, round, symmetric, one even brown, smooth border. Melanoma: larger, asymmetric,
irregular border, several colours (dark brown, black, blue-grey, red). Both sit on textured skin
of widely varying tone, with hairs, vignetting and exposure changes drawn independently of the
class, so global brightness says little and a model has to look at shape and colour.

Everything is numpy on whole images (no per-pixel Python), and every image is drawn from its
own seed sequence (seed, split, class, index): adding test images never changes train images.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from melanoma.conventions import SYNTHETIC_DATASET

from .base import BINARY_CLASSES, LesionDataModule, _plain
from .dermmel import DermMelDataModule

log = logging.getLogger(__name__)

#: bump when the images drawn for a seed change, so cached synthetic folders are regenerated
GENERATOR_VERSION = 2

DERMMEL_SPLITS = {"train": "train_sep", "val": "valid", "test": "test"}
DERMMEL_CLASSES = {"NotMelanoma": False, "Melanoma": True}

SKIN_LIGHT = np.array([238.0, 204.0, 182.0])
SKIN_DARK = np.array([120.0, 78.0, 56.0])
BENIGN_LIGHT = np.array([176.0, 118.0, 78.0])
BENIGN_DARK = np.array([92.0, 54.0, 34.0])
MELANOMA_COLOURS = {
    "dark_brown": np.array([88.0, 50.0, 30.0]),
    "black": np.array([30.0, 22.0, 22.0]),
    "blue_grey": np.array([100.0, 112.0, 136.0]),
    "red": np.array([176.0, 66.0, 64.0]),
    "light_brown": np.array([150.0, 96.0, 60.0]),
}


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish low-frequency noise: a cells x cells grid upsampled bicubically."""
    cells = max(2, cells)
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(small, mode="F").resize((size, size), Image.Resampling.BICUBIC))


def _hair_layer(rng: np.random.Generator, size: int, count: int) -> np.ndarray:
    """Float mask in [0, 1] of ``count`` thin curved hairs."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    width = max(1, size // 96)
    for _ in range(count):
        x, y = rng.uniform(-0.1, 1.1, 2) * size
        angle = rng.uniform(0, 2 * np.pi)
        bend = rng.normal(0, 0.25)
        step = rng.uniform(0.3, 1.0) * size / 6
        pts = []
        for _ in range(7):
            pts.append((float(x), float(y)))
            angle += bend
            x += np.cos(angle) * step
            y += np.sin(angle) * step
        draw.line(pts, fill=int(rng.uniform(150, 255)), width=width)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def render_lesion(rng: np.random.Generator, melanoma: bool, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One size x size dermoscopy-like image (uint8 HxWx3) and its lesion mask (bool HxW)."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    y, x = np.meshgrid(coords, coords, indexing="ij")

    # Skin: a tone anywhere from light to dark, blotchy low-frequency texture and fine grain.
    tone = rng.uniform(0.0, 1.0)
    skin = SKIN_LIGHT * (1 - tone) + SKIN_DARK * tone
    texture = _smooth_noise(rng, size, 5) * rng.uniform(3, 9) + _smooth_noise(rng, size, max(4, size // 5)) * rng.uniform(2, 5)
    img = skin[None, None, :] + texture[..., None] * np.array([1.0, 0.85, 0.75])

    # Shape: radius as a function of angle. Benign = circle or slight ellipse (symmetric);
    # melanoma = low harmonics (asymmetry) plus high harmonics (ragged border).
    cx, cy = rng.normal(0.0, 0.07, 2)
    dx, dy = x - cx, y - cy
    rho = np.sqrt(dx * dx + dy * dy)
    theta = np.arctan2(dy, dx)
    if melanoma:
        radius = rng.uniform(0.3, 0.55)
        harmonics = [(1, rng.uniform(0.06, 0.16)), (2, rng.uniform(0.06, 0.18)), (3, rng.uniform(0.05, 0.15))]
        harmonics += [(k, rng.uniform(0.02, 0.06)) for k in range(5, 11)]
        edge = 0.02
    else:
        radius = rng.uniform(0.22, 0.46)
        harmonics = [(2, rng.uniform(0.0, 0.07))]
        edge = 0.06
    boundary = np.full_like(theta, radius)
    for k, amp in harmonics:
        boundary += radius * amp * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    alpha = np.clip((boundary - rho) / edge + 0.5, 0.0, 1.0)
    inside = np.clip(rho / np.maximum(boundary, 1e-3), 0.0, 1.0)

    if melanoma:
        # Several colour zones: bands of a smooth noise field, so zones are contiguous blobs.
        # Always at least one of the alarming colours (black, blue-grey), plus one or two others;
        # zones split the lesion roughly evenly so none is a speck.
        names = ["dark_brown", str(rng.choice(["black", "blue_grey"]))]
        names += list(rng.choice([c for c in ("black", "blue_grey", "red", "light_brown") if c not in names],
                                 size=rng.integers(1, 3), replace=False))
        field = _smooth_noise(rng, size, 4) + 0.6 * _smooth_noise(rng, size, 8)
        k = len(names)
        qs = (np.arange(1, k) + rng.uniform(-0.25, 0.25, k - 1)) / k
        cuts = np.quantile(field[alpha > 0.5], qs) if (alpha > 0.5).any() else []
        zone = np.digitize(field, cuts)
        palette = np.stack([MELANOMA_COLOURS[n] * rng.uniform(0.85, 1.15) for n in names])
        lesion = palette[zone]
        lesion += _smooth_noise(rng, size, max(4, size // 6))[..., None] * 10.0
    else:
        shade = rng.uniform(0.25, 1.1)
        colour = BENIGN_LIGHT * (1 - shade) + BENIGN_DARK * shade
        # even colour, slightly darker towards the centre, as a regular naevus network looks
        lesion = colour[None, None, :] * (0.92 + 0.08 * inside[..., None])
    img = img * (1 - alpha[..., None]) + lesion * alpha[..., None]

    hairs = _hair_layer(rng, size, int(rng.integers(0, 13)))
    hair_colour = np.array([45.0, 32.0, 26.0]) * rng.uniform(0.6, 1.4)
    img = img * (1 - hairs[..., None]) + hair_colour * hairs[..., None]

    # Vignetting around the image centre, exposure, sometimes the dermatoscope's dark rim.
    r_img = np.sqrt(x * x + y * y)
    img *= (1.0 - rng.uniform(0.0, 0.45) * (r_img / np.sqrt(2)) ** 2)[..., None]
    img *= rng.uniform(0.7, 1.2)
    img *= rng.uniform(0.88, 1.12, 3)  # white balance differs between dermatoscopes and cameras
    if rng.random() < 0.3:
        rim = np.clip((r_img - rng.uniform(1.0, 1.3)) / 0.05, 0.0, 1.0)
        img *= (1.0 - 0.9 * rim)[..., None]
    img += rng.normal(0.0, 2.5, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), alpha > 0.5


def _image_rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *keys])


def _render_rect(rng, melanoma: bool, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    side = max(width, height)
    img, mask = render_lesion(rng, melanoma, side)
    top, left = (side - height) // 2, (side - width) // 2
    return img[top : top + height, left : left + width], mask[top : top + height, left : left + width]


def _save_mask(mask: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(path)


def mask_path(image_path: str | os.PathLike) -> Path:
    """Where the lesion mask of ``image_path`` lives (the file may not exist).

    PH2: ``IMDxxx/IMDxxx_Dermoscopic_Image/IMDxxx.bmp`` -> ``IMDxxx/IMDxxx_lesion/IMDxxx_lesion.bmp``.
    Otherwise a parallel tree: for an image under ``<A>/...`` with a sibling ``<A>_masks``
    folder, the mask is ``<A>_masks/.../<stem>.png`` (DermMel layout: A = the DermMel folder).
    """
    p = Path(image_path)
    if p.parent.name.endswith("_Dermoscopic_Image"):
        return p.parent.parent / f"{p.stem}_lesion" / f"{p.stem}_lesion.bmp"
    for ancestor in p.parents:
        if ancestor.parent == ancestor:
            break
        masks = ancestor.parent / f"{ancestor.name}_masks"
        if masks.is_dir():
            return (masks / p.relative_to(ancestor)).with_suffix(".png")
    dermmel = p.parents[2] if len(p.parents) > 2 else p.parent
    return (dermmel.parent / f"{dermmel.name}_masks" / p.relative_to(dermmel)).with_suffix(".png")


def _per_class_counts(counts) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for split, value in dict(counts).items():
        folder = DERMMEL_SPLITS.get(split, split)
        if folder not in DERMMEL_SPLITS.values():
            raise ValueError(f"unknown split {split!r}; expected {sorted(DERMMEL_SPLITS)} or {sorted(DERMMEL_SPLITS.values())}")
        if isinstance(value, Mapping):
            out[folder] = {cls: int(value.get(cls, 0)) for cls in DERMMEL_CLASSES}
        else:
            out[folder] = {cls: int(value) for cls in DERMMEL_CLASSES}
    return out


def write_dermmel_layout(
    root: str | os.PathLike,
    counts: Mapping,
    image_size: int = 64,
    seed: int = 0,
    masks: bool = True,
    progress: bool = False,
) -> Path:
    """Write ``root/DermMel/{train_sep,valid,test}/{Melanoma,NotMelanoma}/`` and return the
    DermMel folder. ``counts``: split -> images per class, or split -> {class folder: n}
    (split names train/val/test or train_sep/valid/test). Melanoma files are ``.jpeg`` and the
    others ``.jpg``, as both occur in the real download. Masks go to ``root/DermMel_masks``."""
    root = Path(root)
    dermmel = root / "DermMel"
    plan = _per_class_counts(counts)
    jobs = [
        (split, cls, i)
        for split, per_class in plan.items()
        for cls, n in per_class.items()
        for i in range(n)
    ]
    split_ids = {s: k for k, s in enumerate(DERMMEL_SPLITS.values())}
    class_ids = {c: k for k, c in enumerate(DERMMEL_CLASSES)}
    for split, per_class in plan.items():
        for cls in DERMMEL_CLASSES:
            (dermmel / split / cls).mkdir(parents=True, exist_ok=True)
    for split, cls, i in tqdm(jobs, desc="synthetic lesions", disable=not progress):
        melanoma = DERMMEL_CLASSES[cls]
        img, mask = render_lesion(_image_rng(seed, split_ids[split], class_ids[cls], i), melanoma, image_size)
        ext = ".jpeg" if melanoma else ".jpg"
        path = dermmel / split / cls / f"synth_{split}_{i:05d}{ext}"
        Image.fromarray(img).save(path, quality=95)
        if masks:
            _save_mask(mask, root / "DermMel_masks" / split / cls / f"{path.stem}.png")
    return dermmel


# --- the built-in dataset ----------------------------------------------------------------------

class SyntheticDataModule(DermMelDataModule):
    """``dataset=synthetic``: generates the DermMel layout once under ``root`` (a folder keyed
    by generator version, seed, size and counts, reused when present) and reads it through
    the DermMel loading code."""

    name = SYNTHETIC_DATASET
    label_sets = {"binary": BINARY_CLASSES}
    split_setting_keys = (*DermMelDataModule.split_setting_keys, "counts", "generate_size", "generator_seed")

    def __init__(
        self,
        root: str | os.PathLike,
        counts: Mapping | None = None,
        generate_size: int = 64,
        generator_seed: int = 0,
        masks: bool = True,
        **kwargs,
    ):
        super().__init__(root, **kwargs)
        counts = {"train": 500, "val": 100, "test": 100} if counts is None else counts
        self.counts = {k: _plain(v) for k, v in dict(_plain(counts)).items()}
        self.generate_size = int(generate_size)
        self.generator_seed = int(generator_seed)
        self.masks = bool(masks)

    @property
    def generated_root(self) -> Path:
        plan = _per_class_counts(self.counts)
        count_key = "-".join(
            f"{plan.get(s, {}).get('Melanoma', 0)}x{plan.get(s, {}).get('NotMelanoma', 0)}"
            for s in DERMMEL_SPLITS.values()
        )
        key = (f"dermmel-v{GENERATOR_VERSION}-seed{self.generator_seed}-px{self.generate_size}"
               f"-n{count_key}{'-masks' if self.masks else ''}")
        return self.root / key

    def generate(self) -> Path:
        """The generated folder, written now if absent. Safe when several processes race:
        each writes a private folder and the first rename wins."""
        final = self.generated_root
        if (final / "DermMel").is_dir():
            return final
        self._create_root()
        tmp = self.root / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        log.info("generating the synthetic dataset in %s (dataset.root; once, reused afterwards)", final.resolve())
        write_dermmel_layout(tmp, self.counts, self.generate_size, self.generator_seed,
                             masks=self.masks, progress=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "DermMel").is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
        return final

    def _create_root(self) -> None:
        """Make ``root`` when it is missing, if that is plainly what was meant: it lies under the
        current directory (the default ./data/synthetic) or its parent exists. A root elsewhere
        whose parent is missing too is most likely a typo: refused, not created."""
        if self.root.is_dir():
            return
        root = self.root.resolve()
        if not (root.is_relative_to(Path.cwd().resolve()) or root.parent.is_dir()):
            raise FileNotFoundError(
                f"synthetic: dataset.root {self.root} does not exist, nor does its parent {root.parent}. "
                f"The synthetic dataset is generated into dataset.root: create the folder first "
                f"(mkdir -p {self.root}) or leave dataset.root at its default (./data/synthetic)")
        log.info("synthetic: creating dataset.root %s to generate the synthetic images in", root)
        self.root.mkdir(parents=True, exist_ok=True)

    def prepare_data(self) -> None:
        self.generate()
        super().prepare_data()

    def build_table(self) -> pd.DataFrame:
        return self.table_from(self.find_dermmel(self.generate()))


__all__ = [
    "GENERATOR_VERSION",
    "LesionDataModule",
    "SyntheticDataModule",
    "mask_path",
    "render_lesion",
    "write_dermmel_layout",
]
