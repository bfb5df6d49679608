"""Leak-free splits: whole groups (lesions, patients) go to one split, label shares are kept.

sklearn's StratifiedGroupKFold only produces equal folds (1/k each); a train/val/test split with
arbitrary fractions needs unequal bins, so groups are assigned greedily: largest groups first
(they are the hard ones to place), each to the bin that is furthest below its target count for
that group's labels. Ties are broken by a seeded shuffle, so a split is a function of the seed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence

import numpy as np


def assign_groups(
    labels: Sequence[int], groups: Sequence, fractions: Mapping[str, float], seed: int
) -> np.ndarray:
    """Return one bin name per row. Rows of a group share a bin; each bin holds about its
    fraction of every label. ``fractions`` must sum to 1."""
    labels = np.asarray(labels)
    groups = np.asarray(groups).astype(str)
    names = [k for k, v in fractions.items() if v > 0]
    frac = np.array([fractions[k] for k in names], dtype=np.float64)
    if np.any(frac < 0) or not np.isclose(sum(fractions.values()), 1.0):
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {dict(fractions)}")
    if len(labels) == 0:
        return np.array([], dtype=object)

    classes, label_idx = np.unique(labels, return_inverse=True)
    group_names, group_idx = np.unique(groups, return_inverse=True)
    n_groups, n_classes = len(group_names), len(classes)
    counts = np.zeros((n_groups, n_classes), dtype=np.int64)
    np.add.at(counts, (group_idx, label_idx), 1)

    target = frac[:, None] * counts.sum(0)[None, :]  # (bins, classes)
    filled = np.zeros_like(target)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_groups)
    order = order[np.argsort(-counts[order].sum(1), kind="stable")]  # big groups first
    tiebreak = rng.random(len(names)) * 1e-9
    group_bin = np.empty(n_groups, dtype=np.int64)
    for g in order:
        c = counts[g]
        # Relative shortfall of each bin for this group's labels, weighted by how many rows of
        # each label the group brings; the bin that needs these rows most takes the group.
        need = ((target - filled) / np.maximum(target, 1e-12)) @ c
        b = int(np.argmax(need + tiebreak))
        group_bin[g] = b
        filled[b] += c
    return np.array(names, dtype=object)[group_bin[group_idx]]


def _check_fold(num_folds: int, fold: int | None) -> None:
    if num_folds < 2:
        raise ValueError(f"num_folds must be >= 2 (or null for no k-fold), got {num_folds}")
    if fold is None or not 0 <= fold < num_folds:
        raise ValueError(f"fold must be in 0..{num_folds - 1} when num_folds={num_folds}, got {fold}")


def train_val_test_split(
    labels,
    groups,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    num_folds: int | None = None,
    fold: int | None = None,
) -> np.ndarray:
    """Split names ("train"/"val"/"test") per row.

    Without folds: fractions as given. With ``num_folds`` = k: the test split (test_fraction)
    is held out once for the seed, the rest is cut into k group-stratified folds, fold ``fold``
    is "val" and the others "train" (so every fold shares the same test split).
    """
    labels = np.asarray(labels)
    if num_folds is None:
        train_fraction = 1.0 - val_fraction - test_fraction
        if train_fraction <= 0:
            raise ValueError(
                f"val_fraction ({val_fraction}) + test_fraction ({test_fraction}) must be < 1"
            )
        return assign_groups(
            labels,
            groups,
            {"train": train_fraction, "val": val_fraction, "test": test_fraction},
            seed,
        )
    _check_fold(num_folds, fold)
    groups = np.asarray(groups).astype(str)
    split = assign_groups(labels, groups, {"rest": 1.0 - test_fraction, "test": test_fraction}, seed)
    rest = split == "rest"
    split = split.astype(object)
    split[rest] = _fold_split(labels[rest], groups[rest], num_folds, fold, seed)
    return split


def _fold_split(labels, groups, num_folds: int, fold: int, seed: int) -> np.ndarray:
    """k group-stratified folds of these rows: fold ``fold`` is "val", the others "train"."""
    _check_fold(num_folds, fold)
    folds = assign_groups(labels, groups, {str(i): 1.0 / num_folds for i in range(num_folds)}, seed + 1)
    return np.where(folds == str(fold), "val", "train").astype(object)


def carve_missing_splits(
    labels,
    groups,
    official: set[str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    num_folds: int | None = None,
    fold: int | None = None,
) -> np.ndarray:
    """Split names for the rows a download leaves unsplit (its training part), when the
    download already has the ``official`` splits (a subset of {"val", "test"}).

    The splits the download lacks are carved from these rows, grouped and stratified; the
    fractions are shares of these rows. With nothing official this is ``train_val_test_split``.
    k-fold cuts the val folds from these rows, so it needs a download without an official val.
    """
    official = set(official) & {"val", "test"}
    if "test" not in official:
        if "val" in official:
            if num_folds is not None:
                raise ValueError(_KFOLD_WITH_OFFICIAL_VAL)
            return assign_groups(labels, groups, {"train": 1.0 - test_fraction, "test": test_fraction}, seed)
        return train_val_test_split(labels, groups, val_fraction, test_fraction, seed, num_folds, fold)
    if "val" in official:
        if num_folds is not None:
            raise ValueError(_KFOLD_WITH_OFFICIAL_VAL)
        return np.full(len(np.asarray(labels)), "train", dtype=object)
    if num_folds is None:
        return assign_groups(labels, groups, {"train": 1.0 - val_fraction, "val": val_fraction}, seed)
    return _fold_split(labels, groups, num_folds, fold, seed)


_KFOLD_WITH_OFFICIAL_VAL = (
    "k-fold (num_folds) replaces the val split, but this download has an official val split; "
    "set num_folds=null to use it"
)


def rows_fingerprint(paths: Sequence[str], labels: Sequence[int], splits: Sequence[str] | None = None) -> str:
    """Hash of (file name, label[, split]) over the rows, in any order: the same images with the
    same labels (split the same way) give the same fingerprint wherever their folder lives."""
    columns = [[os.path.basename(p) for p in paths], [int(v) for v in labels]]
    if splits is not None:
        columns.append([str(v) for v in splits])
    return hashlib.sha1(repr(sorted(zip(*columns))).encode()).hexdigest()
