"""Percentile bootstrap intervals for the report metrics, resampling whole lesions or patients.

A resample is a count per row (how often the row was drawn), so every metric becomes a weighted
sum over rows and all resamples are computed at once as matrix products and cumulative sums:
1,000 resamples of a 1,500-image test split take a fraction of a second, where calling a
metric function 1,000 times would take longer than the forward pass. The weighted metrics mean
exactly what `melanoma.evaluation.metrics` means by the same key (the tests check every key on
rows repeated by their counts); where groups are given (lesion or patient ids), groups are
drawn with replacement and each row gets its group's count (cluster bootstrap), because images
of one lesion are not independent evidence.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from melanoma.evaluation.metrics import (ECE_BINS, ECE_MELANOMA, _as_arrays, _ece_bins, binary_auroc,
                                         binary_average_precision, classification_metrics,
                                         expected_calibration_error, melanoma_calibration_error)

log = logging.getLogger(__name__)

N_RESAMPLES = 1000
LEVEL = 0.95
# rows x resamples held at once; bounds memory (a few arrays of this many float64) on large splits
_CHUNK_CELLS = 2_000_000


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, NaN where den is 0 (the metric is undefined in that resample)."""
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _ranking_metrics(scores: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted AUROC and average precision of `scores` against boolean `targets`, one value per
    row of `weights` (R, N). Same curve as metrics.roc_curve / precision_recall_curve: rows
    sorted by score once, descending, ties move together (one point per distinct score)."""
    order = np.argsort(-scores, kind="mergesort")
    s, t = scores[order], targets[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    w = weights[:, order]
    tps = np.cumsum(w * t, axis=1)[:, last_of_run]
    predicted = np.cumsum(w, axis=1)[:, last_of_run]
    fps = predicted - tps
    n_pos, n_neg = tps[:, -1:], fps[:, -1:]
    zero = np.zeros((w.shape[0], 1))
    tpr = _ratio(np.hstack([zero, tps]), n_pos)
    fpr = _ratio(np.hstack([zero, fps]), n_neg)
    auroc = np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2, axis=1)
    auroc[(n_pos[:, 0] == 0) | (n_neg[:, 0] == 0)] = np.nan  # one class only
    # step-wise AP: sum of (R_k - R_{k-1}) * P_k; a run no resample row landed in has R_k = R_{k-1}
    # and may have P_k = 0/0, which must count as 0, not NaN
    precision = np.nan_to_num(_ratio(tps, predicted))
    ap = np.sum(np.diff(tpr, axis=1) * precision, axis=1)
    ap[n_pos[:, 0] == 0] = np.nan
    return auroc, ap


def _weighted_ece(confidence: np.ndarray, outcome: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ECE of `confidence` against 0/1 `outcome` per row of `weights` (R, N): the bins of
    metrics.expected_calibration_error, the gap summed within each bin then weighted."""
    bins = _ece_bins(confidence, ECE_BINS)
    onehot = np.zeros((confidence.size, ECE_BINS + 1))
    onehot[np.arange(confidence.size), bins] = outcome - confidence
    return _ratio(np.abs(weights @ onehot).sum(1), weights.sum(1))


def resample_metrics(probs, labels, positive_index: int | None, threshold: float | None = None,
                     *, weights) -> dict[str, np.ndarray]:
    """The report metrics of each resample given as row counts `weights` (R, N): a dict of
    metric key -> (R,) values, NaN where a metric is undefined in that resample. The keys and
    their meaning are those of metrics.classification_metrics (accuracy, balanced_accuracy;
    with a positive class auroc, average_precision, sensitivity_argmax, specificity_argmax;
    with a threshold sensitivity_at_threshold, specificity_at_threshold; ece, and with a positive
    class ece_melanoma); nll and n are not resampled. ECE is biased upwards on small samples
    (empty and thin bins), so its interval need not contain the point estimate."""
    probs, labels = _as_arrays(probs, labels)
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if weights.shape[1] != labels.size:
        raise ValueError(f"weights must be (R, N) = (R, {labels.size}) row counts, got shape {weights.shape}")
    preds = probs.argmax(1)
    correct = (preds == labels).astype(np.float64)
    onehot = np.eye(probs.shape[1])[labels]
    per_class_n = weights @ onehot
    per_class_recall = _ratio(weights @ (onehot * correct[:, None]), per_class_n)
    present = per_class_n > 0
    out = {
        "accuracy": _ratio(weights @ correct, weights.sum(1)),
        # mean recall over the classes drawn in this resample, as balanced_accuracy does over
        # the classes present in its labels
        "balanced_accuracy": _ratio(np.where(present, per_class_recall, 0).sum(1), present.sum(1)),
        "ece": _weighted_ece(probs.max(1), correct, weights),
    }
    if positive_index is None:
        return out
    is_mel = labels == positive_index
    p_mel = probs[:, positive_index]
    out["auroc"], out["average_precision"] = _ranking_metrics(p_mel, is_mel, weights)
    out[ECE_MELANOMA] = _weighted_ece(p_mel, is_mel.astype(np.float64), weights)
    n_mel, n_other = weights @ is_mel, weights @ ~is_mel

    def sens_spec(called: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _ratio(weights @ (called & is_mel), n_mel), _ratio(weights @ (~called & ~is_mel), n_other)

    out["sensitivity_argmax"], out["specificity_argmax"] = sens_spec(preds == positive_index)
    if threshold is not None:
        out["sensitivity_at_threshold"], out["specificity_at_threshold"] = sens_spec(p_mel >= threshold)
    return out


def _group_codes(groups, n: int) -> np.ndarray:
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(
            f"groups must be (N,) = ({n},) lesion or patient ids, one per row of probs, got shape "
            f"{groups.shape}; pass split_table(...)['group'] for the split that was evaluated"
        )
    return np.unique(groups, return_inverse=True)[1].reshape(-1)


def _draw_counts(rng: np.random.Generator, n_units: int, n_draws: int) -> np.ndarray:
    """(n_draws, n_units): how often each unit is drawn when n_units are drawn with replacement."""
    picks = rng.integers(0, n_units, size=(n_draws, n_units))
    picks += np.arange(n_draws)[:, None] * n_units
    return np.bincount(picks.ravel(), minlength=n_draws * n_units).reshape(n_draws, n_units)


@dataclass(frozen=True)
class BootstrapResult:
    intervals: dict[str, list[float]]  # metric key -> [lo, hi]; [nan, nan] if never defined
    used: dict[str, int]  # metric key -> resamples in which the metric was defined
    n_resamples: int
    level: float
    grouped: bool

    @property
    def skipped(self) -> dict[str, int]:
        """Metric key -> resamples skipped because the metric was undefined there (only > 0)."""
        return {k: self.n_resamples - u for k, u in self.used.items() if u < self.n_resamples}

    def summary(self) -> dict:
        """JSON-ready description for metrics.json; resamples_used lists only metrics where some
        resamples were skipped."""
        return {
            "method": "percentile bootstrap" + (", groups resampled whole" if self.grouped else ""),
            "level": self.level,
            "n_resamples": self.n_resamples,
            "grouped": self.grouped,
            "resamples_used": {k: self.used[k] for k in self.skipped},
        }


def bootstrap(
    probs, labels, positive_index: int | None, threshold: float | None = None, groups=None,
    n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = LEVEL,
) -> BootstrapResult:
    """Percentile intervals of the report metrics, with how many resamples each one used.

    probs (N, C), labels (N,), positive_index, threshold: as metrics.classification_metrics.
    groups: (N,) lesion or patient ids; when given, whole groups are resampled with replacement.
    A resample in which a metric is undefined (e.g. no melanoma drawn) is skipped for that
    metric only, and a warning says how many were used. Same inputs and seed, same intervals.
    """
    probs, labels = _as_arrays(probs, labels)
    n = labels.size
    if n == 0:
        raise ValueError("cannot bootstrap metrics of no rows: the evaluated split is empty")
    if int(n_resamples) < 1:
        raise ValueError(f"n_resamples must be a positive number of resamples (e.g. {N_RESAMPLES}), got {n_resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be a coverage in (0, 1), e.g. {LEVEL}, got {level}")
    n_resamples = int(n_resamples)
    codes = None if groups is None else _group_codes(groups, n)
    n_units = n if codes is None else int(codes.max()) + 1
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_CELLS // n)
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, n_resamples, chunk):
        counts = _draw_counts(rng, n_units, min(chunk, n_resamples - start))
        weights = counts if codes is None else counts[:, codes]
        parts.append(resample_metrics(probs, labels, positive_index, threshold, weights=weights))
    alpha = (1 - level) / 2
    intervals, used = {}, {}
    for key in parts[0]:
        values = np.concatenate([p[key] for p in parts])
        values = values[np.isfinite(values)]
        used[key] = int(values.size)
        intervals[key] = (np.quantile(values, [alpha, 1 - alpha]).tolist() if values.size
                          else [float("nan"), float("nan")])
    result = BootstrapResult(intervals, used, n_resamples, float(level), codes is not None)
    if result.skipped:
        log.warning(
            "bootstrap: some metrics were undefined in some resamples (e.g. no melanoma drawn) and "
            "their intervals use fewer resamples: %s",
            ", ".join(f"{k} {used[k]} of {n_resamples}" for k in result.skipped),
        )
    return result


def bootstrap_intervals(
    probs, labels, positive_index: int | None, threshold: float | None = None, groups=None,
    n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = LEVEL,
) -> dict[str, list[float]]:
    """Metric key -> [lo, hi] percentile interval; see `bootstrap` for the arguments and for the
    number of resamples each interval used."""
    return bootstrap(probs, labels, positive_index, threshold, groups, n_resamples, seed, level).intervals


def format_ci(value: float, interval: Sequence[float] | None, digits: int = 3) -> str:
    """`0.912 [0.871, 0.948]`; the value alone without an interval; `n/a` when undefined."""
    if value is None or not np.isfinite(value):
        return "n/a"
    text = f"{value:.{digits}f}"
    if interval is None or not all(np.isfinite(interval)):
        return text
    lo, hi = interval
    return f"{text} [{lo:.{digits}f}, {hi:.{digits}f}]"


__all__ = ["BootstrapResult", "LEVEL", "N_RESAMPLES", "bootstrap", "bootstrap_intervals", "format_ci",
           "resample_metrics"]


def metrics_with_intervals(probs, labels, pos: int | None, threshold: float | None, groups,
                           drop: Sequence[str] = ("nll",)) -> dict:
    """The report metrics (melanoma.evaluation.metrics) with 95% percentile bootstrap intervals
    under "ci95", resampling whole lesions / patients where there are groups; `drop` names
    metrics left out (nll: reported separately before and after calibration)."""
    metrics = classification_metrics(probs, labels, pos, threshold)
    for key in drop:
        metrics.pop(key, None)
    result = bootstrap(probs, labels, pos, threshold, groups=groups)
    metrics["ci95"], metrics["ci95_method"] = result.intervals, result.summary()
    return metrics


def calibration_comparison(raw_probs, probs, labels, pos: int | None, groups) -> dict:
    """ECE (top label, and of the melanoma probability) before and after calibration, each
    with its bootstrap interval (the same resampling as the other metrics), intervals under
    "ci95_calibration"."""
    out, ci = {}, {}
    for when, p in (("before", raw_probs), ("after", probs)):
        intervals = bootstrap(p, labels, pos, groups=groups).intervals
        out[f"ece_{when}_calibration"] = expected_calibration_error(p, labels)
        ci[f"ece_{when}_calibration"] = intervals["ece"]
        if pos is not None:
            out[f"{ECE_MELANOMA}_{when}_calibration"] = melanoma_calibration_error(p[:, pos], labels == pos)
            ci[f"{ECE_MELANOMA}_{when}_calibration"] = intervals[ECE_MELANOMA]
    return {**out, "ci95_calibration": ci}


#: the ranking metrics `paired_difference` compares, with their point estimate on all rows
PAIRED_METRICS = {"auroc": binary_auroc, "average_precision": binary_average_precision}


@dataclass(frozen=True)
class PairedDifference:
    """metric(a) - metric(b) on the same rows, with a paired percentile interval."""
    metric: str
    a: float                  # metric of scores_a on all rows
    b: float                  # metric of scores_b on all rows
    difference: float         # a - b
    interval: list[float]     # [lo, hi] of a - b over the resamples (the same rows drawn for both)
    share_at_or_below_zero: float  # share of resamples with a - b <= 0 (how often a did not win)
    used: int                 # resamples in which the metric was defined (both classes drawn)
    n_resamples: int
    level: float
    grouped: bool

    @property
    def excludes_zero(self) -> bool:
        return bool(self.interval[0] > 0 or self.interval[1] < 0)

    def summary(self) -> dict:
        """JSON-ready, with the method spelt out as in BootstrapResult.summary."""
        return {"metric": self.metric, "a": self.a, "b": self.b, "difference": self.difference,
                "interval": list(self.interval), "share_at_or_below_zero": self.share_at_or_below_zero,
                "excludes_zero": self.excludes_zero, "resamples_used": self.used,
                "method": "paired percentile bootstrap" + (", groups resampled whole" if self.grouped else ""),
                "n_resamples": self.n_resamples, "level": self.level}


def paired_difference(
    scores_a, scores_b, targets, groups=None, metric: str = "auroc",
    n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = LEVEL,
) -> PairedDifference:
    """How much better model a ranks than model b on the same rows: metric(a) - metric(b) with a
    paired percentile bootstrap, both scored on each resample's same rows (or, with `groups`,
    the same whole lesions / patients). Pairing removes the shared difficulty of the rows, so a
    difference can be clear while the two marginal intervals overlap, and vice versa.

    scores_a, scores_b: (N,) melanoma scores (probabilities or logits; only their order counts);
    targets: (N,) bool or 0/1, True for melanoma; metric: a key of PAIRED_METRICS. Resamples
    in which the metric is undefined (one class only) are skipped and counted in `used`.
    """
    if metric not in PAIRED_METRICS:
        raise ValueError(f"metric must be one of {sorted(PAIRED_METRICS)}, got {metric!r}")
    a, b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    t = np.asarray(targets)
    if a.ndim != 1 or a.shape != b.shape or t.shape != a.shape:
        raise ValueError(
            f"scores_a, scores_b and targets must be three (N,) arrays over the same rows, got shapes "
            f"{a.shape}, {b.shape}, {t.shape}; pass one melanoma score per image for each model"
        )
    if not np.isin(t, (0, 1)).all():
        raise ValueError(f"targets must be bool or 0/1 (1 = melanoma), found values {np.unique(t)[:5].tolist()}")
    t = t.astype(bool)
    if int(n_resamples) < 1:
        raise ValueError(f"n_resamples must be a positive number of resamples (e.g. {N_RESAMPLES}), got {n_resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be a coverage in (0, 1), e.g. {LEVEL}, got {level}")
    n, n_resamples = t.size, int(n_resamples)
    codes = None if groups is None else _group_codes(groups, n)
    n_units = n if codes is None else int(codes.max()) + 1
    rng = np.random.default_rng(seed)
    pick = 0 if metric == "auroc" else 1
    chunk, diffs = max(1, _CHUNK_CELLS // n), []
    for start in range(0, n_resamples, chunk):
        counts = _draw_counts(rng, n_units, min(chunk, n_resamples - start))
        weights = counts if codes is None else counts[:, codes]
        diffs.append(_ranking_metrics(a, t, weights)[pick] - _ranking_metrics(b, t, weights)[pick])
    d = np.concatenate(diffs)
    d = d[np.isfinite(d)]
    alpha = (1 - level) / 2
    interval = np.quantile(d, [alpha, 1 - alpha]).tolist() if d.size else [float("nan"), float("nan")]
    va, vb = PAIRED_METRICS[metric](a, t), PAIRED_METRICS[metric](b, t)
    return PairedDifference(metric, float(va), float(vb), float(va - vb), interval,
                            float((d <= 0).mean()) if d.size else float("nan"), int(d.size), n_resamples,
                            float(level), codes is not None)


__all__ = ["BootstrapResult", "LEVEL", "N_RESAMPLES", "PAIRED_METRICS", "PairedDifference", "bootstrap",
           "bootstrap_intervals", "format_ci", "paired_difference", "resample_metrics"]
