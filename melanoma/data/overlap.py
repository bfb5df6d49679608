"""The same image in two datasets: a leak when it is held out in one and trained on in another.

HAM10000 reappears inside ISIC 2018 and 2019, and DermMel is cut from ISIC. Across datasets an
image is identified by its ``ISIC_xxxxxxx`` file stem (2019 renamed about 2,000 downscaled
copies ``ISIC_xxxxxxx_downsampled``; the suffix is dropped) and, when fingerprints are given, by
its content (``melanoma.data.fingerprints``): DermMel's renamed augmented ``AUG_*`` copies and
PH2 images under other names are found that way.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

ISIC_ID = re.compile(r"isic_(\d+)(?:_downsampled)?", re.IGNORECASE)
HELD_OUT_SPLITS = ("val", "test")
OVERLAP_COLUMNS = ["image_id", "held_out_dataset", "held_out_split", "train_dataset", "train_path", "match"]


def image_id(path: str | os.PathLike) -> str | None:
    """``ISIC_xxxxxxx`` for an ISIC image file (any case, ``_downsampled`` removed), else None."""
    stem = os.path.splitext(os.path.basename(os.fspath(path)))[0]
    match = ISIC_ID.fullmatch(stem)
    return None if match is None else f"ISIC_{match.group(1)}"


def seen_id(path: str | os.PathLike) -> str:
    """The id a seen-set records for an image: its ISIC id, else its file stem (shown, not matched)."""
    return image_id(path) or os.path.splitext(os.path.basename(os.fspath(path)))[0]


def cross_dataset_overlap(tables: Mapping[str, pd.DataFrame],
                          fingerprints: Mapping[str, np.ndarray] | None = None) -> pd.DataFrame:
    """Images in one dataset's val or test split that are in another dataset's train split.

    ``tables`` maps a dataset name to its split table (columns path and split, as
    ``LesionDataModule.table``); ``fingerprints`` (optional) maps it to the (N, 8, B) content
    fingerprints of those rows. One row per (held-out image, train image of another dataset) that
    share an ISIC id ("id") or content ("content"), sorted; empty when nothing leaks. ``image_id``
    is the held-out image's id (``seen_id``).
    """
    from .fingerprints import MATCH_DISTANCE, distances

    rows = {}
    for held_out, held_table in tables.items():
        out_mask = held_table["split"].isin(HELD_OUT_SPLITS).to_numpy()
        out = held_table[out_mask]
        out_ids = out["path"].map(image_id)
        for trained_on, train_table in tables.items():
            if trained_on == held_out:
                continue
            train_mask = (train_table["split"] == "train").to_numpy()
            train = train_table[train_mask]
            by_id = {}
            for p, i in zip(train["path"], train["path"].map(image_id)):
                if i is not None:
                    by_id.setdefault(i, []).append(p)
            for p, i, s in zip(out["path"], out_ids, out["split"]):
                for q in by_id.get(i, []) if i is not None else []:
                    rows[(p, trained_on, q)] = (seen_id(p), held_out, s, trained_on, q, "id")
            if fingerprints is None or out.empty or train.empty:
                continue
            held_fp = fingerprints[held_out][out_mask]  # rows in table order
            train_fp = fingerprints[trained_on][train_mask]
            for start, d in distances(held_fp, train_fp):
                for a, b in zip(*np.nonzero(d <= MATCH_DISTANCE)):
                    p, s, q = out["path"].iloc[start + a], out["split"].iloc[start + a], train["path"].iloc[b]
                    rows.setdefault((p, trained_on, q), (seen_id(p), held_out, s, trained_on, q, "content"))
    return pd.DataFrame(sorted(rows.values()), columns=OVERLAP_COLUMNS)


def drop_overlap_from_train(tables: Mapping[str, pd.DataFrame],
                            overlap: pd.DataFrame | None = None) -> dict[str, pd.DataFrame]:
    """Copies of ``tables`` without the train rows whose image another dataset holds out
    (``overlap`` as from ``cross_dataset_overlap``, computed when not given). Held-out splits
    are never changed: they are what results are reported on."""
    if overlap is None:
        overlap = cross_dataset_overlap(tables)
    cleaned = {}
    for name, table in tables.items():
        leaked = set(overlap["train_path"][overlap["train_dataset"] == name])
        drop = (table["split"] == "train") & table["path"].isin(leaked)
        if drop.any():
            log.info("%s: dropped %d train image(s) that another dataset holds out for val/test",
                     name, int(drop.sum()))
        cleaned[name] = table[~drop].reset_index(drop=True)
    return cleaned


__all__ = ["cross_dataset_overlap", "drop_overlap_from_train", "image_id", "seen_id"]
