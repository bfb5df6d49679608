"""Report figures: confusion matrix, confidence per outcome, ROC, precision-recall, reliability.

Each function returns a matplotlib Figure built without pyplot (no global state, no display
needed), so the same objects can be saved as PNG and logged to Weights & Biases.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .metrics import (
    ECE_BINS,
    outcome_masks,
    binary_auroc,
    binary_average_precision,
    expected_calibration_error,
    precision_recall_curve,
    roc_curve,
)

OUTCOMES = ("TP", "TN", "FP", "FN")
#: reliability bins holding fewer images than this are drawn hollow (hatched): little evidence
SPARSE_BIN = 10
#: resamples of the ROC curve's bootstrap band
ROC_BAND_RESAMPLES = 200
ARGMAX_RULE = "argmax (the most probable class)"


def decision_rule(threshold: float | None) -> str:
    """How the figure's cases were called: at the operating point (with its threshold) or argmax."""
    return ARGMAX_RULE if threshold is None else f"operating point: melanoma when p(melanoma) >= {threshold:.4g}"


def legend_below(fig: Figure, ax, ncols: int = 2) -> None:
    """The legend under the axes, where it can hide no data (constrained layout makes room)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=ncols, fontsize=8, frameon=False)


def confusion_counts(labels, preds, num_classes: int) -> np.ndarray:
    """(C, C) counts, rows = true class, columns = predicted class."""
    return np.bincount(
        np.asarray(labels) * num_classes + np.asarray(preds), minlength=num_classes * num_classes
    ).reshape(num_classes, num_classes)


def confusion_matrix_figure(labels, preds, class_names, rule: str = ARGMAX_RULE) -> Figure:
    """Counts and row shares; ``rule`` says how ``preds`` were called (shown as the title)."""
    counts = confusion_counts(labels, preds, len(class_names))
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    size = max(4.0, 0.7 * len(class_names) + 2)
    fig = Figure(figsize=(2 * size, size), layout="constrained")
    for ax, values, title, fmt in zip(
        fig.subplots(1, 2), (counts, shares), ("counts", "share of each true class (row)"), ("{:d}", "{:.2f}")
    ):
        ax.imshow(values if values.dtype.kind == "f" else values / max(values.max(), 1), cmap="Blues", vmin=0, vmax=1)
        for i in range(len(class_names)):
            for j in range(len(class_names)):
                v = values[i, j]
                dark = (v if values.dtype.kind == "f" else v / max(values.max(), 1)) > 0.5
                ax.text(j, i, fmt.format(v), ha="center", va="center", color="white" if dark else "black")
        ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
        ax.set_yticks(range(len(class_names)), class_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
    fig.suptitle(f"decision: {rule}", fontsize=10)
    return fig


def outcome_groups(probs, labels, positive_index: int, threshold: float | None = None) -> dict[str, np.ndarray]:
    """Indices of TP/TN/FP/FN for melanoma-versus-rest: called melanoma at `threshold` on the
    melanoma probability, or at argmax when no threshold is given."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    called = probs[:, positive_index] >= threshold if threshold is not None else probs.argmax(1) == positive_index
    return {k: np.flatnonzero(m) for k, m in outcome_masks(called, labels == positive_index).items()}


def confidence_figure(probs, labels, positive_index: int, threshold: float | None = None) -> Figure:
    """How sure the model was in each outcome: the melanoma probability of every case, grouped
    into TP/TN/FP/FN. Confident false positives and negatives show up at once."""
    probs = np.asarray(probs)
    groups = outcome_groups(probs, labels, positive_index, threshold)
    p_mel = probs[:, positive_index]
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    rng = np.random.default_rng(0)
    for k, name in enumerate(OUTCOMES):
        values = p_mel[groups[name]]
        if values.size:
            ax.boxplot([values], positions=[k], widths=0.5, showfliers=False)
            ax.scatter(k + rng.uniform(-0.18, 0.18, values.size), values, s=8, alpha=0.5)
    ax.set_xticks(range(4), [f"{n}\n(n={groups[n].size})" for n in OUTCOMES])
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("melanoma probability")
    if threshold is not None:
        ax.axhline(threshold, color="tab:red", ls="--", lw=1, label=f"operating point threshold {threshold:.4g}")
        legend_below(fig, ax)
    ax.set_title(f"melanoma probability per outcome\ndecision: {decision_rule(threshold)}", fontsize=10)
    return fig


def roc_band(p_mel, is_mel, groups=None, n_resamples: int = ROC_BAND_RESAMPLES, seed: int = 0,
             level: float = 0.95, grid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false-positive-rate grid, lower, upper): a percentile bootstrap band of sensitivity at
    each false-positive rate, resampling images (or whole groups: lesions, patients)."""
    from .bootstrap import _draw_counts, _group_codes

    p = np.asarray(p_mel, dtype=np.float64)
    y = np.asarray(is_mel).astype(bool)
    grid = np.linspace(0, 1, 101) if grid is None else np.asarray(grid)
    codes = None if groups is None else _group_codes(groups, p.size)
    n_units = p.size if codes is None else int(codes.max()) + 1
    order = np.argsort(-p, kind="stable")
    last_of_tie = np.r_[np.diff(p[order]) != 0, True]  # one ROC point per distinct threshold
    counts = _draw_counts(np.random.default_rng(seed), n_units, int(n_resamples))
    weights = (counts if codes is None else counts[:, codes])[:, order].astype(np.float64)
    tp = np.cumsum(weights * y[order], axis=1)[:, last_of_tie]
    fp = np.cumsum(weights * ~y[order], axis=1)[:, last_of_tie]
    curves = []
    for t, f in zip(tp, fp):
        if t[-1] > 0 and f[-1] > 0:  # a resample without melanomas (or without others) has no ROC
            curves.append(np.interp(grid, np.r_[0.0, f / f[-1]], np.r_[0.0, t / t[-1]]))
    if not curves:
        return grid, np.full_like(grid, np.nan), np.full_like(grid, np.nan)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(np.stack(curves), [alpha, 1 - alpha], axis=0)
    return grid, lo, hi


def _at_threshold(p_mel, is_mel, threshold: float) -> dict[str, float]:
    called = np.asarray(p_mel) >= threshold
    truth = np.asarray(is_mel).astype(bool)
    return {"sensitivity": (called & truth).sum() / max(truth.sum(), 1),
            "fpr": (called & ~truth).sum() / max((~truth).sum(), 1),
            "precision": (called & truth).sum() / called.sum() if called.any() else float("nan")}


def roc_figure(p_mel, is_mel, operating_threshold: float | None = None, groups=None) -> Figure:
    fpr, tpr, thresholds = roc_curve(p_mel, is_mel)
    fig = Figure(figsize=(4.8, 5.2), layout="constrained")
    ax = fig.subplots()
    grid, lo, hi = roc_band(p_mel, is_mel, groups)
    unit = "lesions/patients" if groups is not None else "images"
    ax.fill_between(grid, lo, hi, color="tab:blue", alpha=0.2, lw=0,
                    label=f"95% bootstrap band ({ROC_BAND_RESAMPLES} resamples of {unit})")
    ax.plot(fpr, tpr, lw=2, label=f"AUROC {binary_auroc(p_mel, is_mel):.3f}")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="chance")
    if operating_threshold is not None:
        pt = _at_threshold(p_mel, is_mel, operating_threshold)
        ax.scatter([pt["fpr"]], [pt["sensitivity"]], color="tab:red", zorder=5, clip_on=False,
                   label=f"operating point p >= {operating_threshold:.4g} (sens {pt['sensitivity']:.2f}, "
                         f"spec {1 - pt['fpr']:.2f})")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title("ROC, melanoma vs rest\n(every threshold; the dot: "
                 + ("the operating point)" if operating_threshold is not None else "none stored)"), fontsize=10)
    legend_below(fig, ax, ncols=1)
    return fig


def pr_figure(p_mel, is_mel, operating_threshold: float | None = None) -> Figure:
    precision, recall, _ = precision_recall_curve(p_mel, is_mel)
    fig = Figure(figsize=(4.8, 5.2), layout="constrained")
    ax = fig.subplots()
    ax.step(np.r_[0.0, recall], np.r_[precision[0] if precision.size else 1.0, precision], where="post", lw=2,
            label=f"AP {binary_average_precision(p_mel, is_mel):.3f}")
    prevalence = np.mean(np.asarray(is_mel).astype(bool))
    ax.axhline(prevalence, color="grey", ls=":", lw=1, label=f"prevalence {prevalence:.2f} (chance)")
    if operating_threshold is not None:
        pt = _at_threshold(p_mel, is_mel, operating_threshold)
        ax.scatter([pt["sensitivity"]], [pt["precision"]], color="tab:red", zorder=5, clip_on=False,
                   label=f"operating point p >= {operating_threshold:.4g} (recall {pt['sensitivity']:.2f}, "
                         f"precision {pt['precision']:.2f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision")
    ax.set_title("precision-recall, melanoma vs rest\n(every threshold; the dot: "
                 + ("the operating point)" if operating_threshold is not None else "none stored)"), fontsize=10)
    legend_below(fig, ax, ncols=1)
    return fig


def reliability_bins(probs, labels, n_bins: int = ECE_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bin centres, accuracy per bin, count per bin) of top-label confidence; NaN accuracy where empty."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    bins = np.clip(np.searchsorted(np.linspace(0, 1, n_bins + 1), conf, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    acc = np.bincount(bins, weights=correct, minlength=n_bins) / np.where(count > 0, count, np.nan)
    return (np.arange(n_bins) + 0.5) / n_bins, acc, count


def wilson_interval(successes, n, z: float = 1.96) -> tuple[np.ndarray, np.ndarray]:
    """95% Wilson score interval of a proportion (NaN where n is 0)."""
    k, n = np.asarray(successes, dtype=np.float64), np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def reliability_x_range(probs, n_bins: int = ECE_BINS) -> tuple[float, float]:
    """The confidences that occur: from the lower edge of the lowest filled bin (top-label
    confidence is at least 1 / classes) to 1."""
    conf = np.asarray(probs).max(1)
    edges = np.linspace(0, 1, n_bins + 1)
    low = edges[np.clip(np.searchsorted(edges, conf.min(), side="right") - 1, 0, n_bins - 1)] if conf.size else 0.0
    return float(low), 1.0


def reliability_figure(probs_by_name: dict[str, np.ndarray], labels, n_bins: int = ECE_BINS) -> Figure:
    """Accuracy against confidence, one panel per set of probabilities (e.g. before and after
    calibration), over the confidences that occur; each bar with its image count and a 95%
    Wilson interval, bins of fewer than SPARSE_BIN images hollow; the ECE in each title."""
    fig = Figure(figsize=(4.4 * len(probs_by_name), 4.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(probs_by_name)))
    labels = np.asarray(labels)
    low = min(reliability_x_range(p, n_bins)[0] for p in probs_by_name.values())
    for ax, (name, probs) in zip(axes, probs_by_name.items()):
        centres, acc, count = reliability_bins(probs, labels, n_bins)
        full, sparse = count >= SPARSE_BIN, (count > 0) & (count < SPARSE_BIN)
        ax.bar(centres[full], acc[full], width=1 / n_bins, edgecolor="black", color="tab:blue", alpha=0.75,
               label=f"accuracy (bin of >= {SPARSE_BIN} images)")
        ax.bar(centres[sparse], acc[sparse], width=1 / n_bins, edgecolor="tab:blue", fill=False, hatch="///",
               ls="--", label=f"accuracy (bin of < {SPARSE_BIN} images: little evidence)")
        filled = count > 0
        lo, hi = wilson_interval(np.round(acc[filled] * count[filled]), count[filled])
        ax.errorbar(centres[filled], acc[filled], yerr=np.clip([acc[filled] - lo, hi - acc[filled]], 0, None), fmt="none",
                    ecolor="black", elinewidth=0.8, capsize=2, label="95% interval (Wilson)")
        for x, n in zip(centres[filled], count[filled]):  # how much evidence each bar has
            ax.text(x, 0.01, str(int(n)), ha="center", va="bottom", fontsize=6, rotation=90, color="black")
        ax.plot([low, 1], [low, 1], color="black", ls=":", lw=1.2, zorder=4, label="perfect calibration")
        ax.set_xlim(low, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("confidence of the most probable class (argmax)")
        ax.set_ylabel("accuracy (counts at the foot of the bars)")
        ax.set_title(f"{name}: ECE {expected_calibration_error(probs, labels, n_bins):.3f}", fontsize=10)
    legend_below(fig, axes[0], ncols=2 if len(axes) > 1 else 1)
    fig.suptitle("reliability; decision: " + ARGMAX_RULE, fontsize=10)
    return fig


def operating_points_figure(points: dict[str, dict]) -> Figure:
    """One panel per operating point (name -> {"threshold", "sensitivity", "specificity",
    "ci95": {"sensitivity": [lo, hi], "specificity": [lo, hi]}}), side by side on one scale:
    sensitivity and specificity bars with their 95% intervals."""
    fig = Figure(figsize=(3.6 * len(points), 3.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(points), sharey=True))
    for ax, (name, pt) in zip(axes, points.items()):
        values = [pt["sensitivity"], pt["specificity"]]
        cis = [pt["ci95"]["sensitivity"], pt["ci95"]["specificity"]]
        err = np.array([[v - lo for v, (lo, _) in zip(values, cis)], [hi - v for v, (_, hi) in zip(values, cis)]])
        ax.bar([0, 1], values, yerr=np.nan_to_num(np.clip(err, 0, None)), capsize=6,
               color=["tab:red", "tab:blue"], alpha=0.75)
        for x, v in zip([0, 1], values):
            ax.text(x, min(v, 0.93) + 0.03, f"{v:.2f}", ha="center", fontsize=9)
        ax.set_xticks([0, 1], ["sensitivity", "specificity"])
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{name}\nthreshold {pt['threshold']:.3g}", fontsize=9)
    axes[0].set_ylabel("on the test part (95% bootstrap CI)")
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 110) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def report_figures(
    probs, labels, class_names, positive_index: int | None, threshold: float | None = None,
    uncalibrated_probs=None, groups=None,
) -> dict[str, Figure]:
    """All report figures by file stem. probs: the (calibrated) probabilities the model reports.
    Each figure says its decision rule: with a threshold, a two-class confusion matrix is drawn
    at the operating point (the decision users get); with more classes it stays at argmax and a
    melanoma-vs-rest matrix at the operating point is added. groups: lesion/patient ids for
    the ROC band's bootstrap."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    at_operating_point = positive_index is not None and threshold is not None
    if at_operating_point and len(class_names) == 2:
        preds = np.where(probs[:, positive_index] >= threshold, positive_index, 1 - positive_index)
        figs = {"confusion_matrix": confusion_matrix_figure(labels, preds, class_names, decision_rule(threshold))}
    else:
        figs = {"confusion_matrix": confusion_matrix_figure(labels, probs.argmax(1), class_names)}
        if at_operating_point:
            p_mel, is_mel = probs[:, positive_index], labels == positive_index
            figs["confusion_operating_point"] = confusion_matrix_figure(
                is_mel.astype(int), (p_mel >= threshold).astype(int),
                ["rest", class_names[positive_index]], decision_rule(threshold))
    if positive_index is not None:
        p_mel, is_mel = probs[:, positive_index], labels == positive_index
        figs["confidence"] = confidence_figure(probs, labels, positive_index, threshold)
        figs["roc"] = roc_figure(p_mel, is_mel, threshold, groups)
        figs["precision_recall"] = pr_figure(p_mel, is_mel, threshold)
    panels = {"after calibration": probs}
    if uncalibrated_probs is not None:
        panels = {"before calibration": np.asarray(uncalibrated_probs), **panels}
    figs["reliability"] = reliability_figure(panels, labels)
    return figs
