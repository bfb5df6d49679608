"""Temperature scaling (Guo et al. 2017): one scalar T > 0 that divides the logits, fitted by
minimising the negative log-likelihood on the validation split. It changes confidence, never
the argmax, so accuracy and AUROC are untouched while the probabilities become honest."""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from melanoma.models.checkpoint import TEMPERATURE_BOUNDS
from melanoma.models.checkpoint import softmax as _softmax

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
    log.info("temperature scaling: T=%.4f, validation NLL %.4f -> %.4f", temperature, before, after)
    return temperature


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    return _softmax(np.asarray(logits, dtype=np.float64) / temperature)
