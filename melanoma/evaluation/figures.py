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


def confusion_counts(labels, preds, num_classes: int) -> np.ndarray:
    """(C, C) counts, rows = true class, columns = predicted class."""
    return np.bincount(
        np.asarray(labels) * num_classes + np.asarray(preds), minlength=num_classes * num_classes
    ).reshape(num_classes, num_classes)


def confusion_matrix_figure(labels, preds, class_names) -> Figure:
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
        ax.axhline(threshold, color="grey", ls="--", lw=1, label=f"operating point {threshold:.3f}")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_title("confidence per outcome (" + ("at operating point" if threshold is not None else "at argmax") + ")")
    return fig


def roc_figure(p_mel, is_mel, operating_threshold: float | None = None) -> Figure:
    fpr, tpr, thresholds = roc_curve(p_mel, is_mel)
    fig = Figure(figsize=(4.5, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.plot(fpr, tpr, lw=2, label=f"AUROC {binary_auroc(p_mel, is_mel):.3f}")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    if operating_threshold is not None:
        called = np.asarray(p_mel) >= operating_threshold
        truth = np.asarray(is_mel).astype(bool)
        sens = (called & truth).sum() / max(truth.sum(), 1)
        fp_rate = (called & ~truth).sum() / max((~truth).sum(), 1)
        ax.scatter([fp_rate], [sens], color="red", zorder=3, label=f"operating point (sens {sens:.2f})")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("ROC, melanoma vs rest")
    ax.legend(loc="lower right")
    return fig


def pr_figure(p_mel, is_mel) -> Figure:
    precision, recall, _ = precision_recall_curve(p_mel, is_mel)
    fig = Figure(figsize=(4.5, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.step(np.r_[0.0, recall], np.r_[precision[0] if precision.size else 1.0, precision], where="post", lw=2,
            label=f"AP {binary_average_precision(p_mel, is_mel):.3f}")
    prevalence = np.mean(np.asarray(is_mel).astype(bool))
    ax.axhline(prevalence, color="grey", ls=":", lw=1, label=f"prevalence {prevalence:.2f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision")
    ax.set_title("precision-recall, melanoma vs rest")
    ax.legend(loc="lower left")
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


def reliability_figure(probs_by_name: dict[str, np.ndarray], labels, n_bins: int = ECE_BINS) -> Figure:
    """Accuracy against confidence, one panel per set of probabilities (e.g. before and after
    calibration); the image count above each bar, the ECE in each title."""
    fig = Figure(figsize=(4.2 * len(probs_by_name), 4.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(probs_by_name)))
    for ax, (name, probs) in zip(axes, probs_by_name.items()):
        centres, acc, count = reliability_bins(probs, labels, n_bins)
        filled = count > 0
        ax.bar(centres[filled], acc[filled], width=1 / n_bins, edgecolor="black", alpha=0.7, label="accuracy")
        for x, a, n in zip(centres[filled], acc[filled], count[filled]):  # how much evidence each bar has
            ax.text(x, min(a, 0.9) + 0.02, str(int(n)), ha="center", va="bottom", fontsize=6, rotation=90)
        ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top class)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name}: ECE {expected_calibration_error(probs, labels, n_bins):.3f}")
        ax.legend(loc="upper left", fontsize=8)
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
    uncalibrated_probs=None,
) -> dict[str, Figure]:
    """All report figures by file stem. probs: the (calibrated) probabilities the model reports."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    figs = {"confusion_matrix": confusion_matrix_figure(labels, probs.argmax(1), class_names)}
    if positive_index is not None:
        p_mel, is_mel = probs[:, positive_index], labels == positive_index
        figs["confidence"] = confidence_figure(probs, labels, positive_index, threshold)
        figs["roc"] = roc_figure(p_mel, is_mel, threshold)
        figs["precision_recall"] = pr_figure(p_mel, is_mel)
    panels = {"after calibration": probs}
    if uncalibrated_probs is not None:
        panels = {"before calibration": np.asarray(uncalibrated_probs), **panels}
    figs["reliability"] = reliability_figure(panels, labels)
    return figs
