"""What the base DataModule does with a subclass's table: extra columns, partial official splits."""

import pandas as pd
import pytest

from melanoma.data.base import LesionDataModule


class TableModule(LesionDataModule):
    name = "table"

    def __init__(self, table, **kw):
        super().__init__("unused", num_workers=0, **kw)
        self._rows = table

    def build_table(self):
        return self._rows


def _rows(n=30, split=None):
    return pd.DataFrame({"path": [f"/x/img{i:02d}.jpg" for i in range(n)], "label": [i % 3 == 0 for i in range(n)],
                         "group": [f"g{i // 2}" for i in range(n)], "age": [40 + i for i in range(n)],
                         "sex": ["male", "female"] * (n // 2), "split": split})


def test_extra_columns_survive_the_table_and_save_split(tmp_path):
    dm = TableModule(_rows())
    dm.setup()
    assert list(dm.table.columns) == ["path", "label", "group", "split", "age", "sex"]
    saved = pd.read_csv(dm.save_split(tmp_path))
    assert list(saved.columns) == ["path", "label", "group", "split", "age", "sex"]
    assert dict(zip(saved.path, saved.age)) == {f"/x/img{i:02d}.jpg": 40 + i for i in range(30)}


def test_rows_without_a_split_are_carved_around_the_official_ones():
    rows = _rows(40)
    rows.loc[30:, "split"] = "test"  # an official test part; the rest is training
    dm = TableModule(rows, val_fraction=0.25)
    dm.setup()
    t = dm.table.set_index("path")
    assert (t.loc[[f"/x/img{i:02d}.jpg" for i in range(30, 40)], "split"] == "test").all()
    carved = t.loc[[f"/x/img{i:02d}.jpg" for i in range(30)], "split"]
    assert set(carved) == {"train", "val"} and 4 <= (carved == "val").sum() <= 11
    assert (dm.table.groupby("group").split.nunique() == 1).all()


def test_split_setting_keys_name_real_settings():
    dm = TableModule(_rows())
    assert {"seed", "val_fraction", "test_fraction", "num_folds", "fold"} <= set(dm.split_setting_keys)
    for key in dm.split_setting_keys:
        getattr(dm, key)


def test_unknown_split_names_are_still_refused():
    with pytest.raises(RuntimeError, match="unexpected split names"):
        TableModule(_rows(split="holdout")).setup()
