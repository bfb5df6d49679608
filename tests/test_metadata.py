"""Patient metadata beside the image (issue 23): fields, encoding, refusals, loaders."""

import numpy as np
import pandas as pd
import pytest
import torch

from isic_layouts import write_isic2019, write_isic2020
from layouts import HAM_LESIONS, write_ham10000_layout
from melanoma.data.ham10000 import HAM10000DataModule
from melanoma.data.isic import ISICDataModule
from melanoma.metadata import AGE_SCALE, MetadataSchema, parse_fields


def test_fields_are_canonical_and_dataset_names_map_to_them():
    assert parse_fields(["age", "sex", "site"]) == ("age", "sex", "site")
    assert parse_fields("[site,age_approx]") == ("age", "site")  # encoding order is fixed
    assert parse_fields(["localization", "anatom_site_general_challenge"][:1]) == ("site",)
    assert parse_fields(None) == () and parse_fields([]) == ()


@pytest.mark.parametrize("column,why", [("dx_type", "histopathology"), ("patient_id", "collected"),
                                        ("diagnosis", "label")])
def test_leaking_columns_are_refused_saying_why(column, why):
    with pytest.raises(ValueError, match=why):
        parse_fields(["age", column])


def test_unknown_field_is_refused_naming_the_fields():
    with pytest.raises(ValueError, match="unknown field 'weight'.*age"):
        parse_fields(["weight"])


def test_encoding_with_explicit_missing_indicators():
    s = MetadataSchema(["age", "sex", "site"])
    assert s.columns()[:5] == ["age", "age_missing", "sex=female", "sex=male", "sex_missing"]
    v, missing = s.encode_row({"age": 45, "sex": "male", "site": "back"})
    assert missing == [] and v[0] == pytest.approx(45 / AGE_SCALE) and v[1] == 0
    assert v[s.columns().index("sex=male")] == 1 and v[s.columns().index("site=torso")] == 1
    assert v.sum() == pytest.approx(0.45 + 2)
    v, missing = s.encode_row({"age": float("nan"), "sex": "unknown"})
    assert missing == ["age", "sex", "site"]
    assert v.tolist() == s.missing_vector().tolist()
    assert [s.columns()[i] for i in np.flatnonzero(v)] == ["age_missing", "sex_missing", "site_missing"]
    with pytest.raises(ValueError, match="not a known value"):
        s.encode_row({"site": "elbowish"})
    with pytest.raises(ValueError, match="not a number"):
        s.encode_row({"age": "old"})
    assert MetadataSchema.from_dict(s.to_dict()) == s


def _ham_with_gaps(tmp_path):
    root = write_ham10000_layout(tmp_path / "HAM10000", HAM_LESIONS, images_per_lesion=(1, 2), seed=4)
    meta = pd.read_csv(root / "HAM10000_metadata.csv")
    meta.loc[::3, "age"] = np.nan
    meta.loc[1::4, "sex"] = "unknown"
    meta.loc[2::5, "localization"] = "unknown"
    meta.to_csv(root / "HAM10000_metadata.csv", index=False)
    return root, meta


def test_ham10000_loaders_yield_metadata_and_keep_every_image(tmp_path):
    root, meta = _ham_with_gaps(tmp_path)
    dm = HAM10000DataModule(root, image_size=32, batch_size=4, num_workers=0, metadata=["age", "sex", "site"])
    dm.setup()
    assert len(dm.table) == len(meta)  # no image dropped for a missing value
    (x, m), y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and m.shape == (4, dm.metadata_schema.size) and m.dtype == torch.float32
    vectors = dm.metadata_vectors(dm.table)
    assert dm.metadata_schema.missing_counts(vectors) == {
        "age": int(meta.age.isna().sum()), "sex": int((meta.sex == "unknown").sum()),
        "site": int((meta.localization == "unknown").sum())}
    # without metadata, batches are exactly as before
    plain = HAM10000DataModule(root, image_size=32, batch_size=4, num_workers=0)
    x2, y2 = next(iter(plain.val_dataloader()))
    assert isinstance(x2, torch.Tensor) and x2.shape == (4, 3, 32, 32)


def test_dx_type_through_the_datamodule_is_refused(tmp_path):
    with pytest.raises(ValueError, match="dx_type.*gives the label away"):
        HAM10000DataModule(tmp_path, metadata=["age", "dx_type"])


@pytest.mark.parametrize("write", [write_isic2019, write_isic2020])
def test_isic_years_yield_metadata(tmp_path, write):
    root = write(tmp_path / "isic")
    dm = ISICDataModule(root, image_size=32, batch_size=4, num_workers=0, metadata=["age", "sex", "site"])
    dm.setup()
    vectors = dm.metadata_vectors(dm.table)
    assert vectors.shape == (len(dm.table), 12)
    counts = dm.metadata_schema.missing_counts(vectors)
    assert counts["age"] == int(dm.table["age"].isna().sum())
    assert counts["age"] < len(dm.table)  # real values were read
    (x, m), y = next(iter(dm.test_dataloader()))
    assert m.shape[1] == 12


def test_a_dataset_without_metadata_columns_says_so(tmp_path):
    from layouts import write_ph2_layout  # noqa: F401  (PH2 has no metadata columns)
    from melanoma.data.dermmel import DermMelDataModule
    from melanoma.data.synthetic import write_dermmel_layout

    write_dermmel_layout(tmp_path / "d", {"train": {"Melanoma": 3, "NotMelanoma": 3}, "val": 2, "test": 2}, image_size=16)
    dm = DermMelDataModule(tmp_path / "d", image_size=16, num_workers=0, metadata=["age"])
    with pytest.raises(ValueError, match="no \\['age'\\] column"):
        dm.setup()


def test_a_last_training_batch_of_one_is_left_out_with_metadata(tmp_path):
    """BatchNorm in the metadata branch cannot train on one image."""
    root, meta = _ham_with_gaps(tmp_path)
    dm = HAM10000DataModule(root, image_size=32, num_workers=0, metadata=["age", "sex", "site"])
    dm.setup()
    n = len(dm.split_table("train"))
    dm.batch_size = n - 1
    assert [len(y) for _, y in dm.train_dataloader()] == [n - 1]
    dm.metadata_schema = None
    assert [len(y) for _, y in dm.train_dataloader()] == [n - 1, 1]
