"""paired_difference: metric(a) - metric(b) on the same resampled rows (or whole groups)."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from melanoma.evaluation.bootstrap import bootstrap, paired_difference


def _two_models(n=400, seed=0, noise=1.5):
    """A good model and a worse one that shares its errors: b = a + extra noise."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.25
    a = y * 1.5 + rng.normal(size=n)
    b = a + rng.normal(scale=noise, size=n)
    return a, b, y


@pytest.mark.parametrize("metric, ref", [("auroc", roc_auc_score), ("average_precision", average_precision_score)])
def test_point_difference_is_the_difference_of_the_reference_metrics(metric, ref):
    a, b, y = _two_models()
    d = paired_difference(a, b, y, metric=metric, n_resamples=200)
    assert d.a == pytest.approx(ref(y, a), abs=1e-12)
    assert d.b == pytest.approx(ref(y, b), abs=1e-12)
    assert d.difference == pytest.approx(ref(y, a) - ref(y, b), abs=1e-12)
    assert d.interval[0] <= d.difference <= d.interval[1]
    assert d.used == 200 and not d.grouped


def test_pairing_separates_models_whose_marginal_intervals_overlap():
    a, b, y = _two_models(n=600, noise=1.0)
    d = paired_difference(a, b, y, n_resamples=1000)
    assert d.difference > 0.03
    assert d.interval[0] > 0 and d.excludes_zero
    assert d.share_at_or_below_zero < 0.025
    # the pairing removes the rows' shared difficulty: the difference is known more tightly than
    # either model's AUROC alone, whose intervals overlap
    width = d.interval[1] - d.interval[0]
    (lo_a, hi_a), (lo_b, hi_b) = (bootstrap(np.stack([-s, s], 1), y.astype(int), 1, n_resamples=1000).intervals["auroc"]
                                  for s in (a, b))
    assert width < min(hi_a - lo_a, hi_b - lo_b)
    assert lo_a < hi_b


def test_identical_scores_differ_by_exactly_zero_and_swapping_negates():
    a, b, y = _two_models()
    same = paired_difference(a, a.copy(), y, n_resamples=300)
    assert same.difference == 0 and same.interval == [0.0, 0.0] and same.share_at_or_below_zero == 1.0
    assert not same.excludes_zero
    ab, ba = paired_difference(a, b, y, seed=3, n_resamples=300), paired_difference(b, a, y, seed=3, n_resamples=300)
    assert ba.difference == pytest.approx(-ab.difference)
    assert ba.interval == pytest.approx([-ab.interval[1], -ab.interval[0]])


def test_groups_are_resampled_whole():
    # every row twice, each pair one group: the same draws over groups as over the single rows, so
    # the same interval; resampling the doubled rows one by one gives another one
    a, b, y = _two_models(n=150)
    single = paired_difference(a, b, y, n_resamples=500, seed=7)
    twice = [np.repeat(v, 2) for v in (a, b, y)]
    grouped = paired_difference(*twice, groups=np.repeat(np.arange(150) * 3 + 11, 2), n_resamples=500, seed=7)
    assert grouped.grouped
    assert grouped.difference == pytest.approx(single.difference)
    assert grouped.interval == pytest.approx(single.interval)
    rows = paired_difference(*twice, n_resamples=500, seed=7)
    assert rows.interval != pytest.approx(single.interval)
    assert rows.interval[1] - rows.interval[0] < single.interval[1] - single.interval[0]


def test_resamples_with_one_class_are_skipped_and_counted():
    y = np.zeros(12, dtype=bool)
    y[0] = True  # one melanoma: many resamples draw none
    rng = np.random.default_rng(1)
    d = paired_difference(rng.random(12), rng.random(12), y, n_resamples=400)
    assert 0 < d.used < 400
    assert np.isfinite(d.interval).all()


def test_bad_inputs_say_what_was_expected():
    a, b, y = _two_models(n=20)
    with pytest.raises(ValueError, match="same rows"):
        paired_difference(a, b[:-1], y)
    with pytest.raises(ValueError, match="0/1"):
        paired_difference(a, b, y * 2.0 + 1)
    with pytest.raises(ValueError, match="metric must be one of"):
        paired_difference(a, b, y, metric="accuracy")
    with pytest.raises(ValueError, match="groups must be"):
        paired_difference(a, b, y, groups=np.arange(5))


def test_summary_is_json_ready():
    import json

    a, b, y = _two_models(n=100)
    s = paired_difference(a, b, y, groups=np.arange(100) // 2, n_resamples=100).summary()
    assert json.loads(json.dumps(s))["method"] == "paired percentile bootstrap, groups resampled whole"
    assert set(s) >= {"difference", "interval", "share_at_or_below_zero", "excludes_zero", "resamples_used"}
