"""Classification metrics computed from arrays of class probabilities and integer labels.

Written in NumPy so the report does not depend on a metrics library's defaults; the tests check
every number against torchmetrics. The positive class is melanoma everywhere: AUROC, average
precision, sensitivity and specificity are melanoma-versus-rest.

The AUROC keys mean the same here, in the training module's ``val/``/``test/`` metrics and in
``<run>/test/metrics.json``: ``AUROC`` is melanoma-versus-rest, ``AUROC_MACRO`` the unweighted
mean of the one-versus-rest AUROCs of the classes the labels contain (both classes of a binary
set give the same value as ``AUROC``).
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15

#: metric keys, defined once: melanoma-vs-rest AUROC and macro one-vs-rest AUROC
AUROC = "auroc"
AUROC_MACRO = "auroc_macro"
AVERAGE_PRECISION = "average_precision"
#: calibration error of the melanoma probability itself (binned p_melanoma against melanoma
#: frequency). Top-label ECE ("ece") is blind to a shift of the class balance in a two-class
#: task: overconfident melanoma calls and underconfident benign calls cancel inside a bin.
ECE_MELANOMA = "ece_melanoma"


def _as_arrays(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if probs.ndim != 2:
        raise ValueError(f"probs must be (N, C) class probabilities, got shape {probs.shape}")
    if labels.shape != (probs.shape[0],):
        raise ValueError(
            f"labels must be (N,) = ({probs.shape[0]},) integer class indices, got shape {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise ValueError(
            f"labels must lie in [0, {probs.shape[1] - 1}] for {probs.shape[1]} classes, "
            f"found {labels.min()}..{labels.max()}"
        )
    return probs, labels


def _safe_div(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")


def accuracy(probs, labels) -> float:
    probs, labels = _as_arrays(probs, labels)
    return _safe_div((probs.argmax(1) == labels).sum(), labels.size)


def balanced_accuracy(probs, labels) -> float:
    """Mean per-class recall over the classes that occur in `labels`."""
    probs, labels = _as_arrays(probs, labels)
    preds = probs.argmax(1)
    recalls = [(preds[labels == c] == c).mean() for c in np.unique(labels)]
    return float(np.mean(recalls)) if recalls else float("nan")


def _counts_at_thresholds(scores, targets):
    """Sort by score, descending; for each distinct score (ties move together) the number of
    true and of all positive calls when everything scoring >= it is called positive."""
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets).astype(bool)
    order = np.argsort(-scores, kind="mergesort")
    scores, targets = scores[order], targets[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tps = np.cumsum(targets)[last_of_run]
    return tps, last_of_run + 1, targets.sum(), scores[last_of_run]


def roc_curve(scores, targets) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, thresholds), thresholds descending; a sample
    is called positive when score >= threshold. Starts at (0, 0) with threshold +inf."""
    tps, predicted, n_pos, thresholds = _counts_at_thresholds(scores, targets)
    fps = predicted - tps
    n_neg = np.asarray(targets).size - n_pos
    tpr = np.r_[0.0, tps / n_pos] if n_pos else np.full(tps.size + 1, np.nan)
    fpr = np.r_[0.0, fps / n_neg] if n_neg else np.full(fps.size + 1, np.nan)
    return fpr, tpr, np.r_[np.inf, thresholds]


def precision_recall_curve(scores, targets) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds) with thresholds descending, one point per distinct score."""
    tps, predicted, n_pos, thresholds = _counts_at_thresholds(scores, targets)
    precision = tps / predicted
    recall = tps / n_pos if n_pos else np.full(tps.size, np.nan)
    return precision, recall, thresholds


def binary_auroc(scores, targets) -> float:
    targets = np.asarray(targets).astype(bool)
    if targets.all() or not targets.any():
        return float("nan")  # undefined with one class only
    fpr, tpr, _ = roc_curve(scores, targets)
    return float(np.trapezoid(tpr, fpr))


def macro_auroc(probs, labels) -> float:
    """Mean one-versus-rest AUROC over the classes whose AUROC is defined (the class occurs in
    ``labels`` and is not the only one). torchmetrics' macro average would count a class absent
    from the labels as 0; here it is left out, as it has no AUROC."""
    probs, labels = _as_arrays(probs, labels)
    per_class = [binary_auroc(probs[:, c], labels == c) for c in range(probs.shape[1])]
    defined = [a for a in per_class if not np.isnan(a)]
    return float(np.mean(defined)) if defined else float("nan")


def binary_average_precision(scores, targets) -> float:
    """Step-wise area under the precision-recall curve: sum over thresholds of
    (R_k - R_{k-1}) * P_k (no interpolation)."""
    targets = np.asarray(targets).astype(bool)
    if not targets.any():
        return float("nan")
    precision, recall, _ = precision_recall_curve(scores, targets)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def outcome_masks(called, truth) -> dict[str, np.ndarray]:
    """Melanoma-versus-rest outcomes: boolean masks TP, TN, FP, FN of the cases called melanoma
    (`called`) against the melanomas (`truth`). The one place outcome groups are defined."""
    called, truth = np.asarray(called).astype(bool), np.asarray(truth).astype(bool)
    return {"TP": called & truth, "TN": ~called & ~truth, "FP": called & ~truth, "FN": ~called & truth}


def rates(tp, fn, tn, fp) -> tuple[float, float]:
    """(sensitivity, specificity) from outcome counts; nan where undefined."""
    return _safe_div(tp, tp + fn), _safe_div(tn, tn + fp)


def melanoma_rates(confusion, positive_index: int) -> tuple[float, float]:
    """(sensitivity, specificity) of melanoma vs rest from a (true, predicted) confusion matrix."""
    cm = np.asarray(confusion.cpu() if hasattr(confusion, "cpu") else confusion, dtype=np.float64)
    tp = cm[positive_index, positive_index]
    fn = cm[positive_index].sum() - tp
    fp = cm[:, positive_index].sum() - tp
    return rates(tp, fn, cm.sum() - tp - fn - fp, fp)


def sensitivity_specificity(predicted_positive, targets) -> tuple[float, float]:
    counts = {k: int(v.sum()) for k, v in outcome_masks(predicted_positive, targets).items()}
    return rates(counts["TP"], counts["FN"], counts["TN"], counts["FP"])


def expected_calibration_error(probs, labels, n_bins: int = ECE_BINS) -> float:
    """Top-label ECE with `n_bins` equal-width bins [k/n, (k+1)/n); a confidence of exactly
    1.0 gets a bin of its own (the binning torchmetrics uses, so the two agree)."""
    probs, labels = _as_arrays(probs, labels)
    if labels.size == 0:
        return float("nan")
    confidence = probs.max(1)
    correct = (probs.argmax(1) == labels).astype(np.float64)
    bins = np.searchsorted(np.linspace(0.0, 1.0, n_bins + 1), confidence, side="right") - 1
    count = np.bincount(bins, minlength=n_bins + 1)
    conf_sum = np.bincount(bins, weights=confidence, minlength=n_bins + 1)
    acc_sum = np.bincount(bins, weights=correct, minlength=n_bins + 1)
    filled = count > 0
    gap = np.abs(acc_sum[filled] - conf_sum[filled]) / count[filled]
    return float(np.sum(gap * count[filled]) / labels.size)


def _ece_bins(values, n_bins: int) -> np.ndarray:
    """Equal-width bins [k/n, (k+1)/n); a value of exactly 1.0 gets bin n of its own."""
    return np.searchsorted(np.linspace(0.0, 1.0, n_bins + 1), values, side="right") - 1


def melanoma_calibration_error(p_melanoma, is_melanoma, n_bins: int = ECE_BINS) -> float:
    """Mean |melanoma frequency - mean p_melanoma| over equal-width bins of p_melanoma,
    weighted by bin size (the ECE of the melanoma class)."""
    p = np.asarray(p_melanoma, dtype=np.float64)
    y = np.asarray(is_melanoma).astype(np.float64)
    if p.size == 0:
        return float("nan")
    bins = _ece_bins(p, n_bins)
    gap = np.bincount(bins, weights=y - p, minlength=n_bins + 1)
    return float(np.abs(gap).sum() / p.size)


def negative_log_likelihood(probs, labels) -> float:
    probs, labels = _as_arrays(probs, labels)
    picked = np.clip(probs[np.arange(labels.size), labels], 1e-12, 1.0)
    return float(-np.log(picked).mean())


def classification_metrics(
    probs, labels, positive_index: int | None, threshold: float | None = None
) -> dict[str, float]:
    """All report metrics for one set of predictions.

    probs: (N, C) class probabilities; labels: (N,) class indices; positive_index: the melanoma
    column (None: only the class-agnostic metrics); threshold: melanoma probability at or above
    which a case is called melanoma (the operating point), adds *_at_threshold entries.
    """
    probs, labels = _as_arrays(probs, labels)
    out = {
        "n": int(labels.size),
        "accuracy": accuracy(probs, labels),
        "balanced_accuracy": balanced_accuracy(probs, labels),
        "nll": negative_log_likelihood(probs, labels),
        "ece": expected_calibration_error(probs, labels),
        AUROC_MACRO: macro_auroc(probs, labels),
    }
    if positive_index is None:
        return out
    is_mel = labels == positive_index
    p_mel = probs[:, positive_index]
    out[AUROC] = binary_auroc(p_mel, is_mel)
    out[ECE_MELANOMA] = melanoma_calibration_error(p_mel, is_mel)
    out[AVERAGE_PRECISION] = binary_average_precision(p_mel, is_mel)
    sens, spec = sensitivity_specificity(probs.argmax(1) == positive_index, is_mel)
    out["sensitivity_argmax"], out["specificity_argmax"] = sens, spec
    if threshold is not None:
        sens, spec = sensitivity_specificity(p_mel >= threshold, is_mel)
        out["threshold"] = float(threshold)
        out["sensitivity_at_threshold"], out["specificity_at_threshold"] = sens, spec
    return out
