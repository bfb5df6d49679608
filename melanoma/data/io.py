"""Reading images from disk: one place that turns any image file into an RGB PIL image.

Dermoscopy folders collect files from many devices and tools, so the loader normalises every
mode PIL can produce (grayscale, palette, RGBA, CMYK, 16-bit) to 8-bit RGB, applies the EXIF
orientation the camera recorded, and decodes large JPEGs at a reduced size when the caller only
needs a small image (PIL's JPEG draft mode skips most of the IDCT work).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

# Dermoscopy images are at most a few tens of megapixels; anything far beyond is a broken or
# hostile file rather than a lesion photograph.
Image.MAX_IMAGE_PIXELS = 200_000_000


class ImageReadError(OSError):
    """An image file that cannot be decoded. Carries the path and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str | None = None):
        if reason is None:
            # One-argument form: how DataLoader re-raises a worker's exception in the main
            # process (with the worker's formatted traceback, which names the file).
            self.path, self.reason = None, str(path)
            super().__init__(str(path))
            return
        self.path = Path(path)
        self.reason = reason
        super().__init__(
            f"cannot read image {self.path}: {reason}. Replace or remove the file "
            f"(`melanoma check-data` lists every unreadable image of a dataset)."
        )

    def __reduce__(self):  # keep it picklable across DataLoader worker processes
        return (type(self), (self.path, self.reason))


def _short_side_target(target_size) -> tuple[int, int] | None:
    if target_size is None:
        return None
    if isinstance(target_size, int):
        return (target_size, target_size)
    w, h = target_size
    return (int(w), int(h))


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit grayscale (PNG, TIFF). PIL's convert("L") clips instead of scaling, which turns
        # most 16-bit images white; scale the full 16-bit range down to 8 bits instead.
        arr = np.asarray(img).astype(np.int64)
        if mode == "I" and arr.max(initial=0) <= 255:
            arr8 = np.clip(arr, 0, 255).astype(np.uint8)
        else:
            arr8 = (np.clip(arr, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        if arr.size and float(np.nanmax(arr)) <= 1.0:
            arr = arr * 255.0
        arr8 = np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        # Transparent pixels are shown over a white page by every viewer; do the same rather
        # than exposing whatever colour values hide under alpha = 0.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def load_rgb(path: str | os.PathLike, target_size=None) -> Image.Image:
    """Decode ``path`` to an 8-bit RGB image with its EXIF orientation applied.

    ``target_size`` (int short side, or (w, h)) lets a JPEG be decoded at 1/2, 1/4 or 1/8 scale
    as long as the result stays at least that large; other formats decode at full size.
    Raises ImageReadError (naming the file) for missing, empty, corrupt or truncated files.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except OSError as e:
        raise ImageReadError(path, f"cannot stat file ({e})") from None
    if size == 0:
        raise ImageReadError(path, "file is empty (0 bytes)")
    try:
        with Image.open(path) as img:
            target = _short_side_target(target_size)
            if target is not None and img.format == "JPEG":
                # Orientation 5-8 swap width and height; the draft request must cover both.
                side = max(target)
                img.draft("RGB", (side, side))
            img.load()
            # getexif() costs ~0.1 ms; formats that keep EXIF in info["exif"] can skip it.
            if img.format not in ("JPEG", "PNG", "WEBP", "MPO") or "exif" in img.info:
                img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageReadError(path, f"image too large ({e})") from None
    except (OSError, SyntaxError, ValueError, TypeError, EOFError) as e:
        reason = str(e) or type(e).__name__
        if "truncated" in reason.lower():
            reason = f"file is truncated ({reason})"
        raise ImageReadError(path, reason) from None


def is_image_file(path: str | os.PathLike) -> bool:
    name = os.path.basename(os.fspath(path))
    # AppleDouble files ("._IMD002.bmp") and other hidden files come with zips made on macOS.
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def find_images(paths_or_folders) -> list[Path]:
    """Image files (jpg/jpeg/png/bmp/tif) named directly or found under folders, sorted.

    A file named explicitly must have an image extension; a missing path is an error.
    """
    if isinstance(paths_or_folders, (str, os.PathLike)):
        paths_or_folders = [paths_or_folders]
    found: set[Path] = set()
    for item in paths_or_folders:
        p = Path(item)
        if p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                found.update(Path(dirpath) / f for f in filenames if is_image_file(f))
        elif p.is_file():
            if not p.name.lower().endswith(IMAGE_EXTENSIONS):
                raise ValueError(
                    f"{p} is not an image file: expected one of {', '.join(IMAGE_EXTENSIONS)}"
                )
            found.add(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    return sorted(found)


def iter_files(folder: Path, extensions: Iterable[str]) -> list[Path]:
    """Files directly inside ``folder`` with one of ``extensions`` (case-insensitive), sorted."""
    exts = tuple(e.lower() for e in extensions)
    with os.scandir(folder) as it:
        return sorted(
            Path(e.path)
            for e in it
            if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(exts)
        )
