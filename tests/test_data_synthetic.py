import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from melanoma.data.dermmel import DermMelDataModule
from melanoma.data.synthetic import SyntheticDataModule, mask_path, render_lesion, write_dermmel_layout


def test_render_is_deterministic_per_seed():
    a, ma = render_lesion(np.random.default_rng(5), True, 48)
    b, mb = render_lesion(np.random.default_rng(5), True, 48)
    c, _ = render_lesion(np.random.default_rng(6), True, 48)
    assert a.shape == (48, 48, 3) and a.dtype == np.uint8 and ma.dtype == bool and ma.shape == (48, 48)
    assert np.array_equal(a, b) and np.array_equal(ma, mb)
    assert not np.array_equal(a, c)


def test_melanomas_are_larger_and_more_colourful():
    def stats(melanoma):
        areas, hues = [], []
        for s in range(40):
            img, mask = render_lesion(np.random.default_rng(s), melanoma, 64)
            areas.append(mask.mean())
            inside = img[mask].astype(float)
            hues.append(inside.std(0).mean())  # colour spread inside the lesion
        return np.mean(areas), np.mean(hues)

    mel_area, mel_spread = stats(True)
    ben_area, ben_spread = stats(False)
    assert mel_area > 1.4 * ben_area
    assert mel_spread > 2.0 * ben_spread


@pytest.fixture(scope="module")
def synthetic_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_dermmel_layout(root, {"train": 150, "val": 2, "test": 100}, image_size=48, seed=11)
    dm = DermMelDataModule(root, num_workers=0)
    dm.setup()
    return dm


def test_layout_counts_and_masks(synthetic_task):
    t = synthetic_task.table
    assert t.groupby(["split", "label"]).size().to_dict() == {
        ("train", 0): 150, ("train", 1): 150, ("val", 0): 2, ("val", 1): 2, ("test", 0): 100, ("test", 1): 100}
    for p in t.path[:5]:
        m = mask_path(p)
        assert m.exists() and m.suffix == ".png" and "DermMel_masks" in str(m)
        assert Image.open(m).size == Image.open(p).size
    # the mask covers the dark lesion: inside is darker than outside on average
    img = np.asarray(Image.open(t.path[0]).convert("L"), dtype=float)
    mask = np.asarray(Image.open(mask_path(t.path[0]))) > 0
    assert img[mask].mean() < img[~mask].mean()


def test_global_colour_statistics_do_not_solve_the_task(synthetic_task):
    """Per-channel mean and std of each image: a logistic regression stays <= 80% on test."""
    def features(paths):
        out = []
        for p in paths:
            a = np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255
            out.append(np.concatenate([a.mean((0, 1)), a.std((0, 1))]))
        return np.stack(out)

    train, test = synthetic_task.split_table("train"), synthetic_task.split_table("test")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(features(train.path), train.label)
    acc = clf.score(features(test.path), test.label)
    assert acc <= 0.80, acc


def test_generation_is_deterministic_across_runs(tmp_path):
    a = write_dermmel_layout(tmp_path / "a", {"train": 2, "val": 1, "test": 1}, image_size=24, seed=4, masks=False)
    b = write_dermmel_layout(tmp_path / "b", {"train": 3, "val": 1, "test": 1}, image_size=24, seed=4, masks=False)
    rel = "train_sep/Melanoma/synth_train_sep_00001.jpeg"
    assert (a / rel).read_bytes() == (b / rel).read_bytes()  # more images elsewhere change nothing
    assert not (tmp_path / "a" / "DermMel_masks").exists()


def test_datamodule_generates_once_and_regenerates_on_change(tmp_path):
    kw = dict(image_size=32, batch_size=4, num_workers=0, generate_size=32)
    dm = SyntheticDataModule(tmp_path, counts={"train": 4, "val": 2, "test": 2}, **kw)
    assert dm.name == "synthetic" and dm.class_names == ["not_melanoma", "melanoma"]
    dm.prepare_data()
    dm.setup()
    assert len(dm.table) == 16
    first = dm.table.path[0]
    mtime = Image.open(first).filename and __import__("os").path.getmtime(first)
    again = SyntheticDataModule(tmp_path, counts={"train": 4, "val": 2, "test": 2}, **kw)
    again.setup()
    assert again.table.path.tolist() == dm.table.path.tolist()
    assert __import__("os").path.getmtime(first) == mtime  # reused, not rewritten
    bigger = SyntheticDataModule(tmp_path, counts={"train": 5, "val": 2, "test": 2}, **kw)
    bigger.setup()
    assert len(bigger.table) == 18 and bigger.generated_root != dm.generated_root
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and set(y.tolist()) <= {0, 1}
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())
