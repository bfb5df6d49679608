"""PNG overlays: the heat map's hottest colour sits where the map peaks; grid layout."""

import numpy as np
from PIL import Image

from melanoma.explain.overlay import (
    COLOUR_BAR_SPACE,
    HEAD_TILE,
    LABEL_HEIGHT,
    TITLE_HEIGHT,
    colour_bar,
    heads_agreement,
    heatmap_rgb,
    normalise,
    overlay,
    save_head_grid,
    save_overlay,
)


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
    p = save_overlay(tmp_path / "a" / "x.png", img, m, title="Attention rollout · decision: melanoma")
    # a title line over image | heat map | overlay | colour bar
    assert Image.open(p).size == (3 * 60 + COLOUR_BAR_SPACE + 3 * 4, TITLE_HEIGHT + 40 + LABEL_HEIGHT)
    big = Image.fromarray(np.full((224, 224, 3), 90, np.uint8))
    p = save_head_grid(tmp_path / "g.png", big, np.random.default_rng(1).random((12, 14, 14)), m)
    # 12 heads + mean = 13 tiles -> 4 columns x 4 rows of HEAD_TILE px, a colour bar, header lines
    w, h = Image.open(p).size
    assert w == 4 * HEAD_TILE + 3 * 4 + 4 + COLOUR_BAR_SPACE
    header = h - (4 * (HEAD_TILE + LABEL_HEIGHT) + 3 * 4)
    assert header % TITLE_HEIGHT == 0 and 2 <= header // TITLE_HEIGHT <= 4


def test_colour_bar_runs_from_max_at_the_top_to_min():
    bar = np.asarray(colour_bar(100))
    top, bottom = bar[LABEL_HEIGHT + 1, 8].astype(int), bar[LABEL_HEIGHT + 98, 8].astype(int)
    assert top[0] > 100 and top[2] < 60  # jet's high end is red
    assert bottom[2] > 100 and bottom[0] < 60  # its low end blue


def test_head_grid_says_whether_heads_coincide():
    rng = np.random.default_rng(0)
    base = rng.random((14, 14))
    same = np.stack([base + 0.01 * rng.random((14, 14)) for _ in range(4)])
    assert heads_agreement(same) > 0.99
    different = rng.random((4, 14, 14))
    assert heads_agreement(different) < 0.5
    assert heads_agreement(np.ones((3, 4, 4))) == 1.0 and heads_agreement(base[None]) == 1.0


def test_decision_caption_names_the_decision_and_the_numbers_it_compares():
    from melanoma.predict.predictor import decision_caption

    rec = {"predicted_class": "melanoma", "melanoma_probability": 0.84, "threshold": 0.98, "decision": "not_melanoma"}
    assert decision_caption(rec) == "decision: below the melanoma threshold (p 0.84 < 0.98)"
    rec.update(melanoma_probability=0.9791, threshold=0.9803)  # equal at 2 digits: more are shown
    assert decision_caption(rec) == "decision: below the melanoma threshold (p 0.9791 < 0.9803)"
    rec.update(melanoma_probability=0.99, decision="melanoma", threshold=0.5)
    assert decision_caption(rec) == "decision: melanoma (p 0.99 >= threshold 0.50)"
    rec.update(threshold=None, decision=None)
    assert "no decision" in decision_caption(rec)
