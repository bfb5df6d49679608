"""The same image in two datasets: a leak when it is held out in one and trained on in another.

HAM10000 reappears inside ISIC 2018 and 2019, and DermMel is cut from ISIC. Across datasets an
image is identified by its ``ISIC_xxxxxxx`` file stem (2019 renamed about 2,000 downscaled
copies ``ISIC_xxxxxxx_downsampled``; the suffix is dropped). Files with other names (DermMel's
augmented ``AUG_*`` copies, PH2) cannot be matched this way and are left alone.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping

import pandas as pd

log = logging.getLogger(__name__)

ISIC_ID = re.compile(r"isic_(\d+)(?:_downsampled)?", re.IGNORECASE)
HELD_OUT_SPLITS = ("val", "test")
OVERLAP_COLUMNS = ["image_id", "held_out_dataset", "held_out_split", "train_dataset"]


def image_id(path: str | os.PathLike) -> str | None:
    """``ISIC_xxxxxxx`` for an ISIC image file (any case, ``_downsampled`` removed), else None."""
    stem = os.path.splitext(os.path.basename(os.fspath(path)))[0]
    match = ISIC_ID.fullmatch(stem)
    return None if match is None else f"ISIC_{match.group(1)}"


def seen_id(path: str | os.PathLike) -> str:
    """The id a seen-set records for an image: its ISIC id, else its file stem (shown, not matched)."""
    return image_id(path) or os.path.splitext(os.path.basename(os.fspath(path)))[0]


def _ids(table: pd.DataFrame) -> pd.DataFrame:
    ids = table["path"].map(image_id)
    return pd.DataFrame({"image_id": ids, "split": table["split"]})[ids.notna()]


def cross_dataset_overlap(tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Images in one dataset's val or test split that are in another dataset's train split.

    ``tables`` maps a dataset name to its split table (columns path and split, as
    ``LesionDataModule.table``). One row per (image_id, held-out dataset, its split, dataset
    that trains on it), sorted; empty when nothing leaks.
    """
    ids = {name: _ids(t) for name, t in tables.items()}
    train = {name: set(d["image_id"][d["split"] == "train"]) for name, d in ids.items()}
    rows = set()
    for held_out, d in ids.items():
        out = d[d["split"].isin(HELD_OUT_SPLITS)]
        for trained_on, train_ids in train.items():
            if trained_on != held_out:
                hits = out[out["image_id"].isin(train_ids)]
                rows.update((i, held_out, s, trained_on) for i, s in zip(hits["image_id"], hits["split"]))
    return pd.DataFrame(sorted(rows), columns=OVERLAP_COLUMNS)


def drop_overlap_from_train(tables: Mapping[str, pd.DataFrame],
                            overlap: pd.DataFrame | None = None) -> dict[str, pd.DataFrame]:
    """Copies of ``tables`` without the train rows whose image another dataset holds out
    (``overlap`` as from ``cross_dataset_overlap``, computed when not given). Held-out splits
    are never changed: they are what results are reported on."""
    if overlap is None:
        overlap = cross_dataset_overlap(tables)
    cleaned = {}
    for name, table in tables.items():
        leaked = set(overlap["image_id"][overlap["train_dataset"] == name])
        drop = (table["split"] == "train") & table["path"].map(image_id).isin(leaked)
        if drop.any():
            log.info("%s: dropped %d train image(s) that another dataset holds out for val/test",
                     name, int(drop.sum()))
        cleaned[name] = table[~drop].reset_index(drop=True)
    return cleaned


__all__ = ["cross_dataset_overlap", "drop_overlap_from_train", "image_id", "seen_id"]
