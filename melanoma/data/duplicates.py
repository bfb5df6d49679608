"""The duplicate audit (`melanoma check-data --duplicates`): near-duplicate clusters within each
dataset and pairs across datasets, by content fingerprint, as a table and a montage to judge by eye.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from .fingerprints import MATCH_DISTANCE, distances, near_duplicate_clusters, near_duplicate_pairs

log = logging.getLogger(__name__)

__all__ = ["DUPLICATES_FILE", "MONTAGE_FILE", "duplicate_pairs", "duplicate_counts", "duplicate_montage"]

DUPLICATES_FILE, MONTAGE_FILE = "duplicates.csv", "duplicates.png"
COLUMNS = ["kind", "dataset_a", "path_a", "split_a", "dataset_b", "path_b", "split_b", "distance", "cluster"]


def duplicate_pairs(tables: Mapping[str, pd.DataFrame], fingerprints: Mapping[str, np.ndarray],
                    max_distance: int = MATCH_DISTANCE) -> pd.DataFrame:
    """Every pair of images that match by content: ``within`` one dataset (with the id of its
    near-duplicate cluster there) and ``across`` two datasets. Sorted by distance."""
    rows = []
    for name, t in tables.items():
        fp = fingerprints[name]
        clusters = near_duplicate_clusters(fp, max_distance)
        for i, j, d in near_duplicate_pairs(fp, max_distance):
            rows.append(("within", name, t["path"].iloc[i], t["split"].iloc[i], name, t["path"].iloc[j],
                         t["split"].iloc[j], int(d), f"{name}:{clusters[i]}"))
    for a, b in itertools.combinations(tables, 2):
        ta, tb = tables[a], tables[b]
        for start, d in distances(fingerprints[a], fingerprints[b]):
            for i, j in zip(*np.nonzero(d <= max_distance)):
                rows.append(("across", a, ta["path"].iloc[start + i], ta["split"].iloc[start + i], b,
                             tb["path"].iloc[j], tb["split"].iloc[j], int(d[i, j]), ""))
    return pd.DataFrame(rows, columns=COLUMNS).sort_values(["distance", "kind", "path_a"]).reset_index(drop=True)


def duplicate_counts(tables: Mapping[str, pd.DataFrame], pairs: pd.DataFrame) -> pd.DataFrame:
    """One row per dataset (clusters within it, the images in them, those straddling splits) and
    per pair of datasets (pairs across, images of each involved)."""
    rows = []
    for name, t in tables.items():
        w = pairs[(pairs.kind == "within") & (pairs.dataset_a == name)]
        images = set(w.path_a) | set(w.path_b)
        split_of = dict(zip(t["path"], t["split"]))
        per_cluster = pd.DataFrame({"cluster": list(w.cluster) * 2, "path": list(w.path_a) + list(w.path_b)})
        straddle = sum(len({split_of[p] for p in g.path}) > 1 for _, g in per_cluster.groupby("cluster"))
        rows.append({"datasets": name, "images": len(t), "pairs": len(w), "clusters": w.cluster.nunique(),
                     "images_in_clusters": len(images), "clusters_across_splits": straddle})
    for a, b in itertools.combinations(tables, 2):
        x = pairs[(pairs.kind == "across") & (pairs.dataset_a == a) & (pairs.dataset_b == b)]
        rows.append({"datasets": f"{a} x {b}", "images": f"{len(tables[a])} x {len(tables[b])}", "pairs": len(x),
                     "clusters": "", "images_in_clusters": f"{x.path_a.nunique()} x {x.path_b.nunique()}",
                     "clusters_across_splits": ""})
    return pd.DataFrame(rows)


def duplicate_montage(pairs: pd.DataFrame, path: str | Path, per_group: int = 6, side: int = 160,
                      max_distance: int = MATCH_DISTANCE) -> Path | None:
    """A PNG of matched pairs side by side: the closest ``per_group`` and the ``per_group``
    nearest the threshold (borderline: where a wrong match would show), each captioned with its
    datasets, file names and distance. None when there are no pairs."""
    from PIL import Image, ImageDraw, ImageOps

    if pairs.empty:
        return None
    chosen = [("closest", pairs.head(per_group))]
    rest = pairs.iloc[per_group:]
    if len(rest):
        chosen.append((f"borderline (threshold {max_distance})", rest.tail(per_group).iloc[::-1]))
    caption, gap = 34, 8
    rows = sum(len(c) for _, c in chosen) + len(chosen)
    canvas = Image.new("RGB", (2 * side + 3 * gap, rows * (side + caption) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    y = gap
    for title, group in chosen:
        draw.text((gap, y + caption // 2), title, fill="black")
        y += caption
        for r in group.itertuples():
            for k, p in enumerate((r.path_a, r.path_b)):
                im = ImageOps.contain(Image.open(p).convert("RGB"), (side, side))
                canvas.paste(im, (gap + k * (side + gap), y))
            draw.text((gap, y + side + 2), f"{r.dataset_a}/{Path(r.path_a).name}  |  {r.dataset_b}/{Path(r.path_b).name}",
                      fill="black")
            draw.text((gap, y + side + 16), f"distance {r.distance} ({r.kind})", fill="dimgray")
            y += side + caption
    path = Path(path)
    canvas.crop((0, 0, canvas.width, y + gap)).save(path)
    return path
