"""Bootstrap intervals of the report metrics: coverage of the point estimate, 1/sqrt(n) width,
cluster resampling, determinism, and the vectorised metrics against independent references."""

import logging

import numpy as np
import pytest
import torch
import torchmetrics.functional.classification as tmf
from sklearn.metrics import average_precision_score, roc_auc_score

from melanoma.evaluation import bootstrap as B
from melanoma.models.checkpoint import softmax
from melanoma.evaluation.metrics import classification_metrics

POS = 1


def _predictions(n, c=2, seed=0, decimals=2, separation=1.5):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    probs = softmax(rng.normal(size=(n, c)) + separation * np.eye(c)[labels])
    if decimals is not None:  # ties: where ROC/PR implementations usually disagree
        probs = np.round(probs, decimals)
        probs = probs / probs.sum(1, keepdims=True)
    return probs, labels


def _width(ci):
    return ci[1] - ci[0]


def test_keys_are_the_metric_keys_and_intervals_contain_the_point_estimate():
    probs, labels = _predictions(300, c=3, seed=1)
    point = classification_metrics(probs, labels, positive_index=2, threshold=0.3)
    cis = B.bootstrap_intervals(probs, labels, positive_index=2, threshold=0.3, n_resamples=1000)
    assert set(cis) == {
        "accuracy", "balanced_accuracy", "auroc", "average_precision", "sensitivity_argmax",
        "specificity_argmax", "sensitivity_at_threshold", "specificity_at_threshold", "ece", "ece_melanoma",
    }
    assert set(cis) <= set(point)  # one key, one meaning: the names classification_metrics uses
    for key, (lo, hi) in cis.items():
        if key.startswith("ece"):  # biased upwards under resampling: the point may lie below
            assert lo < hi and point[key] < hi, key
            continue
        assert lo < point[key] < hi, key
        assert 0 < hi - lo < 0.35, key
    # no threshold: no *_at_threshold; no positive class: only the class-agnostic metrics
    assert "sensitivity_at_threshold" not in B.bootstrap_intervals(probs, labels, positive_index=2, n_resamples=50)
    assert set(B.bootstrap_intervals(probs, labels, positive_index=None, n_resamples=50)) == {
        "accuracy", "balanced_accuracy", "ece"}


def test_accuracy_interval_matches_the_normal_approximation_and_narrows_as_one_over_sqrt_n():
    # Same distribution at n=400 and 1600 (a fixed 80%-correct pattern so the point estimate is
    # exactly 0.8): the 95% interval of a proportion is about 2 * 1.96 * sqrt(p(1-p)/n), i.e.
    # 0.0784 at n=400 and 0.0392 at 1600. Tolerance: 12% on each width (Monte Carlo error of a
    # 2.5% quantile from 2000 resamples is a few %), and the ratio within 2 +- 0.25.
    widths = {}
    for n in (400, 1600):
        # per 10 cases: 4 melanomas (3 found), 6 others (5 cleared): accuracy 0.8
        labels = np.tile([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], n // 10)
        correct = np.tile([1, 1, 1, 0, 1, 1, 1, 1, 1, 0], n // 10).astype(bool)
        predicted = np.where(correct, labels, 1 - labels)
        probs = np.where(predicted[:, None] == 1, [0.2, 0.8], [0.8, 0.2])
        assert classification_metrics(probs, labels, POS)["accuracy"] == pytest.approx(0.8)
        cis = B.bootstrap_intervals(probs, labels, POS, n_resamples=2000, seed=3)
        widths[n] = {k: _width(v) for k, v in cis.items()}
        expected = 2 * 1.959964 * np.sqrt(0.8 * 0.2 / n)
        assert widths[n]["accuracy"] == pytest.approx(expected, rel=0.12)
    for key in ("accuracy", "balanced_accuracy", "sensitivity_argmax", "specificity_argmax"):
        assert widths[400][key] / widths[1600][key] == pytest.approx(2.0, abs=0.25), key


def test_auroc_interval_narrows_as_one_over_sqrt_n():
    # The same empirical distribution at n=400 and n=1600 (the 400 rows, each 4 times, resampled
    # row by row): fresh draws would add the spread of the AUROC's own variance, which depends on
    # the AUROC (0.92 vs 0.95 changed the ratio by 20%). Tolerance 2 +- 0.2 (Monte Carlo error).
    probs, labels = _predictions(400, seed=5, decimals=None, separation=0.8)
    small = B.bootstrap_intervals(probs, labels, POS, n_resamples=2000)
    large = B.bootstrap_intervals(np.tile(probs, (4, 1)), np.tile(labels, 4), POS, n_resamples=2000)
    for key in ("auroc", "average_precision"):
        assert _width(small[key]) / _width(large[key]) == pytest.approx(2.0, abs=0.2), key


def test_groups_are_resampled_whole():
    # Every case photographed 4 times (identical rows): the cluster bootstrap must see 100
    # cases, not 400 images. Grouped intervals of the duplicated data equal the row-level
    # intervals of the de-duplicated data; row-level intervals of the duplicates are about half
    # as wide (sqrt(4)), i.e. falsely confident.
    probs, labels = _predictions(100, seed=2)
    dup_probs, dup_labels = np.repeat(probs, 4, axis=0), np.repeat(labels, 4)
    groups = np.repeat([f"lesion_{i:03d}" for i in range(100)], 4)
    dedup = B.bootstrap_intervals(probs, labels, POS, threshold=0.4, seed=7)
    grouped = B.bootstrap_intervals(dup_probs, dup_labels, POS, threshold=0.4, groups=groups, seed=7)
    naive = B.bootstrap_intervals(dup_probs, dup_labels, POS, threshold=0.4, seed=7)
    for key in dedup:
        np.testing.assert_allclose(grouped[key], dedup[key], atol=1e-12, err_msg=key)
        assert _width(naive[key]) < 0.7 * _width(grouped[key]), key


def test_groups_need_not_be_sorted_or_contiguous():
    probs, labels = _predictions(60, seed=4)
    dup_probs, dup_labels = np.repeat(probs, 2, axis=0), np.repeat(labels, 2)
    groups = np.repeat(np.arange(60), 2)
    perm = np.random.default_rng(0).permutation(120)
    a = B.bootstrap_intervals(dup_probs, dup_labels, POS, groups=groups, seed=1)
    b = B.bootstrap_intervals(dup_probs[perm], dup_labels[perm], POS, groups=groups[perm], seed=1)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=1e-12, err_msg=key)


def test_same_seed_same_intervals_other_seed_other_intervals():
    probs, labels = _predictions(200, seed=8)
    groups = np.arange(200) // 3
    a = B.bootstrap_intervals(probs, labels, POS, threshold=0.5, groups=groups, seed=11)
    b = B.bootstrap_intervals(probs, labels, POS, threshold=0.5, groups=groups, seed=11)
    c = B.bootstrap_intervals(probs, labels, POS, threshold=0.5, groups=groups, seed=12)
    assert a == b
    assert a != c


def test_weighted_metrics_equal_references_on_expanded_resamples():
    # A resample is a count per row; the vectorised metrics on counts must equal the plain
    # metrics (and sklearn / torchmetrics) on the rows repeated that many times.
    probs, labels = _predictions(150, c=3, seed=9)
    pos = 2
    rng = np.random.default_rng(0)
    weights = np.stack([rng.multinomial(150, np.full(150, 1 / 150)) for _ in range(5)]).astype(np.float64)
    weights[0, labels == pos] = 0  # no melanoma drawn: undefined AUROC, AP and sensitivity
    got = B.resample_metrics(probs, labels, pos, threshold=0.35, weights=weights)
    for b in range(5):
        idx = np.repeat(np.arange(150), weights[b].astype(int))
        ref = classification_metrics(probs[idx], labels[idx], pos, threshold=0.35)
        for key, values in got.items():
            if np.isnan(ref[key]):
                assert np.isnan(values[b]), (key, b)
            else:
                assert values[b] == pytest.approx(ref[key], abs=1e-12), (key, b)
        if b == 0:
            continue
        p_mel, is_mel = probs[idx, pos], labels[idx] == pos
        assert got["auroc"][b] == pytest.approx(roc_auc_score(is_mel, p_mel), abs=1e-12)
        assert got["average_precision"][b] == pytest.approx(average_precision_score(is_mel, p_mel), abs=1e-12)
        t_p, t_y = torch.tensor(p_mel), torch.tensor(is_mel.astype(int))
        assert got["auroc"][b] == pytest.approx(float(tmf.binary_auroc(t_p, t_y)), abs=1e-6)
        assert got["average_precision"][b] == pytest.approx(float(tmf.binary_average_precision(t_p, t_y)), abs=1e-6)


def test_undefined_resamples_are_skipped_and_counted(caplog):
    # 2 melanomas in 50: a resample draws none with probability (48/50)^50 = 0.13, so about 130
    # of 1000 resamples cannot give a sensitivity or an AUROC. Fixed seed: the count is exact.
    probs, labels = _predictions(50, seed=10)
    labels = np.zeros(50, dtype=int)
    labels[[3, 17]] = 1
    with caplog.at_level(logging.WARNING, logger="melanoma.evaluation.bootstrap"):
        result = B.bootstrap(probs, labels, POS, threshold=0.5, n_resamples=1000)
    skipped = result.skipped
    assert set(skipped) == {"auroc", "average_precision", "sensitivity_argmax", "sensitivity_at_threshold"}
    assert len(set(skipped.values())) == 1  # the same resamples: those without a melanoma
    assert 90 <= skipped["auroc"] <= 170
    assert result.used["auroc"] == 1000 - skipped["auroc"]
    assert result.used["accuracy"] == 1000
    assert f"{1000 - skipped['auroc']} of 1000" in caplog.text
    for lo, hi in result.intervals.values():
        assert np.isfinite(lo) and np.isfinite(hi)
    # the summary for metrics.json carries the counts only where resamples were skipped
    summary = result.summary()
    assert summary["n_resamples"] == 1000 and summary["level"] == 0.95 and summary["grouped"] is False
    assert summary["resamples_used"] == {k: 1000 - v for k, v in skipped.items()}


def test_metric_undefined_everywhere_gives_nan_interval():
    probs, _ = _predictions(30, seed=0)
    labels = np.zeros(30, dtype=int)  # no melanoma at all
    cis = B.bootstrap_intervals(probs, labels, POS, n_resamples=200)
    assert np.isnan(cis["auroc"]).all() and np.isnan(cis["sensitivity_argmax"]).all()
    assert np.isfinite(cis["specificity_argmax"]).all()


def test_bad_inputs_say_what_was_expected():
    probs, labels = _predictions(20)
    with pytest.raises(ValueError, match=r"groups must be \(N,\) = \(20,\)"):
        B.bootstrap_intervals(probs, labels, POS, groups=np.arange(19))
    with pytest.raises(ValueError, match="n_resamples"):
        B.bootstrap_intervals(probs, labels, POS, n_resamples=0)
    with pytest.raises(ValueError, match="level"):
        B.bootstrap_intervals(probs, labels, POS, level=95)
    with pytest.raises(ValueError, match="no rows"):
        B.bootstrap_intervals(np.zeros((0, 2)), np.zeros(0, dtype=int), POS)


def test_format_ci():
    assert B.format_ci(0.912, [0.871, 0.948]) == "0.912 [0.871, 0.948]"
    assert B.format_ci(0.5, (0.25, 0.75), digits=2) == "0.50 [0.25, 0.75]"
    assert B.format_ci(0.912, None) == "0.912"
    assert B.format_ci(float("nan"), [float("nan"), float("nan")]) == "n/a"
