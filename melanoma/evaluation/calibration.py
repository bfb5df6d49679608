"""Calibration maps fitted on held-out data: ``softmax(logits / T + bias)``.

- temperature scaling (Guo et al. 2017): one scalar T > 0, fitted by minimising the negative
  log-likelihood on the validation split. It changes confidence, never the argmax.
- prior correction + temperature: a class-weighted loss (or a class-balanced sampler) trains the
  model towards ``p(y|x) * w_y * q_y / pi_y`` (w: loss weights, q: how often the sampler draws
  class y, pi: the true training prior), i.e. it adds ``log(w_y q_y / pi_y)`` to every logit. No
  temperature can undo an additive class offset, so the known offset is subtracted first and a
  temperature fitted on top (the offset costs no parameter: it comes from the checkpoint).
- temperature + bias (vector scaling with one shared scale): T and a free per-class bias, for
  shifts nobody recorded (another site's prior, a colour cast).

``fit_calibration`` fits every candidate that applies and keeps the simplest one unless a more
flexible one predicts held-out labels better: each candidate is fitted on one half of the
validation set and scored (NLL) on the other, both ways round (2-fold, stratified, fixed seed),
and a candidate with more fitted parameters must lower the summed out-of-fold NLL by more than
one nat per extra parameter (the AIC's price) to be chosen. A free bias on a tiny or nearly
uninformative validation set chases noise (measured: on HAM10000 after one epoch it lowered the
in-sample NLL and doubled the test ECE); out-of-fold scoring sees that, in-sample AIC alone did
not. The chosen map is then refitted on the whole validation set.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F

from dataclasses import dataclass, field
from typing import Sequence

from melanoma.models.checkpoint import (METHOD_NONE, METHOD_PRIOR_TEMPERATURE, METHOD_TEMPERATURE,
                                        METHOD_TEMPERATURE_BIAS, TEMPERATURE_BOUNDS, Calibration, TrainingData)

log = logging.getLogger(__name__)


def _tensors(logits, labels) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    labels = torch.tensor(np.asarray(labels), dtype=torch.long)  # a copy: pandas arrays may be read-only
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(
            f"expected logits (N, C) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if logits.shape[0] == 0:
        raise ValueError("cannot fit a temperature on zero samples: the validation split is empty")
    return logits, labels


def nll(logits, labels, temperature: float = 1.0) -> float:
    logits, labels = _tensors(logits, labels)
    return float(F.cross_entropy(logits / temperature, labels))


def fit_temperature(logits, labels, max_iter: int = 200, bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The temperature minimising NLL of softmax(logits / T), kept within `bounds` (a warning
    says when it hits one: an uninformative model drives T towards infinity); optimised over
    log T. Returns 1.0 (no change) if fitting would not lower the NLL."""
    logits, labels = _tensors(logits, labels)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    lo, hi = bounds
    if np.isfinite(temperature) and not lo <= temperature <= hi:
        clipped = min(max(temperature, lo), hi)
        log.warning("the fitted temperature %.3g lies outside [%g, %g]; using %g. A temperature at the "
                    "bound means the validation logits carry almost no (T=%g) or extreme (T=%g) "
                    "confidence: check that the model was trained on this dataset", temperature, lo, hi,
                    clipped, hi, lo)
        temperature = clipped
    before, after = nll(logits, labels), nll(logits, labels, temperature)
    if not np.isfinite(temperature) or after > before:
        log.warning("temperature fit did not lower NLL (%.4f -> %.4f, T=%s); keeping T=1", before, after, temperature)
        return 1.0
    # debug: every candidate and cross-fitted half is one fit; the choice is logged once, below
    log.debug("temperature scaling: T=%.4f, NLL %.4f -> %.4f", temperature, before, after)
    return temperature


def nll_of(logits, labels, temperature: float = 1.0, bias: Sequence[float] = ()) -> float:
    """NLL of softmax(logits / T + bias)."""
    return float(-np.mean(np.log(np.clip(Calibration(temperature, tuple(bias)).probabilities(logits)[
        np.arange(len(labels)), np.asarray(labels)], 1e-300, None))))


def prior_offsets(prior: Sequence[float] | None, class_weights: Sequence[float] | None = None,
                  sampler: str = "random") -> np.ndarray | None:
    """Per-class offsets log(w_y q_y / pi_y) that training with loss weights w and sampler
    draws q added to the logits (q = pi for the random sampler, uniform for the balanced one);
    None when training did not reweight the classes (or the prior was not recorded)."""
    if prior is None:
        return None
    pi = np.asarray(prior, dtype=np.float64)
    if pi.ndim != 1 or (pi <= 0).any():
        return None  # a class absent from train: no finite correction exists
    pi = pi / pi.sum()
    offsets = np.zeros_like(pi)
    if class_weights is not None:
        w = np.asarray(class_weights, dtype=np.float64)
        if w.shape != pi.shape or (w <= 0).any():
            return None
        offsets += np.log(w)
    if sampler == "balanced":
        offsets += np.log(1.0 / pi.size) - np.log(pi)
    if np.allclose(offsets, offsets.mean()):
        return None  # a constant offset changes nothing
    return offsets - offsets.mean()


def fit_temperature_and_bias(logits, labels, max_iter: int = 200) -> tuple[float, tuple[float, ...]]:
    """T and a per-class bias (mean zero: softmax ignores a common shift) minimising the NLL
    of softmax(logits / T + bias); T kept within TEMPERATURE_BOUNDS."""
    logits, labels = _tensors(logits, labels)
    c = logits.shape[1]
    log_t = torch.tensor(np.log(fit_temperature(logits.numpy(), labels.numpy())), dtype=torch.float64,
                         requires_grad=True)
    free = torch.zeros(c - 1, dtype=torch.float64, requires_grad=True)  # bias[0] fixed: identifiable
    optimizer = torch.optim.LBFGS([log_t, free], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        bias = torch.cat([torch.zeros(1, dtype=torch.float64), free])
        loss = F.cross_entropy(logits / log_t.exp() + bias, labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    lo, hi = TEMPERATURE_BOUNDS
    fitted = float(log_t.detach().exp())
    temperature = float(np.clip(fitted, lo, hi))
    if temperature != fitted and np.isfinite(fitted):
        # the bias fitted beside an out-of-bounds temperature is not the best at the bound: refit it
        with torch.no_grad():
            log_t.fill_(math.log(temperature))
        log_t.requires_grad_(False)
        refit = torch.optim.LBFGS([free], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

        def bias_closure():
            refit.zero_grad()
            bias = torch.cat([torch.zeros(1, dtype=torch.float64), free])
            loss = F.cross_entropy(logits / temperature + bias, labels)
            loss.backward()
            return loss

        refit.step(bias_closure)
    bias = np.r_[0.0, free.detach().numpy()]
    if not np.all(np.isfinite(bias)) or not np.isfinite(temperature):
        log.warning("temperature + bias fit diverged; using temperature alone")
        return float(fit_temperature(logits.numpy(), labels.numpy())), ()
    return temperature, tuple((bias - bias.mean()).tolist())


@dataclass(frozen=True)
class CalibrationChoice:
    """The chosen map and every candidate's out-of-fold validation NLL, parameter count and
penalised score (NLL + 1 nat per extra parameter)."""

    method: str
    temperature: float
    bias: tuple[float, ...]
    #: method -> {"nll" (in-sample), "out_of_fold_nll_sum", "parameters", "score", "temperature", "bias"}
    candidates: dict = field(default_factory=dict)


def _fit_candidates(logits: np.ndarray, labels: np.ndarray, offsets) -> dict[str, tuple[float, tuple[float, ...], int]]:
    """method -> (temperature, bias, fitted parameters)."""
    fits = {METHOD_TEMPERATURE: (fit_temperature(logits, labels), (), 1)}
    if offsets is not None:
        t = fit_temperature(logits - offsets, labels)
        # (z - o) / T = z / T - o / T: the correction becomes a bias on the calibrated scale
        fits[METHOD_PRIOR_TEMPERATURE] = (t, tuple((-offsets / t).tolist()), 1)
    fits[METHOD_TEMPERATURE_BIAS] = (*fit_temperature_and_bias(logits, labels), logits.shape[1])
    return fits


def _halves(labels: np.ndarray, seed: int) -> np.ndarray:
    """A stratified random 0/1 fold per row."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(labels.size, dtype=int)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        fold[idx[1::2]] = 1
    return fold


def fit_calibration(logits, labels, offsets=None, methods: Sequence[str] | None = None,
                    seed: int = 0) -> CalibrationChoice:
    """Fit the candidate maps on (validation) logits and choose one by 2-fold out-of-fold NLL
    with a one-nat-per-parameter margin (see the module docstring for why). offsets: the
    training reweighting's logit offsets (`prior_offsets`); the prior-correction candidate is
    fitted only when they are given. methods: restrict the candidates (e.g. temperature only)."""
    logits_np = np.asarray(logits, dtype=np.float64)
    labels_np = np.asarray(labels)
    _tensors(logits_np, labels_np)  # validates shapes
    offsets = None if offsets is None else np.asarray(offsets, dtype=np.float64)
    fits = _fit_candidates(logits_np, labels_np, offsets)
    if methods is not None:
        fits = {m: f for m, f in fits.items() if m in methods}
        if not fits:
            raise ValueError(f"none of the calibration methods {list(methods)} applies; candidates were "
                             f"{[METHOD_TEMPERATURE, METHOD_PRIOR_TEMPERATURE, METHOD_TEMPERATURE_BIAS]}")
    out_of_fold = {m: 0.0 for m in fits}
    fold = _halves(labels_np, seed)
    cross_validated = min(np.bincount(fold, minlength=2)) >= 2
    if cross_validated:
        for k in (0, 1):
            train, held = fold != k, fold == k
            for m, (t, bias, _) in _fit_candidates(logits_np[train], labels_np[train], offsets).items():
                if m in out_of_fold:
                    out_of_fold[m] += nll_of(logits_np[held], labels_np[held], t, bias) * held.sum()
    candidates = {}
    for method, (t, bias, k) in fits.items():
        candidates[method] = {"nll": nll_of(logits_np, labels_np, t, bias), "parameters": k,
                              "out_of_fold_nll_sum": out_of_fold[method] if cross_validated else None,
                              "temperature": t, "bias": list(bias)}
    # penalised out-of-fold NLL (in-sample NLL when val is too small to split); ties: the simpler
    score = {m: (c["out_of_fold_nll_sum"] if cross_validated else c["nll"] * labels_np.size) + c["parameters"]
             for m, c in candidates.items()}
    best = min(candidates, key=lambda m: (score[m], candidates[m]["parameters"]))
    for m in candidates:
        candidates[m]["score"] = score[m]
    t, bias, _ = fits[best]
    log.info("calibration: chose %s (T=%.3g) among %s (validation NLL / penalised out-of-fold NLL)", best, t,
             ", ".join(f"{m} {c['nll']:.3f} / {c['score']:.1f}" for m, c in candidates.items()))
    return CalibrationChoice(best, t, bias, candidates)


def fit_held_out_calibration(logits, labels, data: TrainingData | None, calibrate: bool, tta: bool,
                             fitted_on: dict) -> tuple[Calibration, dict]:
    """The calibration map fitted on held-out logits (threshold not yet set) and every
    candidate's fit; with the training reweighting recorded in `data`, the prior-correction
    candidate takes part (``fit_calibration`` chooses). ``calibrate`` False: the identity map,
    recorded as such."""
    if not calibrate:
        return Calibration(method=METHOD_NONE, tta=bool(tta), fitted_on=fitted_on), {}
    offsets = None
    if data is not None and data.reweighted:
        offsets = prior_offsets(data.prior, data.class_weights, data.sampler)
        if offsets is None:
            log.warning("training reweighted the classes (class weights %s, sampler %s) but the checkpoint "
                        "records no usable train prior; the recorded shift cannot be undone, a fitted bias "
                        "may still correct it", data.class_weights, data.sampler)
    choice = fit_calibration(logits, labels, offsets=offsets)
    calibration = Calibration(temperature=choice.temperature, bias=choice.bias, method=choice.method, tta=bool(tta),
                              fitted_on=fitted_on)
    return calibration, choice.candidates
