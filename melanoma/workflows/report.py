"""The one report pipeline, shared by `melanoma evaluate` (in-domain and ``--external``),
`melanoma recalibrate` and the report written after training:

1. ``predict_rows``: predict the images once (the original files, through the Predictor: the
   same preprocessing, metadata and precision as `melanoma predict`);
2. the calibration: fitted on held-out logits (``melanoma.evaluation.calibration``) or the one
   the checkpoint holds, reused as it is;
3. ``scored``: metrics with bootstrap intervals (``melanoma.evaluation.bootstrap``), and with
   the raw probabilities beside the calibrated ones, the calibration before/after comparison;
4. ``write_report``: metrics.json, predictions.csv (one row per image: path, true label, every
   class probability, melanoma probability, decision, raw logits) and the figures, logged to a
   W&B run when one is given.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from melanoma.evaluation.bootstrap import calibration_comparison, format_ci, metrics_with_intervals
from melanoma.evaluation.figures import save_figure
from melanoma.evaluation.metrics import AUROC, AUROC_MACRO, ECE_MELANOMA

log = logging.getLogger(__name__)

__all__ = ["METRICS_FILE", "PREDICTIONS_FILE", "VAL_PREDICTIONS_FILE", "format_metrics", "jsonable",
           "predict_rows", "predictions_table", "scored", "write_report"]

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


def predict_rows(predictor, rows: pd.DataFrame, datamodule, split: str) -> np.ndarray:
    """(N, C) float64 logits of the rows' original files (exactly what `melanoma predict` reads,
    not a training cache), with the rows' patient metadata for a head that fuses it."""
    if len(rows) == 0:
        raise ValueError(
            f"{datamodule.name}: the {split} split is empty; evaluation needs images in both val "
            f"(to calibrate and choose the operating point) and test (to report)"
        )
    return predictor.logits_of_paths(rows["path"].tolist(), num_workers=datamodule.num_workers,
                                     desc=f"evaluate {split}",
                                     metadata=_metadata(predictor, rows, datamodule, split)).astype(np.float64)


def _metadata(predictor, rows: pd.DataFrame, datamodule, split: str) -> np.ndarray | None:
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


def scored(probs, labels, pos: int | None, threshold: float | None, groups, raw_probs=None) -> dict:
    """The report's metrics of calibrated ``probs`` with their intervals; given the raw
    (uncalibrated) probabilities too, the ECEs are reported before and after calibration."""
    metrics = metrics_with_intervals(probs, labels, pos, threshold, groups)
    if raw_probs is not None:
        for key in ("ece", ECE_MELANOMA):  # reported as *_after_calibration, beside *_before_
            metrics.pop(key, None)
            metrics["ci95"].pop(key, None)
        metrics.update(calibration_comparison(raw_probs, probs, labels, pos, groups))
    return metrics


def predictions_table(rows: pd.DataFrame, true_names, logits, head_classes, probs, class_names, pos,
                      decisions) -> pd.DataFrame:
    table = pd.DataFrame({
        "path": rows["path"].astype(str).to_numpy(),
        "true_label": list(true_names),
        "predicted_label": [class_names[i] for i in probs.argmax(1)],
    })
    for k, name in enumerate(class_names):
        table[f"prob_{name}"] = probs[:, k]
    if pos is not None:
        table["melanoma_probability"] = probs[:, pos]
        if decisions is not None:
            table["decision"] = decisions
    for k, name in enumerate(head_classes):  # raw, so uncalibrated numbers can be recomputed
        table[f"logit_{name}"] = logits[:, k]
    return table


def jsonable(d):
    """``d`` with numpy numbers as Python ones, non-finite floats as None and keys as strings."""
    if isinstance(d, dict):
        return {str(k): jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [jsonable(v) for v in d]
    if isinstance(d, (np.floating, float)):
        return None if not np.isfinite(d) else float(d)
    if isinstance(d, np.integer):
        return int(d)
    return d


def write_report(out_dir: Path, report: dict, table: pd.DataFrame, figures: dict, wandb_run=None) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = jsonable(report)
    (out_dir / METRICS_FILE).write_text(json.dumps(report, indent=2))
    table.to_csv(out_dir / PREDICTIONS_FILE, index=False)
    paths = {name: save_figure(fig, out_dir / f"{name}.png") for name, fig in figures.items()}
    if wandb_run is not None:
        _log_wandb(wandb_run, report, paths)
    log.info("evaluation report written to %s (AUROC %s, accuracy %.3f)", out_dir, report.get("auroc"), report["accuracy"])
    return report


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
