"""dataset=isic: the ISIC challenge downloads 2016-2020, read as they are."""

import logging
import shutil

import pandas as pd
import pytest

from isic_layouts import (ISIC2016, ISIC2017_EXTRA, ISIC2018_COLUMNS, ISIC2019_EXTRA, ISIC2020_DUPLICATES,
                          isic2018_training, isic2019_training, isic2020_training, write_isic2016, write_isic2019,
                          write_isic2020)
from melanoma.conventions import BINARY_CLASSES
from melanoma.data.ham10000 import DX, HAM10000DataModule
from melanoma.data.isic import CLASSES_2017, CLASSES_2019, ISICDataModule
from melanoma.data.overlap import cross_dataset_overlap, drop_overlap_from_train, image_id


def load(root, **kw):
    dm = ISICDataModule(root, image_size=32, batch_size=4, num_workers=0, **kw)
    dm.setup()
    return dm


def stems(paths):
    return {p.rsplit("/", 1)[1].rsplit(".", 1)[0] for p in paths}


def disjoint(table):
    return (table.groupby("group")["split"].nunique() == 1).all()


def test_2016_nested_download_keeps_its_test_and_carves_val(isic2016_root):
    dm = load(isic2016_root)
    assert dm.year == 2016 and dm.class_names == BINARY_CLASSES and dm.positive_index == 1
    t = dm.table
    assert len(t) == ISIC2016["train"] + ISIC2016["test"]
    assert stems(t.path[t.split == "test"]) == {f"ISIC_{100 + i:07d}" for i in range(ISIC2016["test"])}
    n_val = (t.split == "val").sum()  # about 15% of the 20 training images, both labels in it
    assert 2 <= n_val <= 4 and (t.split == "train").sum() == 20 - n_val
    assert set(t.label[t.split == "val"]) == {0, 1}
    # malignant/benign (training) and 1.0/0.0 (test) both read
    assert stems(t.path[t.label == 1]) == {f"ISIC_{i:07d}" for i in range(0, 20, 4)} | {
        f"ISIC_{100 + i:07d}" for i in range(0, 10, 3)}
    assert (t.group == t.path.map(lambda p: p.rsplit("/", 1)[1][:-4])).all()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32)


def test_2016_has_no_native_classes(isic2016_root):
    with pytest.raises(ValueError, match="label_set 'dx8' .* ISIC 2019 .* found ISIC 2016"):
        load(isic2016_root, label_set="dx8")


def test_2017_official_splits_three_classes_superpixels_and_extras_ignored(isic2017_root, caplog):
    with caplog.at_level(logging.INFO, logger="melanoma.data.isic"):
        dm = load(isic2017_root, label_set="3class")
    assert dm.class_names == CLASSES_2017 == ["melanoma", "seborrheic_keratosis", "nevus"]
    assert dm.positive_index == 0
    t = dm.table
    counts = t.groupby(["split", "label"]).size().to_dict()
    assert counts == {**{("train", c): 6 for c in range(3)}, **{("val", c): 2 for c in range(3)},
                      **{("test", c): 3 for c in range(3)}}
    assert not t.path.str.contains("superpixels").any() and ISIC2017_EXTRA not in stems(t.path)
    assert "1 image(s) in" in caplog.text and "ISIC-2017_Training_Data" in caplog.text
    assert (t.age == 50).all() and (t.sex == "female").all()  # from each Data folder's metadata CSV
    binary = load(isic2017_root)
    assert binary.table.label.sum() == 6 + 2 + 3


def test_2017_kfold_is_refused_because_of_its_official_val(isic2017_root):
    with pytest.raises(ValueError, match="official val split"):
        load(isic2017_root, num_folds=3, fold=0)


def test_2018_dx_lesion_groups_official_val_and_carved_test(isic2018_root):
    dm = load(isic2018_root, label_set="dx", test_fraction=0.2)
    assert dm.year == 2018 and dm.class_names == list(DX) and dm.positive_index == DX.index("mel")
    t = dm.table
    truth = isic2018_training()
    assert len(t) == len(truth) + len(ISIC2018_COLUMNS)
    val = t[t.split == "val"]
    assert stems(val.path) == {f"ISIC_{34321 + k:07d}" for k in range(7)}
    assert sorted(val.label) == list(range(7))
    train_test = t[t.split != "val"].assign(image=lambda d: d.path.map(lambda p: p.rsplit("/", 1)[1][:-4]))
    merged = train_test.merge(truth, on="image")
    assert len(merged) == len(truth)
    assert (merged.group == merged.lesion_id).all()
    assert (merged.label == merged.dx.str.lower().map(DX.index)).all()
    assert set(t.split) == {"train", "val", "test"} and disjoint(t)
    assert (t.label[t.split == "test"] == DX.index("mel")).any()


def test_2019_groups_metadata_downsampled_and_save_split(isic2019_root, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="melanoma.data.isic"):
        dm = load(isic2019_root, label_set="dx8")
    assert dm.class_names == CLASSES_2019 == ["ak", "bcc", "bkl", "df", "mel", "nv", "scc", "vasc"]
    assert dm.positive_index == 4
    truth = isic2019_training()
    t = dm.table.assign(image=lambda d: d.path.map(lambda p: p.rsplit("/", 1)[1][:-4]))
    assert len(t) == len(truth) and ISIC2019_EXTRA not in set(t.image)
    assert "1 image(s) in" in caplog.text
    assert t.image.str.endswith("_downsampled").sum() == 5
    m = t.merge(truth.rename(columns={"sex": "sex_truth"}), on="image")
    assert (m.group == m.lesion_id.fillna(m.image)).all()
    assert t.group.nunique() == truth.lesion_id.nunique() + truth.lesion_id.isna().sum()
    assert (m.label == m.dx.str.lower().map(CLASSES_2019.index)).all()
    assert disjoint(t) and set(t.split) == {"train", "val", "test"}
    # metadata under one name for every year
    assert m.age.equals(m.age_approx) and m.age.notna().any()
    assert (m.sex.fillna("") == m.sex_truth.fillna("")).all()
    assert (m.site.fillna("") == m.anatom_site_general.fillna("")).all()
    saved = pd.read_csv(dm.save_split(tmp_path))
    assert list(saved.columns) == ["path", "label", "group", "split", "age", "sex", "site"]
    assert set(saved.label) == set(CLASSES_2019)


def test_2019_kfold_partitions_training_lesions(isic2019_root):
    tables = [load(isic2019_root, num_folds=3, fold=f).table.set_index("path") for f in range(3)]
    test = set(tables[0].index[tables[0].split == "test"])
    vals = [set(t.index[t.split == "val"]) for t in tables]
    assert all(set(t.index[t.split == "test"]) == test for t in tables)
    assert vals[0] | vals[1] | vals[2] == set(tables[0].index) - test
    assert not (vals[0] & vals[1] or vals[1] & vals[2] or vals[0] & vals[2])
    assert all(disjoint(t.reset_index()) for t in tables)


def test_2020_drops_duplicates_and_splits_by_patient(isic2020_root):
    dm = load(isic2020_root)
    t = dm.table
    truth = isic2020_training()
    assert dm.year == 2020 and len(t) == len(truth) - len(ISIC2020_DUPLICATES)
    ids = stems(t.path)
    assert all(a in ids and b not in ids for a, b in ISIC2020_DUPLICATES)
    assert t.group.nunique() == truth.patient_id.nunique() and t.group.str.startswith("IP_").all()
    assert disjoint(t) and set(t.split) == {"train", "val", "test"}
    assert t.label.sum() == truth.target.sum()
    assert {"age", "sex", "site"} <= set(t.columns)


def test_2020_kaggle_layout(tmp_path):
    dm = load(write_isic2020(tmp_path / "siim", layout="kaggle"))
    assert dm.year == 2020 and len(dm.table) == len(isic2020_training())  # no duplicates list: nothing dropped


def test_missing_images_are_counted_and_named(tmp_path):
    root = write_isic2019(tmp_path / "isic2019")
    for name in ("ISIC_0000007.jpg", "ISIC_0000001_downsampled.jpg"):
        (root / "ISIC_2019_Training_Input" / name).unlink()
    with pytest.raises(FileNotFoundError,
                       match=r"2 of 45 images listed in .*ISIC_2019_Training_GroundTruth.csv are missing from "
                             r".*ISIC_2019_Training_Input.*ISIC_0000001_downsampled, ISIC_0000007"):
        load(root)


def test_year_detection_errors_and_choice(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="ISBI2016_ISIC_Part3_Training_GroundTruth.csv.*"
                                                "ISIC_2019_Training_GroundTruth.csv"):
        load(tmp_path / "empty")
    both = tmp_path / "both"
    write_isic2016(both / "2016")
    write_isic2019(both / "2019")
    with pytest.raises(FileNotFoundError, match=r"several ISIC years .*2016.*2019.*dataset.year"):
        load(both)
    assert load(both, year=2019).table.shape[0] == len(isic2019_training())
    assert load(both, label_set="dx8").year == 2019  # the label set names its year
    with pytest.raises(ValueError, match="year must be one of"):
        ISICDataModule(both, year=2021)
    with pytest.raises(ValueError, match="label_set '3class' .* ISIC 2017"):
        ISICDataModule(both, year=2019, label_set="3class")


def test_year_is_a_split_setting(isic2019_root):
    dm = load(isic2019_root)
    assert "year" in dm.split_setting_keys and dm.year == 2019


def test_cache_serves_resized_copies(isic2018_root, tmp_path):
    dm = ISICDataModule(isic2018_root, image_size=16, batch_size=4, num_workers=0, cache_dir=tmp_path / "cache")
    dm.prepare_data()
    dm.setup()
    assert all(str(p).startswith(str(tmp_path / "cache")) for p in dm.dataset("val").paths)


def test_bad_ground_truth_rows_are_named(tmp_path):
    root = write_isic2016(tmp_path / "isic2016")
    gt = root / "ISBI2016_ISIC_Part3_Training_GroundTruth.csv"
    gt.write_text(gt.read_text().replace("ISIC_0000002,benign", "ISIC_0000002,maybe"))
    with pytest.raises(ValueError, match=r"line 3 \(ISIC_0000002: 'maybe'\).*benign/malignant or 0/1"):
        load(root)
    shutil.rmtree(root)
    root = write_isic2019(tmp_path / "isic2019")
    gt = root / "ISIC_2019_Training_GroundTruth.csv"
    lines = gt.read_text().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0] + ",1.0"  # MEL and UNK both set
    gt.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"exactly one of MEL.*line 3 \(ISIC_0000001_downsampled\)"):
        load(root)


# --- the same image in two datasets ---------------------------------------------------------


def test_image_id_is_the_isic_stem_without_downsampled():
    assert image_id("/d/ISIC_2019_Training_Input/ISIC_0000001_downsampled.jpg") == "ISIC_0000001"
    assert image_id("HAM10000_images_part_1/ISIC_0024306.jpg") == "ISIC_0024306"
    assert image_id("x/isic_0024306.JPEG") == "ISIC_0024306"
    assert image_id("DermMel/train_sep/Melanoma/AUG_0_12.jpeg") is None
    assert image_id("PH2/images/IMD002.jpg") is None
    assert image_id("ISIC-2017_Training_Data/ISIC_0000001_superpixels.png") is None


def _table(rows):
    return pd.DataFrame(rows, columns=["path", "split"]).assign(label=0, group="g")


def planted():
    return {
        "ham10000": _table([("h/ISIC_0000001.jpg", "train"), ("h/ISIC_0000002.jpg", "test"),
                            ("h/ISIC_0000003.jpg", "val"), ("h/ISIC_0000009.jpg", "train")]),
        "isic": _table([("i/ISIC_0000001_downsampled.jpg", "val"), ("i/ISIC_0000002_downsampled.jpg", "train"),
                        ("i/ISIC_0000003.jpg", "test"), ("i/ISIC_0000004.jpg", "train")]),
        "dermmel": _table([("d/AUG_0_1.jpeg", "train"), ("d/ISIC_0000003.jpg", "train"),
                           ("d/ISIC_0000009.jpg", "test")]),
    }


def test_cross_dataset_overlap_finds_planted_shared_ids():
    found = cross_dataset_overlap(planted())
    assert list(found.columns) == ["image_id", "held_out_dataset", "held_out_split", "train_dataset", "train_path",
                                   "match"]
    assert (found["match"] == "id").all()  # no fingerprints given: ids only
    assert set(map(tuple, found.iloc[:, :4].to_numpy())) == {
        ("ISIC_0000001", "isic", "val", "ham10000"),
        ("ISIC_0000002", "ham10000", "test", "isic"),
        ("ISIC_0000003", "ham10000", "val", "dermmel"),
        ("ISIC_0000003", "isic", "test", "dermmel"),
        ("ISIC_0000009", "dermmel", "test", "ham10000"),
    }
    assert cross_dataset_overlap({"only": planted()["isic"]}).empty


def test_drop_overlap_from_train_removes_only_leaking_train_rows():
    tables = planted()
    cleaned = drop_overlap_from_train(tables)
    assert list(cleaned["ham10000"].path) == ["h/ISIC_0000002.jpg", "h/ISIC_0000003.jpg"]
    assert list(cleaned["isic"].path) == ["i/ISIC_0000001_downsampled.jpg", "i/ISIC_0000003.jpg",
                                          "i/ISIC_0000004.jpg"]
    assert list(cleaned["dermmel"].path) == ["d/AUG_0_1.jpeg", "d/ISIC_0000009.jpg"]
    assert cross_dataset_overlap(cleaned).empty
    assert len(tables["ham10000"]) == 4  # the inputs are not modified


def test_ham10000_and_isic2018_miniatures_overlap_as_the_real_ones_do(ham_root, isic2018_root):
    ham = HAM10000DataModule(ham_root, num_workers=0)
    isic = ISICDataModule(isic2018_root, num_workers=0)
    tables = {"ham10000": ham.split_table("train").pipe(lambda t: pd.concat([t, ham.split_table("test")])),
              "isic": pd.concat([isic.split_table(s) for s in ("train", "val", "test")])}
    found = cross_dataset_overlap(tables)
    assert not found.empty
    ham_test = {image_id(p) for p in tables["ham10000"].path[tables["ham10000"].split == "test"]}
    isic_train = {image_id(p) for p in tables["isic"].path[tables["isic"].split == "train"]}
    leaked = found[found.held_out_dataset == "ham10000"]
    assert set(leaked.image_id) == ham_test & isic_train != set()
