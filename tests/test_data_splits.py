"""Carving the splits a download lacks from the rows it leaves unsplit."""

import numpy as np
import pytest

from melanoma.data.splits import carve_missing_splits, train_val_test_split


def _data(n_groups=40, seed=0):
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"g{i}" for i in range(n_groups)], rng.integers(1, 4, n_groups))
    labels = np.array([int(g[1:]) % 4 == 0 for g in groups], dtype=int)
    return labels, groups


def test_nothing_official_is_the_plain_grouped_split():
    labels, groups = _data()
    carved = carve_missing_splits(labels, groups, set(), 0.2, 0.2, seed=3)
    assert (carved == train_val_test_split(labels, groups, 0.2, 0.2, 3)).all()


def test_official_test_only_carves_val_from_training_rows():
    labels, groups = _data()
    carved = carve_missing_splits(labels, groups, {"test"}, 0.25, 0.15, seed=1)
    assert set(carved) == {"train", "val"}
    share = (carved == "val").mean()
    assert 0.15 < share < 0.35
    # whole groups, and both labels in val
    assert all(len(set(carved[groups == g])) == 1 for g in set(groups))
    assert set(labels[carved == "val"]) == {0, 1}


def test_official_val_and_test_leave_everything_in_train():
    labels, groups = _data()
    assert (carve_missing_splits(labels, groups, {"val", "test"}, 0.2, 0.2, seed=1) == "train").all()


def test_kfold_with_an_official_test_cuts_folds_from_all_training_rows():
    labels, groups = _data()
    vals = [carve_missing_splits(labels, groups, {"test"}, 0.2, 0.2, seed=1, num_folds=3, fold=f) == "val"
            for f in range(3)]
    assert (np.sum(vals, axis=0) == 1).all()  # each training row is val in exactly one fold


def test_kfold_with_an_official_val_is_refused():
    labels, groups = _data()
    with pytest.raises(ValueError, match="official val split"):
        carve_missing_splits(labels, groups, {"val"}, 0.2, 0.2, seed=1, num_folds=3, fold=0)
