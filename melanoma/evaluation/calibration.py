"""Temperature scaling (Guo et al. 2017): one scalar T > 0 that divides the logits, fitted by
minimising the negative log-likelihood on the validation split. It changes confidence, never
the argmax, so accuracy and AUROC are untouched while the probabilities become honest."""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def _tensors(logits, labels) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
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


def fit_temperature(logits, labels, max_iter: int = 200) -> float:
    """The temperature minimising NLL of softmax(logits / T); optimised over log T so T stays
    positive without constraints. Returns 1.0 (no change) if fitting would not lower the NLL."""
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
    before, after = nll(logits, labels), nll(logits, labels, temperature)
    if not np.isfinite(temperature) or after > before:
        log.warning("temperature fit did not lower NLL (%.4f -> %.4f, T=%s); keeping T=1", before, after, temperature)
        return 1.0
    log.info("temperature scaling: T=%.4f, validation NLL %.4f -> %.4f", temperature, before, after)
    if temperature > 10:
        log.warning("temperature %.1f flattens the probabilities almost to uniform: on validation the model "
                    "is barely better than chance; check that it was trained on this dataset", temperature)
    return temperature


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64) / temperature
    logits = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)
