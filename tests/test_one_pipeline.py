"""One evaluation pipeline of pixels: validation and test during training (with and without the
image cache), `melanoma predict` / `serve` (Predictor) and the ONNX sidecar's PIL + numpy recipe
give the model the same tensor for the same file, on real dermoscopy JPEGs and EXIF-rotated ones.
Training augmentation may decode however is fastest (JPEG draft mode); evaluation may not."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from melanoma.data.base import LesionImageDataset
from melanoma.data.dermmel import DermMelDataModule
from melanoma.data.synthetic import render_lesion
from melanoma.models.checkpoint import preprocessing_from
from melanoma.data.io import load_rgb
from melanoma.predict.predictor import eval_transform_of

SIZE = 32  # small enough that JPEG draft decoding applies to 200x150 and 600x450 originals
EXIF_ORIENTATION = 0x0112


def _sources(shared_data, n: int = 12) -> list[tuple[str, bytes | Image.Image]]:
    """Real HAM10000 JPEG bytes where the shared data is present, else rendered 600x450 lesions."""
    folder = shared_data / "HAM10000" / "HAM10000_images_part_1"
    files = sorted(folder.glob("*.jpg"))[:n] if folder.is_dir() else []
    if files:
        return [(f.name, f.read_bytes()) for f in files]
    rng = np.random.default_rng(0)
    return [(f"lesion_{i}.jpg", Image.fromarray(render_lesion(rng, bool(i % 2), 450)[0]).resize((600, 450)))
            for i in range(n)]


@pytest.fixture(scope="module")
def dermmel_real(tmp_path_factory, shared_data):
    """A DermMel layout of real JPEGs; every third one re-saved with an EXIF orientation (6: turn
    90 degrees, 3: 180), as phone and camera pictures come."""
    root = tmp_path_factory.mktemp("one_pipeline") / "DermMel"
    folders = [(split, cls) for split in ("train_sep", "valid", "test") for cls in ("Melanoma", "NotMelanoma")]
    rotated = []
    for i, (name, content) in enumerate(_sources(shared_data)):
        split, cls = folders[i % len(folders)]
        path = root / split / cls / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            content.save(path, quality=90)
        if i % 3 == 0:
            exif = Image.Exif()
            exif[EXIF_ORIENTATION] = 6 if i % 2 == 0 else 3
            Image.open(path).convert("RGB").save(path, quality=92, exif=exif)
            rotated.append(str(path))
    return root, rotated


def _onnx_recipe(path: str, pre) -> torch.Tensor:
    """The sidecar's "inputs" description, written with PIL and numpy alone."""
    img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    filt = getattr(Image.Resampling, pre.interpolation.upper())
    x = np.asarray(img.resize((pre.image_size, pre.image_size), filt), dtype=np.float32) / 255.0
    x = (x - np.asarray(pre.mean, dtype=np.float32)) / np.asarray(pre.std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def _loader_tensors(dm, split: str) -> dict[str, torch.Tensor]:
    rows = dm.split_table(split)
    xs = torch.cat([x for x, _ in getattr(dm, f"{split}_dataloader")()])
    return dict(zip(rows["path"], xs))


@pytest.mark.parametrize("cache", [None, "jpg", "npy"])
def test_training_evaluation_predict_and_onnx_see_the_same_tensor(dermmel_real, tmp_path, cache):
    root, rotated = dermmel_real
    dm = DermMelDataModule(root, image_size=SIZE, num_workers=0, batch_size=4,
                           **({"cache_dir": tmp_path / "cache", "cache_format": cache} if cache else {}))
    dm.setup()
    pre = preprocessing_from(dm.image_size, dm.mean, dm.std, dm.augment["interpolation"])  # what training stores
    predict = eval_transform_of(pre)
    seen = 0
    for split in ("val", "test"):
        for path, x in _loader_tensors(dm, split).items():
            expected = predict(load_rgb(path))
            assert x.shape == expected.shape == (3, SIZE, SIZE)
            assert torch.max(torch.abs(x - expected)) <= 1e-6, path
            assert torch.max(torch.abs(_onnx_recipe(path, pre) - expected)) <= 1e-6, path
            seen += 1
    assert seen == 8
    assert {p for p in rotated if "/train_sep/" not in p} <= set(dm.split_table("val").path) | set(dm.split_table("test").path)
    if cache:  # the evaluation cache holds those pixels themselves
        assert all(p.endswith(".npy") and "eval_bicubic_32x32" in p for p in dm._eval_cached.values())
        assert len(dm._eval_cached) == 8


def test_draft_decoding_would_have_given_other_pixels(dermmel_real):
    """Why evaluation may not decode in draft mode (as it did): the tensors differ, so the checks
    above can fail."""
    root, rotated = dermmel_real
    dm = DermMelDataModule(root, image_size=SIZE, num_workers=0)
    dm.setup()
    rows = dm.split_table("val")
    draft = LesionImageDataset(rows["path"], rows["label"], dm.eval_transform, decode_size=SIZE)
    full = dm.dataset("val")
    diffs = [float(torch.max(torch.abs(draft[i][0] - full[i][0]))) for i in range(len(rows))]
    assert max(diffs) > 1e-3
    # an EXIF-rotated picture is turned upright on every path (the rotated file's own pixels differ)
    path = next(p for p in rotated if "/valid/" in p or "/test/" in p)
    upright = load_rgb(path)
    assert upright.size != Image.open(path).size or Image.open(path).getexif().get(EXIF_ORIENTATION) == 3
