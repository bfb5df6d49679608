"""What the training module logs: one meaning per metric key."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from melanoma.data.ph2 import CLASSES_3
from melanoma.training.metrics import stage_metrics


def test_auroc_is_melanoma_vs_rest_and_auroc_macro_is_macro_ovr_on_ph2_3class():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, 120)
    logits = rng.normal(size=(120, 3)) + 1.2 * np.eye(3)[labels]
    probs = torch.tensor(logits).softmax(-1).float()
    metrics = stage_metrics(CLASSES_3)
    # split over two updates, as batches arrive
    metrics.update(probs[:50], torch.tensor(labels[:50]))
    metrics.update(probs[50:], torch.tensor(labels[50:]))
    got = {k: float(v) for k, v in metrics.compute().items()}
    mel = CLASSES_3.index("melanoma")
    p = probs.double().numpy()
    assert got["auroc"] == pytest.approx(roc_auc_score(labels == mel, p[:, mel]), abs=1e-6)
    assert got["auroc_macro"] == pytest.approx(roc_auc_score(labels, p, multi_class="ovr", average="macro"),
                                               abs=1e-6)
    assert abs(got["auroc"] - got["auroc_macro"]) > 1e-3  # the two keys really differ here
    assert got["acc"] == pytest.approx(float(np.mean(p.argmax(1) == labels)), abs=1e-6)


def test_auroc_macro_skips_a_class_absent_from_the_labels_and_auroc_needs_both():
    # torchmetrics' own macro average would count the absent class as 0 (giving 2/3 here)
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.3, 0.6], [0.6, 0.2, 0.2], [0.2, 0.7, 0.1]])
    metrics = stage_metrics(CLASSES_3)
    metrics.update(probs, torch.tensor([0, 1, 0, 1]))
    got = metrics.compute()
    assert float(got["auroc_macro"]) == pytest.approx(1.0)
    assert math.isnan(float(got["auroc"]))  # no melanoma among the labels: undefined, not 0
    assert "auroc" not in stage_metrics(["nevus", "bcc"])  # no melanoma class: no auroc key
