"""Never score what a model has seen: the images of a test set that the checkpoint's seen-set
(``CheckpointMeta.seen``: its own and its init_from lineage's train, val and site-sample images,
and its training datasets' test images) holds, by ISIC id or by content fingerprint.

``seen_overlap`` finds them; ``evaluate --external`` and ``recalibrate`` drop them before
anything is scored or fitted (unless asked to keep them), write them to ``excluded.csv`` and
count them in ``metrics.json``'s ``overlap`` section.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from melanoma.data.fingerprints import MATCH_DISTANCE, distances, match
from melanoma.data.overlap import image_id
from melanoma.models.checkpoint import CheckpointMeta

log = logging.getLogger(__name__)

__all__ = ["EXCLUDED_FILE", "EXCLUDED_COLUMNS", "SeenOverlap", "exclude_seen", "overlap_message", "seen_overlap",
           "write_excluded"]

EXCLUDED_FILE = "excluded.csv"
EXCLUDED_COLUMNS = ["path", "matched_image", "matched_dataset", "matched_split", "matched_model", "match", "distance"]
#: why an image is not external: the split of the record it matched
SEEN_REASON = {"train": "trained on", "val": "calibrated on (val)", "site sample": "calibrated on (site sample)",
               "test": "test split of a training dataset"}


@dataclass
class SeenOverlap:
    """Which rows of a test set the model has seen, and the summary that metrics.json keeps."""

    mask: np.ndarray  # (N,) bool: seen, by id or content
    excluded: pd.DataFrame  # one row per seen image (EXCLUDED_COLUMNS)
    summary: dict  # the "overlap" section of metrics.json


def overlap_message(s: dict) -> str:
    """One console line from an ``overlap`` section: how many seen images, why, what was done."""
    n = s.get("n_checked", 0)
    if not s["checked"]:
        return f"overlap with the training images NOT checked: {s['reason']}"
    if not s["n_seen"]:
        return f"none of the {n} images is one the model has seen (checked by id and by content)"
    parts = ", ".join(f"{v} by {k}" for k, v in s["by_match"].items() if v)
    splits = ", ".join(f"{v} {SEEN_REASON.get(k, k)}" for k, v in s["by_split"].items())
    verb = "KEPT and scored (--keep-overlap): these numbers are not external" if s["kept"] else "excluded"
    return f"{s['n_seen']} of {n} images the model has seen ({parts}; {splits}) were {verb}"


def seen_overlap(meta: CheckpointMeta, paths: list[str], fingerprints: np.ndarray, keep: bool = False) -> SeenOverlap:
    """Match a test set's images (paths, (N, 8, B) fingerprints) against the checkpoint's seen-set."""
    n = len(paths)
    if meta.seen is None:
        reason = ("the checkpoint records no seen-set (written before melanoma recorded one); retrain, or check "
                  "the test set against the training data with `melanoma check-data --duplicates`")
        log.warning("overlap with the training images cannot be checked: %s", reason)
        return SeenOverlap(np.zeros(n, bool), pd.DataFrame(columns=EXCLUDED_COLUMNS),
                           {"checked": False, "reason": reason, "n_checked": n, "n_seen": 0, "kept": bool(keep)})
    records = meta.seen
    rec_of = np.concatenate([np.full(len(r.ids), k) for k, r in enumerate(records)]) if records else np.zeros(0, int)
    ids = [i for r in records for i in r.ids]
    hashes = np.concatenate([r.hashes for r in records]) if records else np.zeros((0, fingerprints.shape[-1]), np.uint8)
    where_id = {}
    for k, i in enumerate(ids):
        if i.startswith("ISIC_"):
            where_id.setdefault(i, k)
    content = match(fingerprints, hashes, MATCH_DISTANCE)
    rows, mask = [], np.zeros(n, bool)
    for q, path in enumerate(paths):
        qid = image_id(path)
        if qid is not None and qid in where_id:
            k, kind = where_id[qid], "id"
        elif content.matched[q]:
            k, kind = int(content.nearest[q]), "content"
        else:
            continue
        mask[q] = True
        r = records[rec_of[k]]
        dist = int(next(distances(fingerprints[q:q + 1], hashes[k:k + 1]))[1][0, 0])
        rows.append({"path": path, "matched_image": ids[k], "matched_dataset": r.dataset, "matched_split": r.split,
                     "matched_model": r.model, "match": kind, "distance": dist})
    excluded = pd.DataFrame(rows, columns=EXCLUDED_COLUMNS)
    summary = {
        "checked": True, "n_checked": n, "n_seen": int(mask.sum()), "kept": bool(keep),
        "by_match": {k: int((excluded["match"] == k).sum()) for k in ("id", "content")},
        "by_split": {k: int(v) for k, v in excluded["matched_split"].value_counts().items()},
        "by_dataset": {k: int(v) for k, v in excluded["matched_dataset"].value_counts().items()},
        "match_distance": MATCH_DISTANCE, "seen_images": len(ids),
    }
    if keep and mask.any():
        summary["warning"] = (f"{int(mask.sum())} images the model has seen were scored (--keep-overlap): the "
                              f"metrics are not those of an external test set")
    return SeenOverlap(mask, excluded, summary)


def write_excluded(out_dir: Path, overlap: SeenOverlap) -> None:
    overlap.excluded.to_csv(Path(out_dir) / EXCLUDED_FILE, index=False)


def unseen_rows(meta: CheckpointMeta, datamodule, keep: bool, out_dir: Path) -> tuple[pd.DataFrame, SeenOverlap]:
    """Every image of a (set-up) dataset the model is tested on as external data, without those
    it has seen (``exclude_seen``; ``keep``: all of them, the overlap reported)."""
    rows = datamodule.table.reset_index(drop=True)
    overlap = exclude_seen(meta, rows, datamodule, keep, out_dir)
    return (rows if keep else rows[~overlap.mask].reset_index(drop=True)), overlap


def exclude_seen(meta: CheckpointMeta, rows: pd.DataFrame, datamodule, keep: bool, out_dir: Path) -> SeenOverlap:
    """The rows of a test set the checkpoint has seen (by id and content), said on the console
    and written to out_dir/excluded.csv, before anything is scored or fitted. The caller drops
    ``mask`` unless ``keep``."""
    paths = rows["path"].tolist()
    fingerprints = datamodule.fingerprints(paths) if meta.seen is not None else None
    overlap = seen_overlap(meta, paths, fingerprints, keep=keep)
    write_excluded(out_dir, overlap)
    (log.warning if overlap.mask.any() or not overlap.summary["checked"] else log.info)(
        "%s: %s", datamodule.name, overlap_message(overlap.summary))
    if keep and overlap.mask.any():
        log.warning("--keep-overlap: %s", overlap.summary["warning"])
    return overlap
