
import pytest
from PIL import Image

from melanoma.data.check import check_dataset, check_images
from melanoma.data.dermmel import DermMelDataModule
from melanoma.data.io import ImageReadError
from melanoma.data.synthetic import write_dermmel_layout


@pytest.fixture
def damaged_dermmel(tmp_path):
    dermmel = write_dermmel_layout(tmp_path, {"train": 3, "val": 1, "test": 1}, image_size=32, seed=9, masks=False)
    files = sorted((dermmel / "train_sep" / "Melanoma").iterdir())
    files[0].write_bytes(b"")
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) // 3])
    Image.new("L", (20, 20), 128).save(dermmel / "test" / "NotMelanoma" / "gray.jpg")
    return tmp_path, files[:2]


def test_check_dataset_lists_exactly_the_bad_images(damaged_dermmel, capsys):
    root, broken = damaged_dermmel
    dm = DermMelDataModule(root, num_workers=0)
    bad = check_dataset(dm, progress=True)
    assert [p for p, _ in bad] == [str(b) for b in broken]
    assert "empty" in bad[0][1] and "truncated" in bad[1][1]
    assert "checking images" in capsys.readouterr().err  # the tqdm bar
    assert len(dm.table) == 11  # grayscale file is fine and counted


def test_loading_a_bad_image_in_a_loader_names_it(damaged_dermmel):
    root, broken = damaged_dermmel
    dm = DermMelDataModule(root, num_workers=0, batch_size=16)
    dm.setup()
    with pytest.raises(ImageReadError, match=broken[0].name):
        next(iter(dm.train_dataloader()))
    # from a worker process the error keeps its type and still names the file
    dm = DermMelDataModule(root, num_workers=1, batch_size=16)
    dm.setup()
    with pytest.raises(ImageReadError, match=broken[0].name):
        next(iter(dm.train_dataloader()))


def test_check_images_accepts_plain_paths(tmp_path):
    good = tmp_path / "a.png"
    Image.new("RGB", (4, 4)).save(good)
    missing = tmp_path / "b.jpg"
    assert check_images([good, missing], progress=False) == [(str(missing), "file not found")]
