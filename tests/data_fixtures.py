"""Miniature datasets in the real on-disk layouts, for the data tests (import the fixtures)."""

from __future__ import annotations

import pytest

from melanoma.data.synthetic import write_dermmel_layout

# images per class per split: tiny, but every split has both classes
DERMMEL_COUNTS = {"train": {"Melanoma": 6, "NotMelanoma": 10}, "val": 3, "test": 4}


@pytest.fixture(scope="session")
def dermmel_root(tmp_path_factory):
    """A download nested the way Kaggle zips often are: <root>/melanoma/dermmel/DermMel/..."""
    root = tmp_path_factory.mktemp("dermmel_download")
    write_dermmel_layout(root / "melanoma" / "dermmel", DERMMEL_COUNTS, image_size=32, seed=3)
    return root
