"""Pre-resized image cache: decode each large original once, then train from small JPEGs.

Two kinds of entries: for training, the image at a short side a little above the image size
(JPEG or .npy; augmentation crops and resizes it further, however is fastest); for evaluation
(validation and test during training), exactly the uint8 pixels the eval preprocessing makes of
the original file (``EvalTransform.pixels`` after a full decode, always .npy), so a cached
validation sees the very tensor `melanoma predict` computes for the same file.

Entries are keyed by the source file's absolute path, size and mtime plus the cache short side,
so an edited or replaced image gets a new entry and a different image size never reads a
stale one. Writes go to a temporary name and are renamed into place, so ranks or workers that
build the same cache at once never see half-written files.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .io import load_rgb

log = logging.getLogger(__name__)

CACHE_VERSION = 1
JPEG_QUALITY = 95
# "jpg": compact (~30 KB at 256 px), decoded again each epoch. "npy": raw uint8 arrays
# (~260 KB at 256 px), no decode at all: the faster choice when the disk has room.
CACHE_FORMATS = ("jpg", "npy")


def default_cache_size(image_size: int) -> int:
    """Short side kept in the cache: the usual 256-for-224 margin, scaled to the image size."""
    return max(int(round(image_size * 256 / 224)), 32)


def cache_path(cache_dir: str | os.PathLike, source: str | os.PathLike, short_side: int,
               fmt: str = "jpg", variant: str | None = None) -> Path:
    """Where the entry of ``source`` lives; ``variant`` names another kind of entry than the
    short-side one (its folder, and part of the key)."""
    if fmt not in CACHE_FORMATS:
        raise ValueError(f"cache format must be one of {CACHE_FORMATS}, got {fmt!r}")
    source = Path(source).resolve()
    st = source.stat()
    key = f"v{CACHE_VERSION}|{source}|{st.st_size}|{st.st_mtime_ns}|{short_side if variant is None else variant}"
    digest = hashlib.sha1(key.encode()).hexdigest()
    return Path(cache_dir) / (variant or f"s{short_side}") / digest[:2] / f"{digest}.{fmt}"


def eval_variant(transform) -> str:
    """The cache variant of an eval preprocessing (EvalTransform): its size and filter."""
    h, w = transform.size
    return f"eval_{transform.resample}_{h}x{w}"


def resize_short_side(img: Image.Image, short_side: int) -> Image.Image:
    w, h = img.size
    if min(w, h) <= short_side:
        return img
    scale = short_side / min(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def _write_entry(source: str, target: Path, short_side: int) -> None:
    _save(resize_short_side(load_rgb(source, target_size=short_side), short_side), target)


def _write_eval_entry(source: str, target: Path, transform) -> None:
    # full decode (no draft), exactly as melanoma.predict reads a file
    _save(transform.pixels(load_rgb(source)), target)


def _save(img, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    if target.suffix == ".npy":
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(img))
    else:
        img.save(tmp, format="JPEG", quality=JPEG_QUALITY)
    os.replace(tmp, target)


def build_cache(
    sources: Sequence[str],
    cache_dir: str | os.PathLike,
    short_side: int,
    num_threads: int = 2,
    progress: bool = True,
    fmt: str = "jpg",
) -> list[str]:
    """Cached file for each source (built where missing), in the same order."""
    targets = [cache_path(cache_dir, s, short_side, fmt) for s in sources]
    return _fill(sources, targets, lambda src, t: _write_entry(src, t, short_side), num_threads, progress,
                 f"caching {{}} images at short side {short_side} under {cache_dir}")


def build_eval_cache(
    sources: Sequence[str],
    cache_dir: str | os.PathLike,
    transform,
    num_threads: int = 2,
    progress: bool = True,
) -> list[str]:
    """Cached eval pixels (``transform``: the EvalTransform) for each source, in the same order."""
    variant = eval_variant(transform)
    targets = [cache_path(cache_dir, s, transform.size[0], "npy", variant) for s in sources]
    return _fill(sources, targets, lambda src, t: _write_eval_entry(src, t, transform), num_threads, progress,
                 f"caching {{}} images' eval pixels ({variant}) under {cache_dir}")


def _fill(sources, targets: list[Path], write, num_threads: int, progress: bool, message: str) -> list[str]:
    missing = [(s, t) for s, t in zip(sources, targets) if not t.exists()]
    if missing:
        log.info(message.format(len(missing)))
        with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
            jobs = pool.map(lambda st: write(st[0], st[1]), missing)
            for _ in tqdm(jobs, total=len(missing), desc="caching images", disable=not progress):
                pass
    return [str(t) for t in targets]
