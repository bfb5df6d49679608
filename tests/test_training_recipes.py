"""Fine-tuning recipes (conf/recipe/*) and what combines with them: EMA of the weights,
mixup/cutmix with a soft-target loss, drop path."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from melanoma.models.classifier import Classifier
from melanoma.train import run
from melanoma.training.module import LesionClassifier
from training_fixtures import CONF_DIR, compose_cfg, tiny_dermmel, tiny_overrides  # noqa: F401

BACKBONE = {"name": "vit_tiny", "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32,
                                           "depth": 2, "num_heads": 2, "drop_path_rate": 0.0}}
CLASSES = ["not_melanoma", "melanoma"]
MIXUP = {"mixup_alpha": 1.0, "cutmix_alpha": 0.0, "prob": 1.0, "switch_prob": 0.5, "mode": "batch"}


# --- mixup / cutmix ---------------------------------------------------------------------------

def test_mixup_loss_takes_soft_targets_and_metrics_take_hard_labels(monkeypatch):
    from timm.data import Mixup

    torch.manual_seed(0)
    module = LesionClassifier(BACKBONE, "dermmel", CLASSES, mixup=MIXUP,
                              loss={"label_smoothing": 0.1, "class_weights": False})
    module.train()
    seen = []
    monkeypatch.setattr(module.metrics["train_metrics"], "update", lambda probs, y: seen.append(y.clone()))
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 0, 1, 1])  # mirrors differ
    np.random.seed(3)
    loss = module.training_step((x.clone(), y), 0)
    # the same draw by hand: timm's Mixup with the run's label smoothing gives soft targets
    np.random.seed(3)
    mixed, target = Mixup(**MIXUP, label_smoothing=0.1, num_classes=2)(x.clone(), y)
    assert ((target > 0.06) & (target < 0.94)).any()  # really soft, not one-hot
    expected = -(target * F.log_softmax(module(mixed).float(), -1)).sum(-1).mean()
    torch.testing.assert_close(loss, expected)
    assert len(seen) == 1 and torch.equal(seen[0], y)  # hard labels to the metrics


def test_soft_loss_with_class_weights_reduces_to_weighted_cross_entropy():
    module = LesionClassifier(BACKBONE, "dermmel", CLASSES, mixup=MIXUP,
                              loss={"label_smoothing": 0.0, "class_weights": True})
    module.class_weight = torch.tensor([1.0, 4.0])
    logits, y = torch.randn(6, 2), torch.tensor([0, 1, 1, 0, 0, 1])
    one_hot = F.one_hot(y, 2).float()
    torch.testing.assert_close(module._soft_loss(logits, one_hot),
                               F.cross_entropy(logits, y, weight=module.class_weight))


def test_mixup_off_by_default_and_odd_batches_fall_back_to_hard_labels(monkeypatch):
    assert LesionClassifier(BACKBONE, "dermmel", CLASSES).mixup is None
    module = LesionClassifier(BACKBONE, "dermmel", CLASSES, mixup=MIXUP,
                              loss={"label_smoothing": 0.0, "class_weights": False})
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 1])
    loss = module.training_step((x, y), 0)
    torch.testing.assert_close(loss, F.cross_entropy(module(x).float(), y))
