"""Site recalibration: refit a checkpoint's calibration and operating point on a small labelled
sample of a new site's data, and report the rest of that data.

A model ranks a new site's images about as well as its own (PH2: AUROC 0.78), but the
probabilities and the threshold chosen at home do not transfer (PH2 at HAM10000's threshold:
sensitivity 1.00, specificity 0.013). Clinical deployment recalibrates locally: here a
stratified sample of the site's images (whole lesions / patients where the dataset has groups)
refits the calibration map (the candidates of `melanoma.evaluation.calibration`) and the
threshold at the target sensitivity; the other images are the test part, reported with three
operating points side by side:

- original: the checkpoint's calibration and threshold as they are;
- recalibrated: fitted on the site sample (what the new checkpoint will do);
- oracle: a threshold chosen on the test part itself - optimistic by construction, the bound the
  recalibration is measured against, never a number to quote.

The new checkpoint is a copy of the input (re-saved, weights and Lightning entries unchanged) in
which the head's calibration record is replaced and its TTA record cleared (it was fitted at the
home site); the input file is never written.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path

import numpy as np

from melanoma.conventions import DEFAULT_TARGET_SENSITIVITY, positive_index
from melanoma.data.splits import rows_fingerprint
from melanoma.evaluation.bootstrap import bootstrap, calibration_comparison
from melanoma.evaluation.calibration import fit_held_out_calibration
from melanoma.evaluation.figures import operating_points_figure, reliability_figure
from melanoma.evaluation.metrics import binary_auroc, sensitivity_specificity
from melanoma.evaluation.operating_point import threshold_for_sensitivity
from melanoma.models.checkpoint import Calibration, Checkpoint, SeenImages
from melanoma.predict import Predictor, decide
from melanoma.workflows.report import predict_rows, predictions_table, write_report
from melanoma.workflows.datasets import set_up
from melanoma.workflows.seen import unseen_rows

log = logging.getLogger(__name__)

__all__ = ["positives_needed", "recalibrate_checkpoint", "site_sample"]

#: names of the three operating points in the report, in the order they are shown
ORIGINAL, RECALIBRATED, ORACLE = "original", "recalibrated", "oracle (chosen on the test part: optimistic)"


def positives_needed(target_sensitivity: float) -> int:
    """Melanomas a sample needs before a threshold can aim at `target_sensitivity`: with n of
    them, the sample's sensitivities are k / n, and below 1 / (1 - target) the only one at or
    above the target is n / n, so the threshold would simply sit on the lowest melanoma score
    of the sample (20 for 0.95, 10 for 0.9)."""
    if not 0.0 < target_sensitivity < 1.0:
        raise ValueError(f"target sensitivity must lie in (0, 1) for a site recalibration, got {target_sensitivity}")
    return math.ceil(1.0 / (1.0 - target_sensitivity) - 1e-9)


def site_sample(is_positive, groups, fraction: float, seed: int = 0) -> np.ndarray:
    """Boolean mask of a sample of about `fraction` of the rows, stratified by melanoma (a group
    counts as melanoma when any of its images is) and drawn by whole groups (lesions /
    patients), so no group is both in the sample and in the test part. Deterministic in seed."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--fraction must lie in (0, 1), the share of the site's images used to recalibrate; got {fraction}")
    is_positive = np.asarray(is_positive, dtype=bool)
    codes = np.unique(np.asarray(groups), return_inverse=True)[1].reshape(-1)
    group_pos = np.bincount(codes, weights=is_positive, minlength=codes.max() + 1) > 0
    group_size = np.bincount(codes)
    rng = np.random.default_rng(seed)
    chosen = np.zeros(group_pos.size, dtype=bool)
    for stratum in (True, False):
        ids = rng.permutation(np.flatnonzero(group_pos == stratum))
        want = fraction * group_size[ids].sum()
        taken = np.cumsum(group_size[ids])
        # the fewest groups whose images reach the wanted share (at least one group)
        n = int(np.searchsorted(taken, want - 1e-9)) + 1 if ids.size else 0
        chosen[ids[:n]] = True
    return chosen[codes]


def _in_head_classes(data_labels, data_names: list[str], head: str, class_names: list[str], dataset: str):
    """The site labels as indices of the head's classes: the same label set, or melanoma vs rest
    on a two-class head (every site label maps onto one of its classes)."""
    if data_names == class_names:
        return data_labels
    head_pos = positive_index(class_names)
    if len(class_names) == 2 and positive_index(data_names) is not None:
        return np.where(data_labels == positive_index(data_names), head_pos, 1 - head_pos)
    raise ValueError(
        f"cannot recalibrate head {head!r} (classes {class_names}) on {dataset} (classes "
        f"{data_names}): the calibration map needs the site labels in the head's classes. Use a "
        f"dataset label set with the head's classes (e.g. dataset.label_set=binary) or a two-class head"
    )


def _check_sample(is_mel, in_sample, fraction: float, target_sensitivity: float) -> None:
    """Refuse a site sample too small to aim at the target sensitivity, or one that leaves no
    melanoma to report on, saying what to change."""
    needed = positives_needed(target_sensitivity)
    n_pos = int(is_mel[in_sample].sum())
    if n_pos < needed:
        total = int(is_mel.sum())
        more = f"raise --fraction to about {min(1.0, needed / total):.2f}" if total >= needed / 0.9 else \
            f"the whole site set has only {total} melanomas: label more site images"
        raise ValueError(
            f"the site sample ({int(in_sample.sum())} of {len(is_mel)} images, --fraction {fraction}) holds "
            f"{n_pos} melanomas; a threshold at sensitivity {target_sensitivity} needs at least {needed} "
            f"(with fewer, it just sits on the lowest melanoma score). {more}, or lower --target-sensitivity"
        )
    if (~in_sample).sum() == 0 or (is_mel & ~in_sample).sum() == 0:
        raise ValueError(f"the test part left after sampling {fraction} of {len(is_mel)} images has no melanoma; "
                         f"lower --fraction")


def _operating_point(p_mel, is_mel, threshold, groups) -> dict:
    sens, spec = sensitivity_specificity(np.asarray(p_mel) >= threshold, is_mel)
    probs = np.stack([1 - np.asarray(p_mel), np.asarray(p_mel)], 1)
    ci = bootstrap(probs, is_mel.astype(np.int64), 1, threshold, groups=groups).intervals
    return {"threshold": float(threshold), "sensitivity": sens, "specificity": spec,
            "ci95": {"sensitivity": ci["sensitivity_at_threshold"], "specificity": ci["specificity_at_threshold"]}}


def recalibrate_checkpoint(
    checkpoint: Checkpoint | str | os.PathLike,
    datamodule,
    out_ckpt: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    fraction: float = 0.2,
    seed: int = 0,
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY,
    head: str | None = None,
    device: str = "cpu",
    progress: bool = True,
    keep_overlap: bool = False,
    precision: str = "auto",
) -> dict:
    """Fit calibration and operating point on a site sample of `datamodule` (a dataset the
    model never trained on: `melanoma.workflows.datasets.external_datamodule`), write them into
    a copy of the checkpoint at `out_ckpt`, and report the rest into `out_dir`. Images the model
    has seen (``melanoma.workflows.seen``) are left out of both the sample and the report, and
    listed in out_dir/excluded.csv (``keep_overlap``: kept, with a warning). The sample joins the
    new checkpoint's seen-set: it is what that model was calibrated on."""
    out_ckpt, out_dir = Path(out_ckpt), Path(out_dir)
    if out_ckpt.resolve() == Path(getattr(checkpoint, "path", checkpoint)).resolve():
        raise ValueError(f"--out {out_ckpt} is the input checkpoint; recalibration writes a new file and "
                         f"leaves the input untouched: give another path")
    positives_needed(target_sensitivity)  # refuses a target outside (0, 1) before anything is read
    checkpoint = Checkpoint.of(checkpoint)
    ckpt_path = checkpoint.path
    predictor = Predictor(checkpoint, head=head, device=device, batch_size=datamodule.eval_batch_size,
                          progress=progress, announce=False, precision=precision)
    head, class_names, head_pos = predictor.head, predictor.class_names, predictor.positive_index
    data_names = list(datamodule.class_names)
    if head_pos is None:
        raise ValueError(f"head {head!r} (classes {class_names}) has no melanoma class: there is no "
                         f"melanoma operating point to recalibrate")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, overlap = unseen_rows(predictor.meta, set_up(datamodule), keep_overlap, out_dir)
    data_labels = rows["label"].to_numpy()
    labels = _in_head_classes(data_labels, data_names, head, class_names, datamodule.name)
    is_mel = labels == head_pos
    groups = rows["group"].to_numpy()
    in_sample = site_sample(is_mel, groups, fraction, seed)
    _check_sample(is_mel, in_sample, fraction, target_sensitivity)
    n_pos = int(is_mel[in_sample].sum())

    logits = predict_rows(predictor, rows, datamodule, "site")
    sample_rows = rows[in_sample]
    fitted_on = {"dataset": datamodule.name, "root": str(getattr(datamodule, "root", "")), "split": "site sample",
                 "fraction": float(fraction), "seed": int(seed), "n": int(in_sample.sum()), "melanomas": n_pos,
                 "fingerprint": rows_fingerprint(sample_rows["path"], sample_rows["label"])}
    record = predictor.meta.heads[head]
    calibration, candidates = fit_held_out_calibration(logits[in_sample], labels[in_sample], record.data, True, False, fitted_on)
    p_sample = calibration.probabilities(logits[in_sample])[:, head_pos]
    op = threshold_for_sensitivity(p_sample, is_mel[in_sample], target_sensitivity)
    calibration = dataclasses.replace(calibration, threshold=op["threshold"], target_sensitivity=float(target_sensitivity),
                                      precision=predictor.precision)

    sample_ids, sample_hashes = datamodule.seen_images(paths=sample_rows["path"].tolist())
    meta = checkpoint.meta  # written to out_ckpt only: the input file is never written
    meta.set_calibration(head, calibration)
    # the TTA record was fitted at home: TTA predictions now fall back to this one, with a warning
    meta.heads[head].calibration_tta = None
    if meta.seen is not None:  # what this model was calibrated on is not external to it either
        meta.seen.append(SeenImages(dataset=datamodule.name, split="site sample", head=head, ids=sample_ids,
                                    hashes=sample_hashes, model=meta.model_id))
    checkpoint.write(out_ckpt)

    # --- the test part --------------------------------------------------------------------
    test = ~in_sample
    t_logits, t_labels, t_groups, t_mel = logits[test], labels[test], groups[test], is_mel[test]
    original = predictor.calibration or Calibration(method="none")
    p_orig = original.probabilities(t_logits)
    p_new = calibration.probabilities(t_logits)
    points = {}
    if original.threshold is not None:
        points[ORIGINAL] = _operating_point(p_orig[:, head_pos], t_mel, original.threshold, t_groups)
    points[RECALIBRATED] = _operating_point(p_new[:, head_pos], t_mel, calibration.threshold, t_groups)
    oracle = threshold_for_sensitivity(p_new[:, head_pos], t_mel, target_sensitivity)["threshold"]
    points[ORACLE] = _operating_point(p_new[:, head_pos], t_mel, oracle, t_groups)
    comparison = calibration_comparison(p_orig, p_new, t_labels, head_pos, t_groups)
    report = {
        "checkpoint": str(ckpt_path), "recalibrated_checkpoint": str(out_ckpt), "dataset": datamodule.name,
        "head": head, "class_names": class_names, "target_sensitivity": float(target_sensitivity),
        "sample": fitted_on, "test_part": {"n": int(test.sum()), "melanomas": int(t_mel.sum())},
        "calibration": calibration.method, "temperature": calibration.temperature, "bias": list(calibration.bias),
        "calibration_candidates": candidates, "original_calibration": original.method,
        "operating_points": points, "overlap": overlap.summary,
        # ECE before = the original map, after = the recalibrated one, both on the test part
        **comparison,
        # for _write's log line: the recalibrated decisions' accuracy on the test part
        "accuracy": float(np.mean((p_new[:, head_pos] >= calibration.threshold) == t_mel)),
        "auroc": binary_auroc(p_new[:, head_pos], t_mel),
    }
    decisions = decide(p_new[:, head_pos], calibration.threshold)
    table = predictions_table(rows[test], [data_names[i] for i in data_labels[test]], t_logits, class_names, p_new,
                              class_names, head_pos, decisions)
    figures = {
        "operating_points": operating_points_figure(points),
        "reliability": reliability_figure({"original calibration": p_orig, "recalibrated": p_new}, t_labels),
    }
    return write_report(out_dir, report, table, figures, None)
