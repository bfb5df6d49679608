"""Report figures say which decision rule they show, keep their legends off the data, show the
confidences that occur with sparse bins marked, the operating point on ROC and PR, and a
bootstrap band on the ROC."""

import numpy as np
import pytest
from matplotlib.collections import PolyCollection

from melanoma.evaluation.figures import (
    ARGMAX_RULE,
    SPARSE_BIN,
    confidence_figure,
    confusion_counts,
    pr_figure,
    reliability_figure,
    reliability_x_range,
    report_figures,
    roc_band,
    roc_figure,
    wilson_interval,
)
from melanoma.evaluation.metrics import roc_curve

NAMES2 = ["not_melanoma", "melanoma"]
DX = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


@pytest.fixture(scope="module")
def binary():
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.2).astype(int)
    p = 1 / (1 + np.exp(-(rng.normal(0, 1, 300) + 3 * y - 1.5)))
    return np.stack([1 - p, p], 1), y


def _texts(fig) -> str:
    parts = [fig._suptitle.get_text() if fig._suptitle else ""]
    for ax in fig.axes:
        parts.append(ax.get_title())
    for legend in fig.legends:
        parts += [t.get_text() for t in legend.get_texts()]
    return " | ".join(parts)


def test_binary_confusion_matrix_is_at_the_operating_point_and_says_so(binary):
    probs, y = binary
    figs = report_figures(probs, y, NAMES2, 1, threshold=0.3)
    text = _texts(figs["confusion_matrix"])
    assert "operating point: melanoma when p(melanoma) >= 0.3" in text
    called = (probs[:, 1] >= 0.3).astype(int)
    expected = confusion_counts(y, called, 2)
    shown = figs["confusion_matrix"].axes[0].texts
    assert [int(t.get_text()) for t in shown] == expected.ravel().tolist()
    assert expected.ravel().tolist() != confusion_counts(y, probs.argmax(1), 2).ravel().tolist()  # the rules differ here
    # every other figure names its rule too
    assert "operating point" in _texts(figs["confidence"]) and "0.3" in _texts(figs["confidence"])
    assert ARGMAX_RULE in _texts(figs["reliability"])
    assert "operating point" in _texts(figs["roc"]) and "operating point" in _texts(figs["precision_recall"])


def test_without_threshold_everything_is_argmax(binary):
    probs, y = binary
    figs = report_figures(probs, y, NAMES2, 1)
    assert ARGMAX_RULE in _texts(figs["confusion_matrix"]) and ARGMAX_RULE in _texts(figs["confidence"])
    assert "none stored" in _texts(figs["roc"])


def test_multiclass_keeps_argmax_matrix_and_adds_melanoma_vs_rest_at_operating_point():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 7, 200)
    logits = rng.normal(0, 1, (200, 7))
    logits[np.arange(200), labels] += 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    figs = report_figures(probs, labels, DX, 4, threshold=0.2)
    assert ARGMAX_RULE in _texts(figs["confusion_matrix"])
    op = figs["confusion_operating_point"]
    assert ">= 0.2" in _texts(op)
    expected = confusion_counts((labels == 4).astype(int), (probs[:, 4] >= 0.2).astype(int), 2)
    assert [int(t.get_text()) for t in op.axes[0].texts] == expected.ravel().tolist()


def test_legends_sit_outside_the_axes(binary):
    probs, y = binary
    for fig in (confidence_figure(probs, y, 1, 0.9), roc_figure(probs[:, 1], y == 1, 0.9),
                pr_figure(probs[:, 1], y == 1, 0.9), reliability_figure({"a": probs, "b": probs}, y)):
        fig.draw_without_rendering()  # runs the constrained layout
        assert all(ax.get_legend() is None for ax in fig.axes)
        (legend,) = fig.legends
        box = legend.get_window_extent()
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent()), "the legend covers a plot"
    labels = [t.get_text() for t in confidence_figure(probs, y, 1, 0.9).legends[0].get_texts()]
    assert labels == ["operating point threshold 0.9"]


def test_reliability_covers_the_confidences_that_occur_and_marks_sparse_bins(binary):
    probs, y = binary
    low, high = reliability_x_range(probs)
    assert low >= 0.45 and high == 1.0  # two classes: top-label confidence >= 0.5
    fig = reliability_figure({"after calibration": probs}, y)
    ax = fig.axes[0]
    assert ax.get_xlim() == pytest.approx((low, 1.0))
    conf = probs.max(1)
    counts = np.bincount(np.minimum((conf * 15).astype(int), 14), minlength=15)
    sparse = int(((counts > 0) & (counts < SPARSE_BIN)).sum())
    assert sparse > 0
    hatched = [p for p in ax.patches if p.get_hatch()]
    assert len(hatched) == sparse and all(not p.get_fill() for p in hatched)
    solid = [p for p in ax.patches if not p.get_hatch()]
    assert len(solid) == int((counts >= SPARSE_BIN).sum())
    # each bar's count is written on it
    assert sorted(int(t.get_text()) for t in ax.texts) == sorted(counts[counts > 0].tolist())


def test_wilson_interval_matches_known_values():
    lo, hi = wilson_interval(np.array([0, 5, 10]), np.array([10, 10, 10]))
    assert lo == pytest.approx([0.0, 0.2366, 0.7225], abs=1e-3)
    assert hi == pytest.approx([0.2775, 0.7634, 1.0], abs=1e-3)


def test_pr_and_roc_mark_the_operating_point(binary):
    probs, y = binary
    p, truth = probs[:, 1], y == 1
    called = p >= 0.4
    recall, precision = (called & truth).sum() / truth.sum(), (called & truth).sum() / called.sum()
    ax = pr_figure(p, truth, 0.4).axes[0]
    (dot,) = [c for c in ax.collections if c.get_offsets().shape == (1, 2)]
    assert list(dot.get_offsets()[0]) == pytest.approx([recall, precision])
    ax = roc_figure(p, truth, 0.4).axes[0]
    (dot,) = [c for c in ax.collections if not isinstance(c, PolyCollection)]
    assert list(dot.get_offsets()[0]) == pytest.approx([(called & ~truth).sum() / (~truth).sum(), recall])


def test_roc_band_brackets_the_curve_and_widens_with_fewer_images(binary):
    probs, y = binary
    p, truth = probs[:, 1], y == 1
    grid, lo, hi = roc_band(p, truth)
    fpr, tpr, _ = roc_curve(p, truth)
    curve = np.interp(grid, fpr, tpr)
    assert np.all(lo <= hi + 1e-12)
    assert np.mean((lo - 1e-9 <= curve) & (curve <= hi + 1e-9)) > 0.9
    _, lo_small, hi_small = roc_band(p[:60], truth[:60])
    assert np.nanmean(hi_small - lo_small) > np.nanmean(hi - lo)
    # resampling whole groups of two identical images is wider than resampling images
    doubled_p, doubled_y = np.repeat(p, 2), np.repeat(truth, 2)
    _, lo_g, hi_g = roc_band(doubled_p, doubled_y, groups=np.repeat(np.arange(p.size), 2))
    _, lo_i, hi_i = roc_band(doubled_p, doubled_y)
    assert np.mean(hi_g - lo_g) > np.mean(hi_i - lo_i)
    band = [c for c in roc_figure(p, truth).axes[0].collections if isinstance(c, PolyCollection)]
    assert len(band) == 1
