import pandas as pd
import pytest
import torch

from melanoma.data.dermmel import DermMelDataModule


def test_finds_nested_dermmel_and_reads_official_splits(dermmel_root):
    dm = DermMelDataModule(dermmel_root, image_size=32, batch_size=4, num_workers=0)
    assert dm.class_names == ["not_melanoma", "melanoma"] and dm.positive_index == 1 and dm.num_classes == 2
    dm.setup()
    t = dm.table
    counts = t.groupby(["split", "label"]).size().to_dict()
    assert counts == {("train", 0): 10, ("train", 1): 6, ("val", 0): 3, ("val", 1): 3, ("test", 0): 4, ("test", 1): 4}
    assert all("melanoma/dermmel/DermMel" in p for p in t.path)
    # both extensions of the real download are read
    assert {p.rsplit(".", 1)[1] for p in t.path} == {"jpg", "jpeg"}
    assert (t[t.path.str.contains("/Melanoma/")].label == 1).all()
    assert list(t.columns) == ["path", "label", "group", "split"]


def test_loaders_give_normalised_batches_in_table_order(dermmel_root):
    dm = DermMelDataModule(dermmel_root, image_size=32, batch_size=4, num_workers=0)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    labels = torch.cat([b[1] for b in dm.test_dataloader()])
    assert labels.tolist() == dm.split_table("test")["label"].tolist()


def test_save_split_and_class_weights(dermmel_root, tmp_path):
    dm = DermMelDataModule(dermmel_root, image_size=32, num_workers=0)
    dm.setup()
    written = dm.save_split(tmp_path)
    assert written == tmp_path / "splits.csv"
    saved = pd.read_csv(written)
    assert list(saved.columns) == ["path", "label", "group", "split"]
    assert set(saved.label) == {"melanoma", "not_melanoma"} and len(saved) == len(dm.table)
    # train: 10 not_melanoma, 6 melanoma -> N / (C * n_c)
    assert torch.allclose(dm.class_weights(), torch.tensor([16 / 20, 16 / 12]))


def test_missing_root_names_what_and_where(tmp_path):
    dm = DermMelDataModule(tmp_path / "nowhere", num_workers=0)
    with pytest.raises(FileNotFoundError, match="kaggle.com/datasets/drscarlat/melanoma"):
        dm.setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train_sep/, valid/ and test/"):
        DermMelDataModule(tmp_path / "empty").setup()


def test_missing_class_folder_is_named(tmp_path):
    for split in ["train_sep", "valid", "test"]:
        (tmp_path / "DermMel" / split / "Melanoma").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="missing \\['notmelanoma'\\]"):
        DermMelDataModule(tmp_path).setup()


def test_kfold_and_bad_options_are_refused(dermmel_root):
    with pytest.raises(ValueError, match="official"):
        DermMelDataModule(dermmel_root, num_folds=5, fold=0)
    with pytest.raises(ValueError, match="label_set"):
        DermMelDataModule(dermmel_root, label_set="dx")
    with pytest.raises(ValueError, match="sampler"):
        DermMelDataModule(dermmel_root, sampler="weighted")


def test_resume_refuses_a_different_split(dermmel_root, ham_root):
    """The split recorded in a checkpoint is checked when a run resumes from it (the training
    workflow's records, melanoma.workflows.records)."""
    from melanoma.data.ham10000 import HAM10000DataModule
    from melanoma.models.checkpoint import HeadRecord
    from melanoma.workflows.records import check_resumed_split, training_data_records

    def records(dm):
        dm.setup()
        return training_data_records(dm, {}, {})

    dermmel = records(DermMelDataModule(dermmel_root, num_workers=0))
    assert dermmel["dermmel"].counts == {"test": 8, "train": 16, "val": 6}
    same = records(DermMelDataModule(dermmel_root, num_workers=0, seed=7))  # official split: seed irrelevant
    check_resumed_split(same, {"dermmel": HeadRecord(spec={}, data=dermmel["dermmel"])})
    a = records(HAM10000DataModule(ham_root, seed=1, num_workers=0))
    b = records(HAM10000DataModule(ham_root, seed=2, num_workers=0))
    with pytest.raises(RuntimeError, match="differs from the one this checkpoint was trained on"):
        check_resumed_split(b, {"ham10000": HeadRecord(spec={}, data=a["ham10000"])})
    # another dataset's head (fine-tuning from a DermMel run): nothing to compare
    check_resumed_split(b, {"dermmel": HeadRecord(spec={}, data=dermmel["dermmel"])})


def test_impossible_fractions_fail_at_construction(dermmel_root):
    with pytest.raises(ValueError, match="leave something to train on"):
        DermMelDataModule(dermmel_root, val_fraction=0.5, test_fraction=0.5)
