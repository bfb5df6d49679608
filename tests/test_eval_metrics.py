"""The report's metrics, calibration, operating point and TTA against independent references."""

import numpy as np
import pytest
import torch
import torchmetrics.functional.classification as tmf

from melanoma.evaluation import metrics as M
from melanoma.evaluation.calibration import fit_temperature, nll
from melanoma.models.checkpoint import softmax
from melanoma.evaluation.operating_point import threshold_for_sensitivity
from melanoma.predict.tta import DIHEDRAL_VIEWS, dihedral_view, tta_logits


def _random_predictions(n=300, c=3, seed=0, decimals=2):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[labels]
    probs = softmax(logits)
    if decimals is not None:
        # rounding creates ties, which is where ROC/PR implementations usually disagree
        probs = np.round(probs, decimals)
        probs = probs / probs.sum(1, keepdims=True)
    return probs, labels


@pytest.mark.parametrize("c,pos", [(2, 1), (3, 2), (7, 4)])
def test_metrics_equal_torchmetrics(c, pos):
    probs, labels = _random_predictions(c=c, seed=c)
    got = M.classification_metrics(probs, labels, positive_index=pos, threshold=0.3)
    p, y = torch.tensor(probs), torch.tensor(labels)
    is_mel = (y == pos).long()
    p_mel = p[:, pos]
    assert got["accuracy"] == pytest.approx(float(tmf.multiclass_accuracy(p, y, c, average="micro")), abs=1e-7)
    assert got["balanced_accuracy"] == pytest.approx(float(tmf.multiclass_accuracy(p, y, c, average="macro")), abs=1e-7)
    assert got["auroc"] == pytest.approx(float(tmf.binary_auroc(p_mel, is_mel)), abs=1e-6)
    assert got["average_precision"] == pytest.approx(float(tmf.binary_average_precision(p_mel, is_mel)), abs=1e-6)
    # torchmetrics bins float32 confidences, so rounded values that sit exactly on a bin edge
    # (0.2 = 3/15) may land either side; compare ECE on unrounded probabilities
    raw, raw_labels = _random_predictions(c=c, seed=c, decimals=None)
    assert M.expected_calibration_error(raw, raw_labels) == pytest.approx(
        float(tmf.multiclass_calibration_error(torch.tensor(raw), torch.tensor(raw_labels), c, n_bins=15)), abs=1e-6
    )
    pred_mel = (p.argmax(1) == pos).long()
    assert got["sensitivity_argmax"] == pytest.approx(float(tmf.binary_recall(pred_mel, is_mel)), abs=1e-7)
    assert got["specificity_argmax"] == pytest.approx(float(tmf.binary_specificity(pred_mel, is_mel)), abs=1e-7)
    thr = (p_mel >= 0.3).long()
    assert got["sensitivity_at_threshold"] == pytest.approx(float(tmf.binary_recall(thr, is_mel)), abs=1e-7)
    assert got["specificity_at_threshold"] == pytest.approx(float(tmf.binary_specificity(thr, is_mel)), abs=1e-7)
    assert got["nll"] == pytest.approx(float(torch.nn.functional.nll_loss(p.clamp_min(1e-12).log(), y)), abs=1e-9)


def test_auroc_and_ap_known_values():
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    targets = [1, 0, 1, 0, 0, 1]
    # pairs (pos, neg) ranked correctly: 0.9 beats 3 negatives, 0.7 beats 2, 0.4 beats none -> 5/9
    assert M.binary_auroc(scores, targets) == pytest.approx(5 / 9)
    # precision at each positive: 1/1, 2/3, 3/6
    assert M.binary_average_precision(scores, targets) == pytest.approx((1 + 2 / 3 + 0.5) / 3)
    assert np.isnan(M.binary_auroc([0.1, 0.2], [1, 1]))


def test_perfect_predictions_are_perfect_and_ece_counts_overconfidence():
    labels = np.array([0, 1, 1, 0])
    probs = np.eye(2)[labels]
    got = M.classification_metrics(probs, labels, positive_index=1, threshold=0.5)
    assert got["accuracy"] == got["balanced_accuracy"] == got["auroc"] == got["average_precision"] == 1.0
    assert got["ece"] == 0.0
    # always 90 % sure, right half the time: ECE = |0.5 - 0.9|
    probs = np.array([[0.9, 0.1]] * 4)
    assert M.expected_calibration_error(probs, labels) == pytest.approx(0.4)


def test_bad_shapes_say_what_was_expected():
    with pytest.raises(ValueError, match=r"labels must be \(N,\)"):
        M.accuracy(np.ones((3, 2)) / 2, [0, 1])
    with pytest.raises(ValueError, match="labels must lie in"):
        M.accuracy(np.ones((2, 2)) / 2, [0, 2])


def test_temperature_scaling_lowers_nll_of_overconfident_model():
    rng = np.random.default_rng(1)
    n, c = 2000, 3
    true_logits = rng.normal(size=(n, c)) * 1.5
    labels = np.array([rng.choice(c, p=p) for p in softmax(true_logits)])
    overconfident = 4.0 * true_logits  # right ranking, far too sure
    before = nll(overconfident, labels)
    t = fit_temperature(overconfident, labels)
    after = nll(overconfident, labels, t)
    assert t == pytest.approx(4.0, rel=0.15)
    assert after < before - 0.3
    # calibration never changes the decision
    assert (softmax(overconfident / t).argmax(1) == overconfident.argmax(1)).all()
    assert M.expected_calibration_error(softmax(overconfident / t), labels) < M.expected_calibration_error(
        softmax(overconfident), labels
    )


def test_temperature_fit_rejects_empty_validation():
    with pytest.raises(ValueError, match="validation split is empty"):
        fit_temperature(np.zeros((0, 2)), np.zeros(0))


def test_operating_point_reaches_target_with_highest_threshold():
    p = np.array([0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.85, 0.05])
    y = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
    op = threshold_for_sensitivity(p, y, target_sensitivity=0.8)
    assert op["threshold"] == 0.3  # the 8th of 10 melanoma scores
    assert op["sensitivity"] == pytest.approx(0.8)
    assert op["specificity"] == pytest.approx(0.5)
    assert threshold_for_sensitivity(p, y, 1.0)["threshold"] == 0.1
    assert threshold_for_sensitivity(p, y, 0.95)["sensitivity"] >= 0.95
    with pytest.raises(ValueError, match="no melanoma"):
        threshold_for_sensitivity(p, np.zeros_like(y), 0.95)


def test_tta_averages_the_eight_dihedral_views():
    assert len(set(DIHEDRAL_VIEWS)) == 8
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    views = {tuple(dihedral_view(x, k, f).flatten().tolist()) for k, f in DIHEDRAL_VIEWS}
    assert len(views) == 8  # all distinct symmetries
    # "logit" = top-left pixel: averaged over the 8 views it is the mean of the 4 corners
    out = tta_logits(lambda v: v[:, :, 0, 0], x)
    assert float(out) == pytest.approx((0 + 3 + 12 + 15) / 4)


def test_auroc_is_melanoma_vs_rest_and_auroc_macro_is_macro_one_vs_rest():
    from sklearn.metrics import roc_auc_score

    # 3 classes as PH2's 3class label set; melanoma (the last column) is the hardest to separate
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 3, 200)
    probs = softmax(rng.normal(size=(200, 3)) + np.eye(3)[labels] * [2.0, 2.0, 0.5])
    got = M.classification_metrics(probs, labels, positive_index=2)
    assert got[M.AUROC] == pytest.approx(roc_auc_score(labels == 2, probs[:, 2]), abs=1e-12)
    assert got[M.AUROC_MACRO] == pytest.approx(
        roc_auc_score(labels, probs, multi_class="ovr", average="macro"), abs=1e-12)
    assert got[M.AUROC_MACRO] - got[M.AUROC] > 0.05  # the two keys really differ here
    # hand-computed: class 0 ranks its one case first of three (1.0); class 1 (0.3 between 0.1
    # and 0.5) and class 2, melanoma (0.4 between 0.1 and 0.6), rank theirs second (0.5 each)
    p = np.array([[0.8, 0.1, 0.1], [0.1, 0.3, 0.6], [0.1, 0.5, 0.4]])
    y = np.array([0, 1, 2])
    assert M.macro_auroc(p, y) == pytest.approx((1.0 + 0.5 + 0.5) / 3)
    assert M.classification_metrics(p, y, positive_index=2)[M.AUROC] == pytest.approx(0.5)
    # a class absent from the labels has no AUROC: averaged over the classes present, not as 0
    # (torchmetrics' macro would give (1 + 1 + 0) / 3 here)
    assert M.macro_auroc(p[:2], y[:2]) == pytest.approx(1.0)
    # without a melanoma class there is no auroc, but the macro average still exists
    no_mel = M.classification_metrics(p, y, positive_index=None)
    assert M.AUROC not in no_mel and no_mel[M.AUROC_MACRO] == pytest.approx(2 / 3)
