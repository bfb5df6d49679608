"""The clinical test report of a checkpoint: calibrate and pick the operating point on the
validation split, store both in the checkpoint, and report the test split.

Writes out_dir/metrics.json, predictions.csv (one row per test image: path, true and predicted
label, every class probability after calibration, and the raw logits so uncalibrated numbers can
be recomputed) and the figures (*.png), and logs the figures to a W&B run when one is given.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from melanoma.evaluation.calibration import fit_temperature, nll, softmax
from melanoma.evaluation.figures import report_figures, save_figure
from melanoma.evaluation.metrics import classification_metrics, expected_calibration_error
from melanoma.evaluation.operating_point import threshold_for_sensitivity
from melanoma.evaluation.tta import tta_logits
from melanoma.models.classifier import META_KEY, Classifier
from melanoma.models.heads import positive_index
from melanoma.precision import autocast_context, resolve_precision

log = logging.getLogger(__name__)


@torch.no_grad()
def collect_logits(
    model: Classifier, loader, head: str, device="cpu", tta: bool = False, desc: str = "evaluate",
    progress: bool = True, precision: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """(logits (N, C), labels (N,)) over a loader of (images, labels) batches, in loader order."""
    model.eval()
    logits, labels = [], []

    def forward(x):
        with autocast_context(precision, device):
            return model(x, head)

    for x, y in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress):
        x = x.to(device)
        logits.append((tta_logits(forward, x) if tta else forward(x)).float().cpu())
        labels.append(y)
    if not logits:
        return np.zeros((0, 0)), np.zeros(0, dtype=np.int64)
    return torch.cat(logits).numpy().astype(np.float64), torch.cat(labels).numpy().astype(np.int64)


def _split_logits(model, datamodule, split: str, head: str, device, tta: bool, progress: bool,
                  precision: str = "auto") -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    rows = datamodule.split_table(split)
    if len(rows) == 0:
        raise ValueError(
            f"{datamodule.name}: the {split} split is empty; evaluation needs images in both val "
            f"(to calibrate and choose the operating point) and test (to report)"
        )
    # A loader of our own rather than datamodule.val_dataloader(): under DDP that one is sharded,
    # and the report must see every image once, in split_table order.
    loader = DataLoader(
        datamodule.dataset(split, train=False),
        batch_size=datamodule.eval_batch_size,
        shuffle=False,
        num_workers=datamodule.num_workers,
    )
    logits, labels = collect_logits(model, loader, head, device, tta, desc=f"evaluate {split}", progress=progress,
                                    precision=precision)
    if not np.array_equal(labels, rows["label"].to_numpy()):
        raise RuntimeError(f"{split} loader labels do not follow split_table order; cannot write predictions.csv")
    return logits, labels, rows


def update_checkpoint_meta(ckpt_path: str | os.PathLike, head: str, temperature: float | None, operating_point: dict | None) -> None:
    """Store calibration / operating point for `head` in ckpt["melanoma"], replacing the file
    atomically so a crash never leaves half a checkpoint."""
    # a link (Lightning's last.ckpt may be one) keeps pointing at the updated file
    ckpt_path = Path(ckpt_path).resolve()
    # weights_only: Classifier.from_checkpoint already requires a plain checkpoint
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    meta = ckpt[META_KEY]
    if temperature is not None:
        meta["calibration"] = dict(meta.get("calibration") or {})
        meta["calibration"][head] = {"temperature": float(temperature)}
    if operating_point is not None:
        meta["operating_point"] = dict(meta.get("operating_point") or {})
        meta["operating_point"][head] = {
            "threshold": float(operating_point["threshold"]),
            "target_sensitivity": float(operating_point["target_sensitivity"]),
        }
    tmp = ckpt_path.with_name(f".{ckpt_path.name}.tmp-{os.getpid()}")
    torch.save(ckpt, tmp)
    os.replace(tmp, ckpt_path)


def predictions_table(rows: pd.DataFrame, logits: np.ndarray, probs: np.ndarray, class_names, pos: int | None, threshold) -> pd.DataFrame:
    table = pd.DataFrame({
        "path": rows["path"].astype(str).to_numpy(),
        "true_label": [class_names[i] for i in rows["label"]],
        "predicted_label": [class_names[i] for i in probs.argmax(1)],
    })
    for k, name in enumerate(class_names):
        table[f"prob_{name}"] = probs[:, k]
    if pos is not None and threshold is not None:
        table["melanoma_at_operating_point"] = probs[:, pos] >= threshold
    for k, name in enumerate(class_names):
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
    """Fit temperature and operating point on val, store them in the checkpoint, report test.

    `head` defaults to the datamodule's name (the head trained on it). Returns the metrics dict
    written to metrics.json (test split; the val numbers under "val").
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, meta = Classifier.from_checkpoint(ckpt_path, map_location=device)
    head = head or datamodule.name
    if head not in meta["heads"]:
        raise ValueError(
            f"checkpoint {ckpt_path} has no head {head!r} for dataset {datamodule.name!r}; it has "
            f"{list(meta['heads'])}. Train on this dataset first or pass head=<one of those>"
        )
    class_names = list(meta["heads"][head]["class_names"])
    if list(datamodule.class_names) != class_names:
        raise ValueError(
            f"head {head!r} predicts {class_names} but the datamodule's label set gives "
            f"{list(datamodule.class_names)}; use the label_set the model was trained with"
        )
    pos = positive_index(class_names)
    datamodule.prepare_data()
    datamodule.setup("test")

    precision = resolve_precision(precision, torch.device(device).type)
    val_logits, val_labels, _ = _split_logits(model, datamodule, "val", head, device, tta, progress, precision)
    test_logits, test_labels, test_rows = _split_logits(model, datamodule, "test", head, device, tta, progress,
                                                        precision)

    temperature = fit_temperature(val_logits, val_labels) if calibrate else 1.0
    val_probs = softmax(val_logits, temperature)
    op = None
    if pos is not None:
        op = threshold_for_sensitivity(val_probs[:, pos], val_labels == pos, target_sensitivity)
        log.info("operating point on val: melanoma probability >= %.4f (sensitivity %.3f, specificity %.3f)",
                 op["threshold"], op["sensitivity"], op["specificity"])

    probs = softmax(test_logits, temperature)
    raw_probs = softmax(test_logits)
    threshold = op["threshold"] if op else None
    metrics = classification_metrics(probs, test_labels, pos, threshold)
    metrics["ece_after_calibration"] = metrics.pop("ece")  # computed on the calibrated probs
    metrics.pop("nll")
    metrics.update({
        "ece_before_calibration": expected_calibration_error(raw_probs, test_labels),
        "nll_before_calibration": nll(test_logits, test_labels),
        "nll_after_calibration": nll(test_logits, test_labels, temperature),
    })
    report = {
        "checkpoint": str(ckpt_path),
        "dataset": datamodule.name,
        "head": head,
        "split": "test",
        "class_names": class_names,
        "positive_class": class_names[pos] if pos is not None else None,
        "tta": bool(tta),
        "temperature": float(temperature),
        "target_sensitivity": float(target_sensitivity) if op else None,
        **metrics,
        "val": {
            "n": int(val_labels.size),
            "nll_before_calibration": nll(val_logits, val_labels),
            "nll_after_calibration": nll(val_logits, val_labels, temperature),
            "ece_before_calibration": expected_calibration_error(softmax(val_logits), val_labels),
            "ece_after_calibration": expected_calibration_error(val_probs, val_labels),
            **({"sensitivity_at_threshold": op["sensitivity"], "specificity_at_threshold": op["specificity"]} if op else {}),
        },
    }
    report = _jsonable(report)
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2))
    predictions_table(test_rows, test_logits, probs, class_names, pos, threshold).to_csv(out_dir / "predictions.csv", index=False)

    figures = report_figures(probs, test_labels, class_names, pos, threshold, uncalibrated_probs=raw_probs)
    paths = {name: save_figure(fig, out_dir / f"{name}.png") for name, fig in figures.items()}
    update_checkpoint_meta(ckpt_path, head, temperature if calibrate else None, op)
    if wandb_run is not None:
        _log_wandb(wandb_run, report, paths)
    log.info("evaluation report written to %s (test AUROC %s, accuracy %.3f)", out_dir, report.get("auroc"), report["accuracy"])
    return report


def _log_wandb(run, report: dict, figure_paths: dict) -> None:
    import wandb

    scalars = {f"eval/{k}": v for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    images = {f"eval/{name}": wandb.Image(str(p)) for name, p in figure_paths.items()}
    run.log({**scalars, **images})
    for k, v in scalars.items():
        run.summary[k] = v
