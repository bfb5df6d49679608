"""PNG overlays: the heat map's hottest colour sits where the map peaks; grid layout."""

import numpy as np
from PIL import Image

from melanoma.explain.overlay import HEAD_TILE, LABEL_HEIGHT, heatmap_rgb, normalise, overlay, save_head_grid, save_overlay


def test_heatmap_peak_and_normalisation():
    m = np.zeros((4, 4))
    m[1, 2] = 5.0
    heat = heatmap_rgb(m, (64, 64))
    assert heat.shape == (64, 64, 3) and heat.dtype == np.uint8
    # jet: the peak is dark red, far corners dark blue
    r, g, b = heat[1 * 16 + 8, 2 * 16 + 8].astype(int)
    assert r > 100 and b < 50
    r, g, b = heat[60, 3].astype(int)
    assert b > 100 and r < 50
    assert normalise(np.full((3, 3), 7.0)).max() == 0  # a constant map has no hot spot


def test_overlay_blends_and_files_have_the_expected_layout(tmp_path):
    img = np.full((40, 60, 3), 200, np.uint8)
    m = np.random.default_rng(0).random((5, 5))
    out = overlay(img, m, alpha=0.0)
    assert (out == img).all()  # alpha 0 leaves the picture alone
    p = save_overlay(tmp_path / "a" / "x.png", img, m, title="melanoma 0.93")
    assert Image.open(p).size == (3 * 60 + 2 * 4, 40 + LABEL_HEIGHT)
    big = Image.fromarray(np.full((224, 224, 3), 90, np.uint8))
    p = save_head_grid(tmp_path / "g.png", big, np.random.default_rng(1).random((12, 14, 14)), m)
    # 12 heads + mean = 13 tiles -> 4 columns x 4 rows of HEAD_TILE px
    w, h = Image.open(p).size
    assert w == 4 * HEAD_TILE + 3 * 4 and h == 4 * (HEAD_TILE + LABEL_HEIGHT) + 3 * 4
