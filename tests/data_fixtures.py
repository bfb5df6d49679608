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


# lesions per dx: every class present, melanoma and nevus the largest as in the real data
HAM_LESIONS = {"akiec": 3, "bcc": 3, "bkl": 4, "df": 3, "mel": 10, "nv": 24, "vasc": 3}


@pytest.fixture(scope="session")
def ham_root(tmp_path_factory):
    from melanoma.data.synthetic import write_ham10000_layout

    root = tmp_path_factory.mktemp("ham") / "HAM10000"
    return write_ham10000_layout(root, HAM_LESIONS, images_per_lesion=(1, 3), seed=1)


@pytest.fixture(scope="session")
def ph2_official_root(tmp_path_factory, ph2_table):
    from melanoma.data.synthetic import write_ph2_layout

    root = tmp_path_factory.mktemp("ph2_official") / "PH2Dataset"
    return write_ph2_layout(root, ph2_table, per_class=10, layout="official", seed=2)


@pytest.fixture(scope="session")
def ph2_flat_root(tmp_path_factory, ph2_table):
    from melanoma.data.synthetic import write_ph2_layout

    root = tmp_path_factory.mktemp("ph2_flat") / "PH2"
    return write_ph2_layout(root, ph2_table, per_class=5, layout="flat", seed=2)
