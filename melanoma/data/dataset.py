"""What a DataLoader worker process runs: image files to tensors.

Kept apart from the DataModule (melanoma.data.base, which imports Lightning) so that a worker
imports only torch, numpy, OpenCV, PIL and albumentations: workers start from a fork server
(melanoma.data.workers) that preloads this module, and a light module starts it sooner.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from .io import load_rgb
from .transforms import EvalTransform, ImageTransform

__all__ = ["ImagePathDataset", "LesionImageDataset"]


class LesionImageDataset(Dataset):
    """(image tensor, label) pairs from image files; decoding errors name the file. With
    ``metadata`` (an (N, D) array, melanoma.metadata) each item is ((image, metadata), label)."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], transform: ImageTransform,
                 decode_size: int | None = None, metadata: np.ndarray | None = None):
        # A numpy string array, not a list of str objects: forked workers touching Python
        # objects copy their pages (refcounts), numpy buffers stay shared.
        self.paths = np.asarray([str(p) for p in paths])
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.decode_size = decode_size
        self.metadata = None if metadata is None else np.asarray(metadata, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.paths[i]
        if path.endswith(".npy"):  # pre-resized cache entry: a raw HxWx3 uint8 array
            img = np.load(path)
        else:
            img = load_rgb(path, target_size=self.decode_size)
        if self.metadata is not None:
            return (self.transform(img), torch.from_numpy(self.metadata[i])), int(self.labels[i])
        return self.transform(img), int(self.labels[i])


def _seed_worker_augmentations(worker_id: int) -> None:
    # Albumentations keeps its own RNG, created once in the parent; forked workers would all
    # replay the same augmentation sequence. Reseed it from the per-worker, per-epoch torch seed.
    info = get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(info.seed % 2**32)
    # Workers are processes already; OpenCV's own thread pool per worker only oversubscribes.
    cv2.setNumThreads(1)


class ImagePathDataset(Dataset):
    """Image files -> eval tensors, in order (``melanoma.predict``: full decode, EXIF applied);
    with ``metadata`` ((N, D) encoded, melanoma.metadata) each item is (image, metadata)."""

    def __init__(self, paths: Sequence[str | os.PathLike], transform: EvalTransform, metadata: np.ndarray | None = None):
        self.paths = np.asarray([str(p) for p in paths])
        self.transform = transform
        self.metadata = None if metadata is None else np.asarray(metadata, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        image = self.transform(load_rgb(self.paths[i]))
        return image if self.metadata is None else (image, torch.from_numpy(self.metadata[i]))
