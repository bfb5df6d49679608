import pytest

from melanoma.data.ph2 import PH2DataModule, parse_ph2_table


def test_real_table_parses_to_80_80_40(ph2_table):
    t = parse_ph2_table(ph2_table)
    assert len(t) == 200
    assert t.clinical_diagnosis.value_counts().to_dict() == {0: 80, 1: 80, 2: 40}
    assert t.name.iloc[0] == "IMD003" and t.name.is_unique


def test_official_layout_three_classes(ph2_official_root):
    assert (ph2_official_root / "PH2 Dataset images" / "IMD003" / "IMD003_Dermoscopic_Image" / "IMD003.bmp").exists()
    dm = PH2DataModule(ph2_official_root.parent, image_size=32, batch_size=4, num_workers=0)
    assert dm.class_names == ["common_nevus", "atypical_nevus", "melanoma"] and dm.positive_index == 2
    dm.setup()
    t = dm.table
    assert len(t) == 30 and t.label.value_counts().to_dict() == {0: 10, 1: 10, 2: 10}
    assert all(p.endswith(".bmp") for p in t.path)
    # stratified 60/20/20 split: every class in every split
    assert t.groupby("split").label.nunique().to_dict() == {"test": 3, "train": 3, "val": 3}
    assert t.split.value_counts().to_dict() == {"train": 18, "val": 6, "test": 6}
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32)


def test_flat_layout_binary(ph2_flat_root):
    dm = PH2DataModule(ph2_flat_root, label_set="binary", num_workers=0)
    assert dm.class_names == ["not_melanoma", "melanoma"]
    dm.setup()
    assert len(dm.table) == 15 and dm.table.label.sum() == 5
    assert all("/images/IMD" in p and p.endswith(".jpg") for p in dm.table.path)


def test_kfold_on_ph2(ph2_official_root):
    vals = []
    for fold in range(5):
        dm = PH2DataModule(ph2_official_root, num_folds=5, fold=fold, test_fraction=0.0, num_workers=0)
        dm.setup()
        assert "test" not in set(dm.table.split)
        vals.append(set(dm.split_table("val").path))
        assert dm.split_table("val").label.nunique() == 3  # 2 of each class per fold
    assert sum(map(len, vals)) == 30 and len(set().union(*vals)) == 30


def test_bad_tables_and_missing_images(tmp_path, ph2_table):
    bad = tmp_path / "bad" / "PH2_dataset.txt"
    bad.parent.mkdir()
    bad.write_text("|| Name || Histological Diagnosis || Clinical Diagnosis ||\n|| IMD001 ||  || 7 ||\n")
    with pytest.raises(ValueError, match=r"line 2: Clinical Diagnosis of 'IMD001' is '7'"):
        parse_ph2_table(bad)
    with pytest.raises(FileNotFoundError, match="fc.up.pt"):
        PH2DataModule(tmp_path / "absent").setup()
    good = tmp_path / "good" / "PH2_dataset.txt"
    good.parent.mkdir()
    good.write_text("|| Name || Histological Diagnosis || Clinical Diagnosis ||\n|| IMD001 ||  || 2 ||\n\nLegend\n")
    with pytest.raises(FileNotFoundError, match="no image folder"):
        PH2DataModule(tmp_path / "good").setup()
    (tmp_path / "good" / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="1 of 1 images .* IMD001"):
        PH2DataModule(tmp_path / "good").setup()
    with pytest.raises(ValueError, match="label_set"):
        PH2DataModule(tmp_path, label_set="dx")


def test_mask_path_finds_the_official_lesion_masks(ph2_official_root):
    from PIL import Image

    from melanoma.data.synthetic import mask_path

    dm = PH2DataModule(ph2_official_root, num_workers=0)
    dm.setup()
    image = dm.table.path[0]
    mask = mask_path(image)
    assert mask.name == f"{mask.parent.name}.bmp" and mask.parent.name.endswith("_lesion") and mask.exists()
    assert Image.open(mask).size == Image.open(image).size
