import pickle

import numpy as np
import pytest
from PIL import Image

from melanoma.data.io import ImageReadError, find_images, load_rgb


def _jpeg(path, size=(600, 450), colour=(200, 120, 80)):
    Image.new("RGB", size, colour).save(path, quality=95)
    return path


def test_grayscale_becomes_rgb_with_equal_channels(tmp_path):
    p = tmp_path / "gray.png"
    Image.fromarray(np.full((8, 10), 77, np.uint8), mode="L").save(p)
    img = load_rgb(p)
    assert img.mode == "RGB" and img.size == (10, 8)
    assert np.array_equal(np.asarray(img)[0, 0], [77, 77, 77])


def test_rgba_opaque_keeps_colour_and_transparent_is_white(tmp_path):
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., 0], arr[..., 3] = 200, 255
    arr[0, 0, 3] = 0
    p = tmp_path / "rgba.png"
    Image.fromarray(arr, mode="RGBA").save(p)
    out = np.asarray(load_rgb(p))
    assert out.shape == (4, 4, 3)
    assert np.array_equal(out[1, 1], [200, 0, 0])
    assert np.array_equal(out[0, 0], [255, 255, 255])


def test_palette_image_keeps_its_colours(tmp_path):
    arr = np.zeros((6, 6, 3), np.uint8)
    arr[:3] = (10, 200, 30)
    arr[3:] = (250, 5, 100)
    p = tmp_path / "pal.png"
    Image.fromarray(arr).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(p)
    assert Image.open(p).mode == "P"
    out = np.asarray(load_rgb(p))
    assert np.array_equal(out[0, 0], [10, 200, 30]) and np.array_equal(out[5, 5], [250, 5, 100])


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    p = tmp_path / "deep.png"
    Image.fromarray(arr).save(p)
    assert Image.open(p).mode.startswith("I")
    out = np.asarray(load_rgb(p))
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (out[..., 0] == out[..., 2]).all()


def test_exif_orientation_is_applied(tmp_path):
    # Stored 40 wide x 20 high, left half red; orientation 6 = display rotated 90 deg clockwise,
    # which brings the left half to the top.
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6
    p = tmp_path / "rotated.jpg"
    img.save(p, exif=exif, quality=95)
    out = load_rgb(p)
    assert out.size == (20, 40)
    a = np.asarray(out).astype(int)
    assert a[5, 10, 0] > 200 and a[5, 10, 2] < 60  # top is red
    assert a[35, 10, 2] > 200 and a[35, 10, 0] < 60  # bottom is blue


def test_large_jpeg_is_decoded_at_reduced_scale_only_when_asked(tmp_path):
    p = _jpeg(tmp_path / "big.jpg")
    assert load_rgb(p).size == (600, 450)
    assert load_rgb(p, target_size=224).size == (300, 225)  # 1/2 scale still covers 224
    assert load_rgb(p, target_size=100).size == (150, 113)  # 1/4 scale
    assert load_rgb(p, target_size=400).size == (600, 450)  # no reduction would cover 400


@pytest.mark.parametrize("kind", ["zero", "garbage", "truncated", "missing"])
def test_unreadable_files_raise_image_read_error_naming_the_file(tmp_path, kind):
    p = tmp_path / f"{kind}.jpg"
    if kind == "zero":
        p.write_bytes(b"")
    elif kind == "garbage":
        p.write_bytes(b"this is not a jpeg" * 20)
    elif kind == "truncated":
        good = _jpeg(tmp_path / "good.jpg", colour=(1, 2, 3))
        Image.effect_noise((600, 450), 60).convert("RGB").save(good, quality=95)
        data = good.read_bytes()
        p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError) as err:
        load_rgb(p)
    assert str(p) in str(err.value)
    assert err.value.path == p
    expected = {"zero": "empty", "garbage": "cannot identify", "truncated": "truncated", "missing": "not found"}
    assert expected[kind] in str(err.value)
    # DataLoader workers send exceptions to the main process by pickling them
    again = pickle.loads(pickle.dumps(err.value))
    assert again.path == p and str(again) == str(err.value)


def test_find_images_walks_folders_sorted_and_skips_other_files(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ["a/b/z.JPG", "a/x.jpeg", "a/y.png", "c.bmp", "d.tif", "a/notes.txt", "a/._x.jpeg"]:
        (tmp_path / name).write_bytes(b"x")
    found = find_images(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a/b/z.JPG", "a/x.jpeg", "a/y.png", "c.bmp", "d.tif"]
    assert find_images([tmp_path / "c.bmp", tmp_path / "a"])[0] == tmp_path / "a" / "b" / "z.JPG"
    assert find_images(str(tmp_path / "c.bmp")) == [tmp_path / "c.bmp"]
    with pytest.raises(ValueError, match="not an image"):
        find_images(tmp_path / "a" / "notes.txt")
    with pytest.raises(FileNotFoundError, match="no such file"):
        find_images(tmp_path / "nope")
