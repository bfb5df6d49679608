"""Test-time figures logged by the training run: confusion matrix and melanoma confidence per
outcome (TP/TN/FP/FN). The full calibrated report is melanoma.evaluation's job."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["test_figures"]


def test_figures(confmat: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor,
                 class_names: Sequence[str], positive_index: int | None) -> dict:
    """Return ``{"confusion_matrix": fig, "confidence": fig}`` (matplotlib figures)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    figures = {}
    cm = confmat.numpy()
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * n, 1.0 + 0.8 * n))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_title("test confusion matrix")
    fig.tight_layout()
    figures["confusion_matrix"] = fig

    preds = probs.argmax(-1)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    bins = [i / 20 for i in range(21)]
    if positive_index is not None:
        score = probs[:, positive_index]
        is_pos, said_pos = labels == positive_index, preds == positive_index
        groups = {"TP": is_pos & said_pos, "FN": is_pos & ~said_pos,
                  "TN": ~is_pos & ~said_pos, "FP": ~is_pos & said_pos}
        ax.set_xlabel("P(melanoma)")
    else:
        score = probs.max(-1).values
        groups = {"correct": preds == labels, "wrong": preds != labels}
        ax.set_xlabel("confidence of the predicted class")
    for name, mask in groups.items():
        if mask.any():
            ax.hist(score[mask].numpy(), bins=bins, alpha=0.6, label=f"{name} ({int(mask.sum())})")
    ax.set_ylabel("images")
    ax.legend()
    ax.set_title("test confidence by outcome")
    fig.tight_layout()
    figures["confidence"] = fig
    return figures
