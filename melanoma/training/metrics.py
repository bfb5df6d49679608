"""The metrics the LightningModule logs per stage (``<stage>/<key>``), as torchmetrics objects so
their states sync across DDP ranks.

``auroc``, ``average_precision``, ``auroc_macro`` and ``bal_acc`` mean what they mean in the
evaluation report (``melanoma.evaluation.metrics``): melanoma-versus-rest, the macro
one-versus-rest average over the classes the labels contain, and the mean recall over the
classes the labels contain (a class absent from the split is skipped, not counted as recall 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryAUROC,
    BinaryAveragePrecision,
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassF1Score,
    MulticlassRecall,
)
from torchmetrics.utilities.data import dim_zero_cat

from melanoma.evaluation.metrics import AUROC, AUROC_MACRO, AVERAGE_PRECISION
from melanoma.conventions import positive_index

__all__ = ["BalancedAccuracy", "MacroAUROC", "PositiveClassAP", "PositiveClassAUROC", "TRAIN_LOSS_EPOCH", "TRAIN_LOSS_STEP", "stage_metrics"]

#: the training loss as logged: per written step, and the mean over the epoch's images
TRAIN_LOSS_STEP = "train/loss_step"
TRAIN_LOSS_EPOCH = "train/loss_epoch"


def _nan(like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(float("nan"), device=like.device)


class _OneVsRest:
    """A binary torchmetrics metric of one class against the rest, updated with (N, C)
    probabilities and class labels."""

    def __init__(self, positive: int, **kwargs):
        super().__init__(**kwargs)
        self.positive = int(positive)

    def update(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        super().update(probs[:, self.positive], (labels == self.positive).long())


class PositiveClassAUROC(_OneVsRest, BinaryAUROC):
    """AUROC of one class against the rest. NaN when the labels hold only one side (torchmetrics
    would return 0 with a warning)."""

    def compute(self) -> torch.Tensor:
        target = dim_zero_cat(self.target)
        if target.numel() == 0 or bool(target.all()) or not bool(target.any()):
            return _nan(target)
        return super().compute()


class PositiveClassAP(_OneVsRest, BinaryAveragePrecision):
    """Average precision of one class against the rest (the step-wise area of the report's
    ``binary_average_precision``); NaN without positives."""

    def compute(self) -> torch.Tensor:
        target = dim_zero_cat(self.target)
        if target.numel() == 0 or not bool(target.any()):
            return _nan(target)
        return super().compute()


class BalancedAccuracy(MulticlassRecall):
    """Mean recall over the classes present in the labels, as the report's balanced_accuracy;
    torchmetrics' ``average="macro"`` counts an absent class as recall 0."""

    def __init__(self, num_classes: int, **kwargs):
        super().__init__(num_classes, average=None, **kwargs)

    def compute(self) -> torch.Tensor:
        per_class = super().compute()
        present = (self.tp + self.fn) > 0
        return per_class[present].mean() if bool(present.any()) else _nan(per_class)


class MacroAUROC(MulticlassAUROC):
    """Mean one-versus-rest AUROC over the classes whose AUROC is defined (present in the labels
    and not the only one present); torchmetrics' ``average="macro"`` counts an absent class as 0."""

    def __init__(self, num_classes: int, **kwargs):
        super().__init__(num_classes, average=None, **kwargs)

    def compute(self) -> torch.Tensor:
        per_class = super().compute()
        target = dim_zero_cat(self.target)
        counts = torch.bincount(target.long(), minlength=self.num_classes)
        defined = (counts > 0) & (counts < target.numel())
        return per_class[defined].mean() if bool(defined.any()) else _nan(per_class)


def stage_metrics(class_names: Sequence[str]) -> MetricCollection:
    """One stage's metrics, updated with (probabilities (N, C), labels (N,)). ``auroc`` exists
    only when a class is melanoma (``positive_index``)."""
    num_classes = len(class_names)
    metrics = {
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "bal_acc": BalancedAccuracy(num_classes),
        AUROC_MACRO: MacroAUROC(num_classes),
        "f1": MulticlassF1Score(num_classes, average="macro"),
    }
    pos = positive_index(class_names)
    if pos is not None:
        metrics[AUROC] = PositiveClassAUROC(pos)
        metrics[AVERAGE_PRECISION] = PositiveClassAP(pos)
    return MetricCollection(metrics)
