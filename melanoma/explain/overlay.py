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

LABEL_HEIGHT = 20
TITLE_HEIGHT = 26
# zlib level 1 writes these pictures ~2-3x faster than PIL's default 6 for ~15 % more bytes;
# with --attention on a small model the PNG encoder is otherwise the largest single cost
PNG_COMPRESS_LEVEL = 1
HEAD_TILE = 160
#: side of each panel of a map picture: what the model saw, large enough to read
PANEL = 320
COLOUR_BAR_WIDTH = 16
COLOUR_BAR_SPACE = 64  # the bar and its labels
#: per-head maps whose every pair correlates at least this much are said to coincide
HEADS_COINCIDE = 0.95
#: what each map method is called on the pictures
METHOD_NAMES = {
    "rollout": "Attention rollout",
    "grad_rollout": "Gradient-weighted rollout",
    "last_layer": "Last-layer attention (mean of heads)",
    "gradcam": "Grad-CAM",
}


@functools.lru_cache(maxsize=4)
def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


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
    ImageDraw.Draw(canvas).text((2, 2), text, fill="black", font=_font(13))
    return canvas


def colour_bar(height: int, cmap: str = "jet") -> Image.Image:
    """A vertical colour bar (high at the top) with its scale: maps are min-max scaled per image."""
    canvas = Image.new("RGB", (COLOUR_BAR_SPACE, height + LABEL_HEIGHT), "white")
    ramp = _lut(cmap)[np.linspace(255, 0, height).round().astype(np.uint8)]
    canvas.paste(Image.fromarray(np.repeat(ramp[:, None, :], COLOUR_BAR_WIDTH, axis=1)), (4, LABEL_HEIGHT))
    draw = ImageDraw.Draw(canvas)
    font = _font(12)
    draw.text((2, 2), "scale", fill="black", font=font)
    draw.text((COLOUR_BAR_WIDTH + 8, LABEL_HEIGHT), "max", fill="black", font=font)
    draw.text((COLOUR_BAR_WIDTH + 8, LABEL_HEIGHT + height // 2 - 7), "mid", fill="black", font=font)
    draw.text((COLOUR_BAR_WIDTH + 8, LABEL_HEIGHT + height - 14), "min", fill="black", font=font)
    return canvas


def _wrap(text: str, width: float, font) -> list[str]:
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and measure(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + [line] if line else lines


def _titled(body: Image.Image, texts: list[str]) -> Image.Image:
    """``body`` under its title texts, each wrapped to the body's width."""
    font = _font(15)
    lines = [line for text in texts for line in _wrap(text, body.width - 8, font)]
    out = Image.new("RGB", (body.width, body.height + TITLE_HEIGHT * len(lines)), "white")
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((4, 4 + i * TITLE_HEIGHT), line, fill="black", font=font)
    out.paste(body, (0, TITLE_HEIGHT * len(lines)))
    return out


def heads_agreement(per_head: np.ndarray) -> float:
    """The lowest Pearson correlation between any two heads' maps (1.0 for one head or maps
    that do not vary): how far the heads look at different patches."""
    flat = np.asarray(per_head, dtype=np.float64).reshape(len(per_head), -1)
    if len(flat) < 2:
        return 1.0
    flat = flat - flat.mean(1, keepdims=True)
    norms = np.linalg.norm(flat, axis=1)
    varying = norms > 1e-12
    if varying.sum() < 2:
        return 1.0
    corr = (flat[varying] @ flat[varying].T) / np.outer(norms[varying], norms[varying])
    return float(corr[np.triu_indices(int(varying.sum()), 1)].min())


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
    """Write a PNG: the title (method and decision) over three panels, the image, the heat map
    and the overlay, and a colour bar."""
    img = _rgb(image)
    heat = heatmap_rgb(map2d, (img.shape[1], img.shape[0]))
    panels = [_labelled(img, "image"), _labelled(heat, "heat map"), _labelled(blend(img, heat, alpha), "overlay"),
              colour_bar(img.shape[0])]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = _row(panels)
    (_titled(body, [title]) if title else body).save(path, compress_level=PNG_COMPRESS_LEVEL)
    return path


def save_head_grid(
    path: str | os.PathLike, image, per_head: np.ndarray, mean: np.ndarray | None = None, alpha: float = 0.5,
    tile: int = HEAD_TILE, title: str = "",
) -> Path:
    """Write a PNG grid: one overlay per attention head (heads, h, w), then their mean; tiles of
    at most `tile` px (a 14x14 attention map shows no more detail at full size). Its header says
    whether the heads coincide (every pair of maps correlates >= HEADS_COINCIDE) or how far
    they differ."""
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
    grid = _grid(tiles, columns)
    body = _row([grid, colour_bar(grid.height - LABEL_HEIGHT)])
    agreement = heads_agreement(per_head)
    n = len(per_head)
    if agreement >= HEADS_COINCIDE:
        note = (f"The {n} heads coincide here (every pair of maps correlates >= {agreement:.3f}): "
                f"they attend to the same patches, so their maps look alike.")
    else:
        note = (f"The heads differ (lowest correlation between two maps {agreement:.3f}); "
                f"each map is scaled to its own range.")
    lines = [title or f"Last-layer attention, one map per head ({n} heads)", note]
    _titled(body, lines).save(path, compress_level=PNG_COMPRESS_LEVEL)
    return path
