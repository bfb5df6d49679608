import pandas as pd
import pytest

from layouts import HAM_LESIONS, write_ham10000_layout
from melanoma.data.ham10000 import DX, HAM10000DataModule


def _splits_are_lesion_disjoint(table):
    return (table.groupby("group")["split"].nunique() == 1).all()


def test_miniature_layout_loads_with_lesion_disjoint_splits(ham_root):
    meta = pd.read_csv(ham_root / "HAM10000_metadata.csv")
    dm = HAM10000DataModule(ham_root.parent, image_size=32, batch_size=4, num_workers=0)  # searched below root
    assert dm.class_names == ["not_melanoma", "melanoma"] and dm.positive_index == 1
    dm.setup()
    t = dm.table
    assert len(t) == len(meta) and t.group.nunique() == sum(HAM_LESIONS.values())
    assert set(t.split) == {"train", "val", "test"}
    assert _splits_are_lesion_disjoint(t)
    mel_images = set(meta.image_id[meta.dx == "mel"])
    assert {p.rsplit("/", 1)[1][:-4] for p in t.path[t.label == 1]} == mel_images
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32)


def test_dx_label_set_has_seven_classes(ham_root):
    dm = HAM10000DataModule(ham_root, label_set="dx", num_workers=0)
    assert dm.class_names == list(DX) == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert dm.positive_index == 4
    dm.setup()
    meta = pd.read_csv(ham_root / "HAM10000_metadata.csv")
    assert dm.table.label.value_counts().sort_index().tolist() == [
        (meta.dx == d).sum() for d in DX]


def test_split_is_deterministic_per_seed_and_fractions_apply(ham_root):
    def split(seed, **kw):
        dm = HAM10000DataModule(ham_root, seed=seed, num_workers=0, **kw)
        dm.setup()
        return dm.table

    a, b, c = split(1), split(1), split(2)
    assert a.equals(b)
    assert not a.split.equals(c.split)
    big_val = split(1, val_fraction=0.3, test_fraction=0.1)
    n = len(big_val)
    assert abs((big_val.split == "val").sum() / n - 0.3) < 0.06
    assert abs((big_val.split == "test").sum() / n - 0.1) < 0.06


def test_kfold_partitions_the_non_test_images(ham_root):
    tables = []
    for fold in range(3):
        dm = HAM10000DataModule(ham_root, num_folds=3, fold=fold, num_workers=0)
        dm.setup()
        tables.append(dm.table.set_index("path"))
        assert _splits_are_lesion_disjoint(dm.table)
    tests = [set(t.index[t.split == "test"]) for t in tables]
    assert tests[0] == tests[1] == tests[2]  # the test split does not move between folds
    vals = [set(t.index[t.split == "val"]) for t in tables]
    assert not (vals[0] & vals[1]) and not (vals[1] & vals[2]) and not (vals[0] & vals[2])
    assert vals[0] | vals[1] | vals[2] == set(tables[0].index) - tests[0]
    with pytest.raises(ValueError, match="fold must be in 0..2"):
        HAM10000DataModule(ham_root, num_folds=3, fold=3).setup()


def test_lowercase_folder_names_are_accepted(tmp_path):
    root = write_ham10000_layout(tmp_path, {"mel": 3, "nv": 5}, lowercase=True, seed=5)
    assert (root / "ham10000_images_part_1").is_dir()
    dm = HAM10000DataModule(root, num_workers=0)
    dm.setup()
    assert len(dm.table) == len(pd.read_csv(root / "HAM10000_metadata.csv"))


def test_unknown_dx_names_the_rows(tmp_path):
    bad = [{"lesion_id": "HAM_9", "image_id": "ISIC_9999999", "dx": "scc"}]
    root = write_ham10000_layout(tmp_path, {"mel": 2, "nv": 2}, images_per_lesion=(1, 1), extra_rows=bad)
    with pytest.raises(ValueError, match=r"line 6 \(ISIC_9999999: dx='scc'\)") as err:
        HAM10000DataModule(root).setup()
    assert "akiec, bcc, bkl, df, mel, nv, vasc" in str(err.value)


def test_missing_metadata_folders_and_images_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="skin-cancer-mnist-ham10000"):
        HAM10000DataModule(tmp_path / "absent").setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="HAM10000_metadata.csv not found"):
        HAM10000DataModule(tmp_path / "empty").setup()
    root = write_ham10000_layout(tmp_path / "partial", {"mel": 2, "nv": 2}, images_per_lesion=(1, 1))
    victim = sorted((root / "HAM10000_images_part_1").iterdir())[0]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=f"1 of 4 images .* missing .*{victim.stem}"):
        HAM10000DataModule(root).setup()
    for part in root.glob("HAM10000_images_part_*"):
        for f in part.iterdir():
            f.unlink()
        part.rmdir()
    with pytest.raises(FileNotFoundError, match="HAM10000_images_part_1/ and HAM10000_images_part_2/"):
        HAM10000DataModule(root).setup()


def test_real_ham10000_splits_are_lesion_disjoint_and_stratified(ham10000_root):
    dm = HAM10000DataModule(ham10000_root, num_workers=0)
    dm.setup()
    t = dm.table
    assert len(t) == 10015
    # 7,470 lesion_ids; near-duplicates by content (HAM10000's "missed duplicates") join some
    assert 0 < dm.duplicate_groups_joined < 100
    assert t.group.nunique() == 7470 - dm.duplicate_groups_joined
    assert _splits_are_lesion_disjoint(t)
    overall = t.label.mean()
    assert abs(overall - 1113 / 10015) < 1e-9
    for split in ("train", "val", "test"):
        share = t.label[t.split == split].mean()
        assert abs(share - overall) < 0.01, (split, share, overall)
    sizes = t.split.value_counts(normalize=True)
    assert abs(sizes["val"] - 0.15) < 0.01 and abs(sizes["test"] - 0.15) < 0.01


def test_resume_on_another_split_is_refused(ham_root, tmp_path):
    """A run resumed from a checkpoint checks that the split is the one the checkpoint recorded
    (the training workflow's records): another seed splits HAM10000's lesions differently."""
    from helpers import compose_cfg, set_key, tiny_dataset_overrides, tiny_model_overrides, tiny_trainer_overrides

    from melanoma.workflows.training_run import run

    overrides = ["dataset=ham10000", "model=vit_tiny", "logger=csv", *tiny_dataset_overrides(ham_root),
                 *tiny_model_overrides(), *tiny_trainer_overrides(1), "dataset.seed=1",
                 "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "test=false", "evaluate=false"]
    run(compose_cfg(overrides, tmp_path / "a"))
    last = str(tmp_path / "a" / "checkpoints" / "last.ckpt")
    same = compose_cfg([*overrides, "trainer.max_epochs=2"], tmp_path / "b")
    set_key(same, "ckpt_path", last)
    run(same)  # same split: resumes
    other = compose_cfg([*overrides, "trainer.max_epochs=2", "dataset.seed=2"], tmp_path / "c")
    set_key(other, "ckpt_path", last)
    with pytest.raises(RuntimeError, match="data split differs"):
        run(other)
