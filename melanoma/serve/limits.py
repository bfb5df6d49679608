"""What one request to `melanoma serve` may carry. The CLI options take their defaults from here."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_HOST = "127.0.0.1"  # loopback: exposing the server is a decision (--host 0.0.0.0)
DEFAULT_PORT = 8000
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServeLimits:
    # a clinician's handful of photos; a folder is a job for `melanoma predict`
    max_files: int = 16
    # the whole request body; dermoscopy JPEGs are a few MB each
    max_bytes: int = 64 * 1024 * 1024
    # decoded pixels per image: dermoscopy cameras give at most a few tens of megapixels, so
    # more is a broken or hostile file (a decompression bomb) and is refused before decoding
    max_pixels: int = 40_000_000

    def __post_init__(self):
        for name in ("max_files", "max_bytes", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
