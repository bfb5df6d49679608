"""`melanoma evaluate`: the clinical test report of a checkpoint.

- ``evaluate_checkpoint``: on the dataset a head was trained on (the split it recorded), fit the
  calibration and the operating point on val, store them in the checkpoint, and report test.
- ``evaluate_external``: on a dataset the model never saw, every image is a test image; the
  stored calibration and threshold are used as they are, nothing is fitted and the checkpoint is
  not touched.

Both run the one report pipeline (``melanoma.workflows.report``) on a checkpoint read once (a
``Checkpoint`` object, or a path read here). ``evaluate_checkpoint`` also writes
val_predictions.csv: the validation split in the same columns, its probabilities the raw
softmax (temperature 1, uncalibrated: the calibration is fitted on these very images) and no
decisions; under k-fold these are a fold's out-of-fold predictions (``melanoma summarize`` pools
them).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np

from melanoma.conventions import BINARY_CLASSES, DEFAULT_TARGET_SENSITIVITY, positive_index
from melanoma.evaluation.calibration import fit_held_out_calibration, nll_of
from melanoma.evaluation.figures import report_figures
from melanoma.evaluation.metrics import expected_calibration_error
from melanoma.evaluation.operating_point import threshold_for_sensitivity
from melanoma.models.checkpoint import Checkpoint, softmax
from melanoma.predict import Predictor, decide
from melanoma.workflows.datasets import SplitMismatchError, set_up
from melanoma.workflows.report import (VAL_PREDICTIONS_FILE, predict_rows, predictions_table, scored,
                                       write_report)
from melanoma.workflows.seen import unseen_rows

log = logging.getLogger(__name__)

__all__ = ["evaluate_checkpoint", "evaluate_external"]

#: report metrics decided by the argmax of the head's probabilities
ARGMAX_METRICS = ("accuracy", "balanced_accuracy", "sensitivity_argmax", "specificity_argmax")


def evaluate_checkpoint(
    checkpoint: Checkpoint | str | os.PathLike,
    datamodule,
    out_dir: str | os.PathLike,
    *,
    calibrate: bool = True,
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY,
    tta: bool = False,
    device: str = "cpu",
    wandb_run=None,
    head: str | None = None,
    progress: bool = True,
    precision: str = "auto",
) -> dict:
    """Fit calibration and operating point on val, store them in the checkpoint, report test.

    `datamodule` must be the data `head` (default: the checkpoint's active head) was trained on,
    with the same split: its fingerprint is checked against the one the checkpoint recorded
    (``melanoma.workflows.datasets.training_datamodule`` rebuilds it). Returns the metrics
    written to metrics.json (test split; the val numbers under "val").
    """
    checkpoint = Checkpoint.of(checkpoint)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictor = Predictor(checkpoint, head=head, device=device, batch_size=datamodule.eval_batch_size, tta=tta,
                          progress=progress, announce=False, precision=precision)
    meta, head = predictor.meta, predictor.head
    record = meta.heads[head]
    class_names = record.class_names
    if list(datamodule.class_names) != class_names:
        raise ValueError(
            f"head {head!r} predicts {class_names} but the datamodule's label set gives "
            f"{list(datamodule.class_names)}; use the label_set the model was trained with"
        )
    set_up(datamodule)
    fingerprint = datamodule.split_fingerprint()
    if record.data is not None and record.data.fingerprint and record.data.fingerprint != fingerprint:
        raise SplitMismatchError(
            f"the {datamodule.name} split given differs from the split head {head!r} was trained on "
            f"(recorded {record.data.counts}); its test split would hold training images"
        )
    pos = record.positive_index
    val_rows, test_rows = datamodule.split_table("val"), datamodule.split_table("test")
    val_logits, test_logits = (predict_rows(predictor, r, datamodule, s) for s, r in (("val", val_rows), ("test", test_rows)))
    val_labels, test_labels = val_rows["label"].to_numpy(), test_rows["label"].to_numpy()

    calibration, candidates = fit_held_out_calibration(val_logits, val_labels, record.data, calibrate, tta,
                                                  {"dataset": datamodule.name, "split": "val", "fingerprint": fingerprint})
    calibration = dataclasses.replace(calibration, precision=predictor.precision)
    val_probs = calibration.probabilities(val_logits)
    op = None
    if pos is not None:
        op = threshold_for_sensitivity(val_probs[:, pos], val_labels == pos, target_sensitivity)
        calibration = dataclasses.replace(calibration, threshold=op["threshold"], target_sensitivity=float(target_sensitivity))
        log.info("operating point on val: melanoma probability >= %.4f (sensitivity %.3f, specificity %.3f)",
                 op["threshold"], op["sensitivity"], op["specificity"])
    checkpoint.meta.set_calibration(head, calibration)
    checkpoint.write()  # the one write of this command, through the checkpoint contract

    probs = calibration.probabilities(test_logits)
    raw_probs = softmax(test_logits)
    decisions = decide(probs[:, pos], calibration.threshold) if pos is not None else None
    groups = test_rows["group"].to_numpy()
    metrics = scored(probs, test_labels, pos, calibration.threshold, groups, raw_probs=raw_probs)
    metrics.update({
        "nll_before_calibration": nll_of(test_logits, test_labels),
        "nll_after_calibration": nll_of(test_logits, test_labels, calibration.temperature, calibration.bias),
    })
    report = {
        "checkpoint": str(checkpoint.path), "dataset": datamodule.name, "head": head, "split": "test", "external": False,
        "backbone": meta.backbone_record(),
        "class_names": class_names, "positive_class": class_names[pos] if pos is not None else None,
        "tta": bool(tta), "precision": predictor.precision, "temperature": calibration.temperature, "bias": list(calibration.bias),
        "calibration": calibration.method, "calibration_candidates": candidates,
        "target_sensitivity": calibration.target_sensitivity, **metrics,
        "val": {
            "n": int(val_labels.size),
            "nll_before_calibration": nll_of(val_logits, val_labels),
            "nll_after_calibration": nll_of(val_logits, val_labels, calibration.temperature, calibration.bias),
            "ece_before_calibration": expected_calibration_error(softmax(val_logits), val_labels),
            "ece_after_calibration": expected_calibration_error(val_probs, val_labels),
            **({"sensitivity_at_threshold": op["sensitivity"], "specificity_at_threshold": op["specificity"]} if op else {}),
        },
    }
    table = predictions_table(test_rows, [class_names[i] for i in test_labels], test_logits, class_names, probs,
                              class_names, pos, decisions)
    figures = report_figures(probs, test_labels, class_names, pos, calibration.threshold, uncalibrated_probs=raw_probs,
                             groups=groups)
    _write_val_predictions(out_dir, val_rows, val_labels, val_logits, class_names, pos)
    return write_report(out_dir, report, table, figures, wandb_run)


def _write_val_predictions(out_dir: Path, rows, labels, logits, class_names, pos) -> None:
    """val_predictions.csv: raw softmax probabilities (uncalibrated: the calibration was fitted on
    these images, so calibrated ones would flatter) and no decision column (a decision is made on
    calibrated probabilities, which a row showing raw ones would seem to contradict)."""
    table = predictions_table(rows, [class_names[i] for i in labels], logits, class_names, softmax(logits),
                              class_names, pos, None)
    table.to_csv(out_dir / VAL_PREDICTIONS_FILE, index=False)


def evaluate_external(
    checkpoint: Checkpoint | str | os.PathLike,
    datamodule,
    out_dir: str | os.PathLike,
    *,
    head: str | None = None,
    tta: bool = False,
    device: str = "cpu",
    wandb_run=None,
    progress: bool = True,
    precision: str = "auto",
    keep_overlap: bool = False,
) -> dict:
    """Report a dataset the model never trained on: every image of every split is a test image,
    except those the model has seen (its seen-set, by id and content: ``melanoma.workflows.seen``),
    which are left out and listed in excluded.csv (``keep_overlap``: scored anyway, with a warning).

    When the head's classes and the dataset's differ, both are mapped to melanoma vs rest
    (P(rest) = 1 - P(melanoma)); refused when either has no melanoma class. The stored
    calibration and operating point are used as they are; nothing is fitted or written back.
    """
    checkpoint = Checkpoint.of(checkpoint)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictor = Predictor(checkpoint, head=head, device=device, batch_size=datamodule.eval_batch_size, tta=tta,
                          progress=progress, precision=precision)
    head, class_names = predictor.head, predictor.class_names
    rows, overlap = unseen_rows(predictor.meta, set_up(datamodule), keep_overlap, out_dir)
    data_names = list(datamodule.class_names)
    logits = predict_rows(predictor, rows, datamodule, "all")
    probs = predictor.calibrated_probabilities(logits)
    head_pos = predictor.positive_index
    labels = rows["label"].to_numpy()
    true_names = [data_names[i] for i in labels]
    if data_names == class_names:
        mapped, names, pos = False, class_names, head_pos
    else:
        data_pos = positive_index(data_names)
        if head_pos is None or data_pos is None:
            raise ValueError(
                f"cannot compare head {head!r} (classes {class_names}) with {datamodule.name} (classes "
                f"{data_names}): melanoma vs rest needs a melanoma class on both sides"
            )
        p_mel = probs[:, head_pos]
        head_called = probs.argmax(1) == head_pos  # the head's own argmax, mapped to melanoma vs rest
        probs, labels, names, pos, mapped = np.stack([1 - p_mel, p_mel], 1), (labels == data_pos).astype(np.int64), list(BINARY_CLASSES), 1, True
    cal = predictor.calibration
    threshold = None if cal is None else cal.threshold
    decisions = decide(probs[:, pos], threshold) if pos is not None else None
    metrics = scored(probs, labels, pos, threshold, rows["group"].to_numpy())
    if mapped:
        # argmax metrics mean the head's argmax, as on its own data: on the mapped two columns
        # argmax would be p(melanoma) >= 0.5, another rule on a head of more than two classes
        by_argmax = scored(np.stack([~head_called, head_called], 1).astype(np.float64), labels, pos, None,
                                    rows["group"].to_numpy())
        for key in ARGMAX_METRICS:
            metrics[key], metrics["ci95"][key] = by_argmax[key], by_argmax["ci95"][key]
    report = {
        "checkpoint": str(checkpoint.path), "dataset": datamodule.name, "head": head, "split": "all", "external": True,
        "backbone": predictor.meta.backbone_record(),
        "class_names": names, "head_class_names": class_names, "dataset_class_names": data_names,
        "labels_mapped_to_melanoma_vs_rest": mapped, "positive_class": names[pos] if pos is not None else None,
        "tta": bool(tta), "precision": predictor.precision, "calibrated": predictor.calibrated,
        "temperature": None if cal is None else cal.temperature, "bias": None if cal is None else list(cal.bias),
        "calibration": None if cal is None else cal.method,
        "target_sensitivity": None if cal is None else cal.target_sensitivity, **metrics,
        "overlap": overlap.summary,
    }
    table = predictions_table(rows, true_names, logits, class_names, probs, names, pos, decisions)
    if mapped:
        table["predicted_label"] = [names[int(c)] for c in head_called]
    figures = report_figures(probs, labels, names, pos, threshold, groups=rows["group"].to_numpy())
    return write_report(out_dir, report, table, figures, wandb_run)
