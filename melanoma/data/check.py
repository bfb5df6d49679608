"""Decode every image of a dataset and list the ones that fail, before a long run does."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from tqdm.auto import tqdm

from .io import ImageReadError, load_rgb

log = logging.getLogger(__name__)


def check_images(paths: Iterable[str | os.PathLike], progress: bool = True) -> list[tuple[str, str]]:
    """(path, error message) for each image that cannot be fully decoded, in input order."""
    paths = list(paths)
    bad: list[tuple[str, str]] = []
    for p in tqdm(paths, desc="checking images", unit="img", disable=not progress):
        try:
            load_rgb(p)  # full size: a reduced JPEG decode could skip a damaged region
        except ImageReadError as e:
            bad.append((str(p), e.reason))
    if bad:
        log.warning("%d of %d images cannot be read", len(bad), len(paths))
    return bad


def dataset_image_paths(datamodule) -> list[str]:
    """Every image path of a LesionDataModule (all splits), without building its cache."""
    if datamodule.table is None and datamodule.cache_dir is None:
        datamodule.setup()
    # With a cache, setup() would build it first and stop at the first unreadable image instead
    # of listing them all: read only the dataset's table then.
    table = datamodule.table if datamodule.table is not None else datamodule._make_table()
    return table["path"].tolist()


def check_dataset(datamodule, progress: bool = True) -> list[tuple[str, str]]:
    """check_images over every image of a LesionDataModule (all splits)."""
    return check_images(dataset_image_paths(datamodule), progress=progress)
