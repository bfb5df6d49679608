"""Prior-aware calibration: a class-weighted loss shifts every logit by log(weight), which no
temperature can undo; undoing the recorded shift (or fitting a bias) restores calibration.

The model is a logistic regression on two Gaussian classes with a 1:9 prior (melanoma rare),
trained by full-batch LBFGS with and without inverse-frequency class weights: the same maths as
the ViT's head, in milliseconds."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from melanoma.evaluation.calibration import fit_calibration, prior_offsets
from melanoma.evaluation.metrics import expected_calibration_error, melanoma_calibration_error
from melanoma.models.checkpoint import (METHOD_PRIOR_TEMPERATURE, METHOD_TEMPERATURE, METHOD_TEMPERATURE_BIAS,
                                        Calibration, CheckpointMeta, Preprocessing, TrainingData, HeadRecord)

PRIOR = np.array([0.9, 0.1])  # not_melanoma, melanoma


def sample(n, rng):
    y = (rng.random(n) < PRIOR[1]).astype(np.int64)
    x = rng.normal(size=(n, 4)) + np.where(y[:, None] == 1, 0.8, 0.0)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def train_logistic(x, y, weight=None):
    torch.manual_seed(0)
    lin = torch.nn.Linear(x.shape[1], 2)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(x), y, weight=weight)
        loss.backward()
        return loss

    opt.step(closure)
    return lambda v: lin(v).detach().double().numpy()


@pytest.fixture(scope="module")
def task():
    rng = np.random.default_rng(0)
    (xtr, ytr), (xva, yva), (xte, yte) = sample(20000, rng), sample(4000, rng), sample(40000, rng)
    counts = np.bincount(ytr.numpy(), minlength=2)
    weights = counts.sum() / (2 * counts)  # the datamodule's class_weights(): N / (C n_c)
    return dict(weights=weights, prior=counts / counts.sum(), val=(xva, yva.numpy()), test=(xte, yte.numpy()),
                plain=train_logistic(xtr, ytr), weighted=train_logistic(xtr, ytr, torch.tensor(weights, dtype=torch.float32)))


def test_prior_offsets_are_log_weights_or_log_balance():
    pi = np.array([0.9, 0.1])
    w = 1 / (2 * pi)
    np.testing.assert_allclose(prior_offsets(pi, w), np.log(w) - np.log(w).mean())
    # a balanced sampler draws classes uniformly: offset log(0.5 / pi)
    np.testing.assert_allclose(prior_offsets(pi, None, "balanced"), np.log(0.5 / pi) - np.log(0.5 / pi).mean())
    # weights and balanced sampling together: both shifts add up
    np.testing.assert_allclose(prior_offsets(pi, w, "balanced"), 2 * (np.log(w) - np.log(w).mean()))
    assert prior_offsets(pi, None, "random") is None
    assert prior_offsets(None, w) is None


def ece_of(probs, labels):
    # the melanoma probability's calibration: top-label ECE cannot see a class-balance shift in a
    # two-class task (over- and under-confidence cancel within a bin; checked below)
    return melanoma_calibration_error(probs[:, 1], labels == 1)


def test_class_weighted_model_calibrates_like_an_unweighted_one_only_with_the_prior_undone(task):
    (xva, yva), (xte, yte) = task["val"], task["test"]
    ece = {}
    top_label = [expected_calibration_error(Calibration().probabilities(task[m](xte)), yte) for m in ("plain", "weighted")]
    assert abs(top_label[0] - top_label[1]) < 0.01  # why ece_melanoma exists
    for name in ("plain", "weighted"):
        val, test = task[name](xva), task[name](xte)
        ece[name, "raw"] = ece_of(Calibration().probabilities(test), yte)
        choice_t = fit_calibration(val, yva, methods=[METHOD_TEMPERATURE])
        ece[name, "temperature"] = ece_of(Calibration(choice_t.temperature).probabilities(test), yte)
        offsets = prior_offsets(task["prior"], task["weights"]) if name == "weighted" else None
        choice = fit_calibration(val, yva, offsets=offsets)
        ece[name, "chosen"] = ece_of(
            Calibration(choice.temperature, choice.bias, choice.method).probabilities(test), yte)
        ece[name, "method"] = choice.method
    # the weighted loss really miscalibrates, and temperature alone cannot repair it
    assert ece["weighted", "raw"] > ece["plain", "raw"] + 0.05
    assert ece["weighted", "temperature"] > ece["plain", "temperature"] + 0.02
    # undoing the recorded prior shift then a temperature does
    assert ece["weighted", "method"] in (METHOD_PRIOR_TEMPERATURE, METHOD_TEMPERATURE_BIAS)
    assert abs(ece["weighted", "chosen"] - ece["plain", "temperature"]) < 0.02
    # the unweighted model needs no bias: plain temperature scaling is kept (the out-of-fold guard)
    assert ece["plain", "method"] == METHOD_TEMPERATURE


def test_prior_correction_recovers_the_known_offset(task):
    (xva, yva) = task["val"]
    offsets = prior_offsets(task["prior"], task["weights"])
    choice = fit_calibration(task["weighted"](xva), yva, offsets=offsets)
    cand = choice.candidates[METHOD_PRIOR_TEMPERATURE]
    t = cand["temperature"]
    np.testing.assert_allclose(np.array(cand["bias"]) * t, -offsets, atol=1e-9)
    # the free bias, fitted blind, finds the same shift: b1 - b0 ~ -(log w1 - log w0) / T
    free = choice.candidates[METHOD_TEMPERATURE_BIAS]
    assert (free["bias"][1] - free["bias"][0]) * free["temperature"] == pytest.approx(
        -(offsets[1] - offsets[0]), abs=0.25)


def test_a_tiny_val_set_keeps_temperature_unless_the_bias_is_large():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 30)
    logits = np.stack([-(y * 2.0 - 1) + rng.normal(0, 1.5, 30), (y * 2.0 - 1) + rng.normal(0, 1.5, 30)], 1)
    assert fit_calibration(logits, y).method == METHOD_TEMPERATURE  # calibrated already: no bias invented
    shifted = logits + np.array([0.0, 4.0])  # a large real shift wins even on 30 images
    assert fit_calibration(shifted, y).method == METHOD_TEMPERATURE_BIAS


def test_training_data_records_prior_and_weights_and_old_records_still_load():
    data = TrainingData(dataset="d", config={}, label_set="binary", class_names=("not_melanoma", "melanoma"),
                        split_settings={}, fingerprint="f", prior=(0.9, 0.1), class_weights=(0.55, 5.0),
                        sampler="random")
    meta = CheckpointMeta(backbone="vit_tiny", backbone_kwargs={}, heads={
        "d": HeadRecord(spec={"class_names": ["not_melanoma", "melanoma"]}, data=data)}, active_head="d",
        preprocessing=Preprocessing(32, (0.5,) * 3, (0.5,) * 3))
    back = CheckpointMeta.from_dict(meta.to_dict()).heads["d"].data
    assert back == data and back.reweighted
    old = meta.to_dict()
    for key in ("prior", "class_weights", "sampler"):
        del old["heads"]["d"]["data"][key]
    back = CheckpointMeta.from_dict(old).heads["d"].data
    assert back.prior is None and back.class_weights is None and back.sampler == "random" and not back.reweighted
