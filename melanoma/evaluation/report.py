"""The clinical test report of a checkpoint.

- ``evaluate_checkpoint``: on the dataset a head was trained on (the split it recorded), fit the
  calibration and the operating point on val, store them in the checkpoint, and report test.
- ``evaluate_external``: on a dataset the model never saw, every image is a test image; the
  stored calibration and threshold are used as they are, nothing is fitted and the checkpoint is
  not touched.

Both predict through ``melanoma.predict.Predictor`` (the same preprocessing, calibration and
decision rule as `melanoma predict`) and write out_dir/metrics.json, predictions.csv (one row
per image: path, true label, every class probability, melanoma probability, decision, raw
logits) and the figures (*.png), logged to a W&B run when one is given. ``evaluate_checkpoint``
also writes val_predictions.csv: the validation split in the same columns, its probabilities the
raw softmax (temperature 1, uncalibrated: the calibration is fitted on these very images) and its
decisions the checkpoint's; under k-fold these are a fold's out-of-fold predictions
(``melanoma summarize`` pools them).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from melanoma.evaluation.bootstrap import bootstrap, format_ci
from melanoma.evaluation.calibration import fit_calibration, nll_of, prior_offsets
from melanoma.evaluation.figures import report_figures, save_figure
from melanoma.evaluation.metrics import (AUROC, AUROC_MACRO, ECE_MELANOMA, classification_metrics,
                                         expected_calibration_error, melanoma_calibration_error)
from melanoma.evaluation.operating_point import threshold_for_sensitivity
from melanoma.evaluation.seen import exclude_seen
from melanoma.predict import Predictor, decide
from melanoma.models.checkpoint import METHOD_NONE, Calibration, TrainingData, softmax, update_meta
from melanoma.conventions import BINARY_CLASSES, positive_index

log = logging.getLogger(__name__)

__all__ = ["evaluate_checkpoint", "evaluate_external", "format_metrics", "METRICS_FILE", "PREDICTIONS_FILE",
           "VAL_PREDICTIONS_FILE"]

#: the report's files (beside the figures), named once
METRICS_FILE, PREDICTIONS_FILE, VAL_PREDICTIONS_FILE = "metrics.json", "predictions.csv", "val_predictions.csv"

#: what the console shows of a report, in this order (each with its interval where it has one)
SHOWN = ["n", "accuracy", "balanced_accuracy", AUROC, AUROC_MACRO, "average_precision", "sensitivity_argmax",
         "specificity_argmax", "threshold", "sensitivity_at_threshold", "specificity_at_threshold",
         "temperature", "calibration", "ece_before_calibration", "ece_after_calibration", "ece",
         "ece_melanoma_before_calibration", "ece_melanoma_after_calibration", "ece_melanoma"]


def format_metrics(metrics: dict) -> str:
    """The report's numbers as console lines, `0.912 [0.871, 0.948]` where there is an interval."""
    intervals = {**(metrics.get("ci95") or {}), **(metrics.get("ci95_calibration") or {})}
    lines = []
    for k in SHOWN:
        v = metrics.get(k)
        if v is not None:
            shown = format_ci(v, intervals[k]) if k in intervals else f"{v:.4f}" if isinstance(v, float) else str(v)
            lines.append(f"  {k:<26} {shown}")
    return "\n".join(lines)

MAPPED_CLASSES = BINARY_CLASSES
#: report metrics decided by the argmax of the head's probabilities
ARGMAX_METRICS = ("accuracy", "balanced_accuracy", "sensitivity_argmax", "specificity_argmax")


def _logits(predictor: Predictor, rows: pd.DataFrame, datamodule, split: str) -> np.ndarray:
    if len(rows) == 0:
        raise ValueError(
            f"{datamodule.name}: the {split} split is empty; evaluation needs images in both val "
            f"(to calibrate and choose the operating point) and test (to report)"
        )
    # the original files, not a training cache: exactly what `melanoma predict` would read
    return predictor.logits_of_paths(rows["path"].tolist(), num_workers=datamodule.num_workers,
                                     desc=f"evaluate {split}",
                                     metadata=_metadata(predictor, rows, datamodule, split)).astype(np.float64)


def _metadata(predictor: Predictor, rows: pd.DataFrame, datamodule, split: str) -> np.ndarray | None:
    """The rows' encoded patient metadata for a head that fuses it (the head's own schema): a
    dataset without those columns (an external set such as PH2) is scored with every value
    missing, and says so."""
    schema = predictor.metadata_schema
    if schema is None:
        return None
    present = [f for f in schema.fields if f in rows.columns]
    if not present:
        log.warning("%s has no patient metadata %s: its %s images are scored with every value missing",
                    datamodule.name, list(schema.fields), split)
    vectors = schema.encode_table(rows)
    log.info("%s %s: metadata missing (scored as missing) %s of %d images", datamodule.name, split,
             schema.missing_counts(vectors), len(rows))
    return vectors


def predictions_table(rows: pd.DataFrame, true_names, logits, head_classes, probs, class_names, pos, decisions) -> pd.DataFrame:
    table = pd.DataFrame({
        "path": rows["path"].astype(str).to_numpy(),
        "true_label": list(true_names),
        "predicted_label": [class_names[i] for i in probs.argmax(1)],
    })
    for k, name in enumerate(class_names):
        table[f"prob_{name}"] = probs[:, k]
    if pos is not None:
        table["melanoma_probability"] = probs[:, pos]
        table["decision"] = decisions
    for k, name in enumerate(head_classes):  # raw, so uncalibrated numbers can be recomputed
        table[f"logit_{name}"] = logits[:, k]
    return table


def _jsonable(d):
    if isinstance(d, dict):
        return {k: _jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_jsonable(v) for v in d]
    if isinstance(d, (np.floating, float)):
        return None if not np.isfinite(d) else float(d)
    if isinstance(d, np.integer):
        return int(d)
    return d


def _report_metrics(probs, labels, pos, threshold, groups) -> dict:
    metrics = classification_metrics(probs, labels, pos, threshold)
    metrics.pop("nll")
    # 95% percentile bootstrap intervals, resampling whole lesions / patients where there are groups
    result = bootstrap(probs, labels, pos, threshold, groups=groups)
    metrics["ci95"], metrics["ci95_method"] = result.intervals, result.summary()
    return metrics


def fit_val_calibration(logits, labels, data: TrainingData | None, calibrate: bool, tta: bool,
                        fitted_on: dict) -> tuple[Calibration, dict]:
    """The calibration map fitted on held-out logits (threshold not yet set) and every
    candidate's fit; with the training reweighting recorded in `data`, the prior-correction
    candidate takes part (melanoma.evaluation.calibration.fit_calibration chooses)."""
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


def calibration_comparison(raw_probs, probs, labels, pos, groups) -> dict:
    """ECE (top label, and of the melanoma probability) before and after calibration, each
    with its bootstrap interval (the same resampling as the other metrics)."""
    out, ci = {}, {}
    for when, p in (("before", raw_probs), ("after", probs)):
        intervals = bootstrap(p, labels, pos, groups=groups).intervals
        out[f"ece_{when}_calibration"] = expected_calibration_error(p, labels)
        ci[f"ece_{when}_calibration"] = intervals["ece"]
        if pos is not None:
            out[f"{ECE_MELANOMA}_{when}_calibration"] = melanoma_calibration_error(p[:, pos], labels == pos)
            ci[f"{ECE_MELANOMA}_{when}_calibration"] = intervals[ECE_MELANOMA]
    return {**out, "ci95_calibration": ci}


def _write(out_dir: Path, report: dict, table: pd.DataFrame, figures: dict, wandb_run) -> dict:
    report = _jsonable(report)
    (out_dir / METRICS_FILE).write_text(json.dumps(report, indent=2))
    table.to_csv(out_dir / PREDICTIONS_FILE, index=False)
    paths = {name: save_figure(fig, out_dir / f"{name}.png") for name, fig in figures.items()}
    if wandb_run is not None:
        _log_wandb(wandb_run, report, paths)
    log.info("evaluation report written to %s (AUROC %s, accuracy %.3f)", out_dir, report.get("auroc"), report["accuracy"])
    return report


def evaluate_checkpoint(
    ckpt_path: str | os.PathLike,
    datamodule,
    out_dir: str | os.PathLike,
    *,
    calibrate: bool = True,
    target_sensitivity: float = 0.95,
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
    (``melanoma.evaluation.datasets.training_datamodule`` rebuilds it). Returns the metrics
    written to metrics.json (test split; the val numbers under "val").
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictor = Predictor(ckpt_path, head=head, device=device, batch_size=datamodule.eval_batch_size, tta=tta,
                          progress=progress, announce=False, precision=precision)
    meta, head = predictor.meta, predictor.head
    record = meta.heads[head]
    class_names = record.class_names
    if list(datamodule.class_names) != class_names:
        raise ValueError(
            f"head {head!r} predicts {class_names} but the datamodule's label set gives "
            f"{list(datamodule.class_names)}; use the label_set the model was trained with"
        )
    if datamodule.table is None:  # evaluation.datasets and training hand over a set-up datamodule
        datamodule.prepare_data()
        datamodule.setup("test")
    fingerprint = datamodule.split_fingerprint()
    if record.data is not None and record.data.fingerprint and record.data.fingerprint != fingerprint:
        from melanoma.evaluation.datasets import SplitMismatchError

        raise SplitMismatchError(
            f"the {datamodule.name} split given differs from the split head {head!r} was trained on "
            f"(recorded {record.data.counts}); its test split would hold training images"
        )
    pos = record.positive_index
    val_rows, test_rows = datamodule.split_table("val"), datamodule.split_table("test")
    val_logits, test_logits = (_logits(predictor, r, datamodule, s) for s, r in (("val", val_rows), ("test", test_rows)))
    val_labels, test_labels = val_rows["label"].to_numpy(), test_rows["label"].to_numpy()

    calibration, candidates = fit_val_calibration(val_logits, val_labels, record.data, calibrate, tta,
                                                  {"dataset": datamodule.name, "split": "val", "fingerprint": fingerprint})
    calibration = dataclasses.replace(calibration, precision=predictor.precision)
    val_probs = calibration.probabilities(val_logits)
    op = None
    if pos is not None:
        op = threshold_for_sensitivity(val_probs[:, pos], val_labels == pos, target_sensitivity)
        calibration = dataclasses.replace(calibration, threshold=op["threshold"], target_sensitivity=float(target_sensitivity))
        log.info("operating point on val: melanoma probability >= %.4f (sensitivity %.3f, specificity %.3f)",
                 op["threshold"], op["sensitivity"], op["specificity"])
    update_meta(ckpt_path, lambda m: m.set_calibration(head, calibration))

    probs = calibration.probabilities(test_logits)
    raw_probs = softmax(test_logits)
    decisions = decide(probs[:, pos], calibration.threshold) if pos is not None else None
    groups = test_rows["group"].to_numpy()
    metrics = _report_metrics(probs, test_labels, pos, calibration.threshold, groups)
    for key in ("ece", ECE_MELANOMA):  # reported below as *_after_calibration, beside *_before_
        metrics.pop(key, None)
        metrics["ci95"].pop(key, None)
    metrics.update(calibration_comparison(raw_probs, probs, test_labels, pos, groups))
    metrics.update({
        "nll_before_calibration": nll_of(test_logits, test_labels),
        "nll_after_calibration": nll_of(test_logits, test_labels, calibration.temperature, calibration.bias),
    })
    report = {
        "checkpoint": str(ckpt_path), "dataset": datamodule.name, "head": head, "split": "test", "external": False,
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
    return _write(out_dir, report, table, figures, wandb_run)


def _write_val_predictions(out_dir: Path, rows, labels, logits, class_names, pos) -> None:
    """val_predictions.csv: raw softmax probabilities (uncalibrated: the calibration was fitted on
    these images, so calibrated ones would flatter) and no decision column (a decision is made on
    calibrated probabilities, which a row showing raw ones would seem to contradict)."""
    table = predictions_table(rows, [class_names[i] for i in labels], logits, class_names, softmax(logits),
                              class_names, pos, None)
    table.drop(columns=["decision"], errors="ignore").to_csv(out_dir / VAL_PREDICTIONS_FILE, index=False)


def evaluate_external(
    ckpt_path: str | os.PathLike,
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
    except those the model has seen (its seen-set, by id and content: ``melanoma.evaluation.seen``),
    which are left out and listed in excluded.csv (``keep_overlap``: scored anyway, with a warning).

    When the head's classes and the dataset's differ, both are mapped to melanoma vs rest
    (P(rest) = 1 - P(melanoma)); refused when either has no melanoma class. The stored
    calibration and operating point are used as they are; nothing is fitted or written back.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictor = Predictor(ckpt_path, head=head, device=device, batch_size=datamodule.eval_batch_size, tta=tta,
                          progress=progress, precision=precision)
    head, class_names = predictor.head, predictor.class_names
    if datamodule.table is None:  # evaluation.datasets and training hand over a set-up datamodule
        datamodule.prepare_data()
        datamodule.setup("test")
    rows = datamodule._require_table().reset_index(drop=True)
    overlap = exclude_seen(predictor.meta, rows, datamodule, keep_overlap, out_dir)
    if not keep_overlap:
        rows = rows[~overlap.mask].reset_index(drop=True)
    data_names = list(datamodule.class_names)
    logits = _logits(predictor, rows, datamodule, "all")
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
        probs, labels, names, pos, mapped = np.stack([1 - p_mel, p_mel], 1), (labels == data_pos).astype(np.int64), MAPPED_CLASSES, 1, True
    cal = predictor.calibration
    threshold = None if cal is None else cal.threshold
    decisions = decide(probs[:, pos], threshold) if pos is not None else None
    metrics = _report_metrics(probs, labels, pos, threshold, rows["group"].to_numpy())
    if mapped:
        # argmax metrics mean the head's argmax, as on its own data: on the mapped two columns
        # argmax would be p(melanoma) >= 0.5, another rule on a head of more than two classes
        by_argmax = _report_metrics(np.stack([~head_called, head_called], 1).astype(np.float64), labels, pos, None,
                                    rows["group"].to_numpy())
        for key in ARGMAX_METRICS:
            metrics[key], metrics["ci95"][key] = by_argmax[key], by_argmax["ci95"][key]
    report = {
        "checkpoint": str(ckpt_path), "dataset": datamodule.name, "head": head, "split": "all", "external": True,
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
    return _write(out_dir, report, table, figures, wandb_run)


def _log_wandb(run, report: dict, figure_paths: dict) -> None:
    import wandb

    # report/...: the calibrated report; test/... are the Lightning test loop's uncalibrated scalars
    scalars = {f"report/{k}": v for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    scalars.update({f"report/{k}_ci95_low": lo for k, (lo, _) in (report.get("ci95") or {}).items() if lo is not None})
    scalars.update({f"report/{k}_ci95_high": hi for k, (_, hi) in (report.get("ci95") or {}).items() if hi is not None})
    images = {f"report/{name}": wandb.Image(str(p)) for name, p in figure_paths.items()}
    run.log({**scalars, **images})
    for k, v in scalars.items():
        run.summary[k] = v
