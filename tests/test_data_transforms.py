import numpy as np
import pytest
import torch
from PIL import Image

from melanoma.conventions import IMAGENET_MEAN, IMAGENET_STD
from melanoma.data.transforms import eval_transform, resolve_augment, train_transform


def _image(w=90, h=60, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_eval_transform_resizes_whole_image_and_normalises():
    t = eval_transform(32)
    mean_colour = tuple(int(round(m * 255)) for m in IMAGENET_MEAN)
    out = t(Image.new("RGB", (90, 60), mean_colour))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert out.abs().max() < 0.02  # the ImageNet mean colour normalises to ~0
    white = t(Image.new("RGB", (90, 60), (255, 255, 255)))
    expected = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    assert torch.allclose(white[:, 0, 0], torch.tensor(expected), atol=1e-4)
    img = _image()
    assert torch.equal(t(img), t(img))  # deterministic


def test_eval_transform_follows_model_mean_std():
    out = eval_transform(16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(Image.new("RGB", (20, 20), (255, 0, 255)))
    assert torch.allclose(out[:, 0, 0], torch.tensor([1.0, -1.0, 1.0]), atol=1e-4)


def test_train_transform_is_random_with_right_shape():
    t = train_transform(24)
    img = _image()
    a, b = t(img), t(img)
    assert a.shape == b.shape == (3, 24, 24)
    assert not torch.equal(a, b)


def test_train_transform_without_augmentation_is_close_to_eval():
    # training resizes with OpenCV (INTER_AREA when shrinking), evaluation with PIL's antialiased
    # bicubic (reproducible outside): on a smooth picture the two agree to ~1/50 of a std
    off = {"scale": [1.0, 1.0], "ratio": [1.5, 1.5], "hflip": 0, "vflip": 0, "rot90": 0, "color_jitter": {"p": 0}}
    y, x = np.mgrid[0:60, 0:90]
    img = Image.fromarray(np.stack([128 + 100 * np.sin(x / 9), 128 + 100 * np.cos(y / 7), x + y], -1).astype(np.uint8))
    diff = (train_transform(24, augment=off)(img) - eval_transform(24)(img)).abs()
    assert diff.mean() < 0.02 and diff.max() < 0.05


def test_eval_transform_is_pil_resize_then_normalise():
    """What an ONNX consumer with PIL and numpy alone computes (the sidecar's recipe)."""
    img = _image(90, 60)
    mean, std = np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)
    for name, pil in (("bicubic", Image.Resampling.BICUBIC), ("area", Image.Resampling.BOX)):
        want = (np.asarray(img.resize((24, 24), pil), np.float32) / 255 - mean) / std
        got = eval_transform(24, interpolation=name)(img).numpy().transpose(1, 2, 0)
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_augment_typos_are_errors():
    with pytest.raises(ValueError, match="unknown augment option 'hflp'"):
        resolve_augment({"hflp": 0.5})
    with pytest.raises(ValueError, match="color_jitter"):
        resolve_augment({"color_jitter": {"brightnes": 0.1}})
    with pytest.raises(ValueError, match="interpolation"):
        resolve_augment({"interpolation": "cubic"})
    assert resolve_augment({"color_jitter": {"hue": 0.0}})["color_jitter"]["brightness"] == 0.2


def test_rejects_non_rgb_pil_images():
    with pytest.raises(ValueError, match="RGB"):
        eval_transform(8)(Image.new("L", (10, 10)))


def test_flips_and_transpose_cover_all_eight_symmetries_evenly():
    keep = {"scale": [1.0, 1.0], "ratio": [1.0, 1.0], "color_jitter": {"p": 0}}
    t = train_transform(8, augment=keep)
    t.set_random_seed(0)
    img = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3) * 2
    seen = {}
    for _ in range(800):
        key = t(img).numpy().tobytes()
        seen[key] = seen.get(key, 0) + 1
    assert len(seen) == 8
    assert min(seen.values()) > 60  # ~100 each


def test_set_random_seed_makes_augmentation_reproducible():
    a, b = train_transform(16), train_transform(16)
    a.set_random_seed(7)
    b.set_random_seed(7)
    img = _image()
    assert all(torch.equal(a(img), b(img)) for _ in range(5))
