"""The operating point: the melanoma-probability threshold that reaches a target sensitivity.

Chosen on the validation split, stored in the checkpoint, and then reported on test, where the
sensitivity reached may fall short of the target: that gap is exactly what a clinician needs to
see."""

from __future__ import annotations

import math

import numpy as np

from melanoma.conventions import DEFAULT_TARGET_SENSITIVITY

from .metrics import sensitivity_specificity


def threshold_for_sensitivity(p_melanoma, is_melanoma, target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY) -> dict:
    """The highest threshold t such that calling `p >= t` melanoma catches at least
    `target_sensitivity` of the melanomas; the highest such t keeps specificity as high as it
    can be. Returns {"threshold", "target_sensitivity", "sensitivity", "specificity"} measured
    on the given (validation) data."""
    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
    p = np.asarray(p_melanoma, dtype=np.float64)
    y = np.asarray(is_melanoma).astype(bool)
    if not y.any():
        raise ValueError(
            "cannot choose an operating point: the validation split has no melanoma; "
            "use a split that contains melanomas (check val_fraction / the dataset's labels)"
        )
    positives = np.sort(p[y])[::-1]
    # the k-th highest melanoma score, k = ceil(target * n); tiny slack absorbs float error in the product
    k = max(1, math.ceil(target_sensitivity * positives.size - 1e-9))
    threshold = float(positives[k - 1])
    sens, spec = sensitivity_specificity(p >= threshold, y)
    return {
        "threshold": threshold,
        "target_sensitivity": float(target_sensitivity),
        "sensitivity": sens,
        "specificity": spec,
    }
