"""PNG pictures of attention maps: image | heat map | overlay panels and a per-head grid.

Drawn with PIL and a matplotlib colormap rather than matplotlib figures: a figure costs tens
of milliseconds per image, which would dominate `melanoma predict --attention` on small models.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw

LABEL_HEIGHT = 14
# zlib level 1 writes these pictures ~2-3x faster than PIL's default 6 for ~15 % more bytes;
# with --attention on a small model the PNG encoder is otherwise the largest single cost
PNG_COMPRESS_LEVEL = 1
HEAD_TILE = 128


def normalise(map2d: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] (min-max); a constant map becomes all zeros."""
    m = np.asarray(map2d, dtype=np.float32)
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def upsample(map2d: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a (h, w) float map to size (width, height)."""
    return np.asarray(Image.fromarray(np.asarray(map2d, dtype=np.float32), mode="F").resize(size, Image.BILINEAR))


@functools.lru_cache(maxsize=8)
def _lut(cmap: str) -> np.ndarray:
    # a 256-entry lookup table: indexing it is ~50x faster than calling the colormap per pixel
    return (colormaps[cmap](np.arange(256))[:, :3] * 255).round().astype(np.uint8)


def heatmap_rgb(map2d: np.ndarray, size: tuple[int, int], cmap: str = "jet") -> np.ndarray:
    """(H, W, 3) uint8 colour picture of a map, normalised and resized to size (width, height)."""
    values = normalise(upsample(normalise(map2d), size))
    return _lut(cmap)[(values * 255).round().astype(np.uint8)]


def blend(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    return ((1 - alpha) * image.astype(np.float32) + alpha * heat.astype(np.float32)).round().astype(np.uint8)


def overlay(image: np.ndarray | Image.Image, map2d: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """The heat map blended over an RGB image (H, W, 3) uint8."""
    img = _rgb(image)
    return blend(img, heatmap_rgb(map2d, (img.shape[1], img.shape[0]), cmap), alpha)


def _labelled(tile: np.ndarray, text: str) -> Image.Image:
    h, w = tile.shape[:2]
    canvas = Image.new("RGB", (w, h + LABEL_HEIGHT), "white")
    canvas.paste(Image.fromarray(tile), (0, LABEL_HEIGHT))
    ImageDraw.Draw(canvas).text((2, 1), text, fill="black")
    return canvas


def _row(tiles: list[Image.Image], gap: int = 4) -> Image.Image:
    width = sum(t.width for t in tiles) + gap * (len(tiles) - 1)
    out = Image.new("RGB", (width, max(t.height for t in tiles)), "white")
    x = 0
    for t in tiles:
        out.paste(t, (x, 0))
        x += t.width + gap
    return out


def _grid(tiles: list[Image.Image], columns: int, gap: int = 4) -> Image.Image:
    rows = [_row(tiles[i : i + columns], gap) for i in range(0, len(tiles), columns)]
    out = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows) + gap * (len(rows) - 1)), "white")
    y = 0
    for r in rows:
        out.paste(r, (0, y))
        y += r.height + gap
    return out


def _rgb(image: np.ndarray | Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.uint8)


def save_overlay(path: str | os.PathLike, image, map2d: np.ndarray, title: str = "", alpha: float = 0.5) -> Path:
    """Write a PNG with three panels: the image, the heat map, and the overlay."""
    img = _rgb(image)
    heat = heatmap_rgb(map2d, (img.shape[1], img.shape[0]))
    panels = [_labelled(img, title or "image"), _labelled(heat, "heat map"), _labelled(blend(img, heat, alpha), "overlay")]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _row(panels).save(path, compress_level=PNG_COMPRESS_LEVEL)
    return path


def save_head_grid(
    path: str | os.PathLike, image, per_head: np.ndarray, mean: np.ndarray | None = None, alpha: float = 0.5,
    tile: int = HEAD_TILE,
) -> Path:
    """Write a PNG grid: one overlay per attention head (heads, h, w), then their mean; tiles of
    at most `tile` px (a 14x14 attention map shows no more detail at full size)."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(_rgb(image))
    if max(img.size) > tile:
        img = img.resize((tile, round(tile * img.height / img.width)), Image.BICUBIC)
    img = _rgb(img)
    tiles = [_labelled(overlay(img, m, alpha), f"head {i}") for i, m in enumerate(per_head)]
    if mean is not None:
        tiles.append(_labelled(overlay(img, mean, alpha), "mean"))
    columns = int(np.ceil(np.sqrt(len(tiles))))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _grid(tiles, columns).save(path, compress_level=PNG_COMPRESS_LEVEL)
    return path
