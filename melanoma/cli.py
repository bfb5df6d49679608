"""`melanoma` command line: predict, evaluate, check-data, export.

    melanoma predict runs/.../best.ckpt photos/ --out results.csv --attention maps/
    melanoma evaluate runs/.../best.ckpt dataset=ham10000 dataset.root=/data/HAM10000
    melanoma check-data dataset=ph2 dataset.root=/data/PH2
    melanoma export runs/.../best.ckpt --format onnx --calibrated

`evaluate` and `check-data` take Hydra-style overrides of the training configs in conf/, so a
dataset is described exactly as for `python train.py`.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("melanoma.cli")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def conf_dir() -> Path:
    import melanoma

    return Path(melanoma.__file__).resolve().parents[1] / "conf"


def compose_config(overrides: list[str]):
    """The training config (conf/train.yaml) with `overrides`, through Hydra's compose API."""
    from hydra import compose, initialize_config_dir

    directory = conf_dir()
    if not (directory / "train.yaml").is_file():
        raise FileNotFoundError(
            f"training configs not found at {directory}; `evaluate` and `check-data` need the "
            f"repository's conf/ folder (install the package editable from a clone)"
        )
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"expected Hydra overrides like dataset=ham10000 or dataset.root=PATH, got {bad}")
    with initialize_config_dir(config_dir=str(directory), version_base="1.3", job_name="melanoma_cli"):
        return compose(config_name="train", overrides=list(overrides))


def build_datamodule(overrides: list[str], **forced):
    """Instantiate cfg.dataset; `forced` keyword arguments win over the config (the image size
    and normalisation a checkpoint was trained with)."""
    import hydra

    cfg = compose_config(overrides)
    return hydra.utils.instantiate(cfg.dataset, **forced)


# --- predict ------------------------------------------------------------------------------------

def _write_records(records: list[dict], out: Path | None, header: dict) -> None:
    columns = list(dict.fromkeys(k for r in records for k in r))
    if out is not None and out.suffix.lower() == ".json":
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**header, "predictions": records}, indent=2))
        return
    if out is None:
        writer = csv.DictWriter(sys.stdout, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)


def cmd_predict(args) -> int:
    from melanoma.data.io import find_images
    from melanoma.inference import Predictor

    if args.out is not None and args.out.suffix.lower() not in (".csv", ".json"):
        raise ValueError(f"--out must end in .csv or .json, got {args.out}")
    # Folders are searched for images; a file named explicitly is always tried, so a missing or
    # non-image file becomes a reported row (like a corrupt one) instead of stopping the batch.
    paths = []
    for item in args.images:
        paths.extend(find_images(item) if item.is_dir() else [item])
    paths = list(dict.fromkeys(paths))
    if not paths:
        raise FileNotFoundError(f"no image files (jpg/jpeg/png/bmp/tif) found in {[str(p) for p in args.images]}")
    predictor = Predictor(
        args.checkpoint, head=args.head, device=args.device, batch_size=args.batch_size,
        tta=args.tta, calibrated=not args.uncalibrated, progress=not args.quiet, precision=args.precision,
    )
    methods = args.attention_method or ["rollout"]
    records = predictor.predict_paths(paths, attention_dir=args.attention, attention_methods=methods)
    header = {
        "checkpoint": str(args.checkpoint), "head": predictor.head, "class_names": predictor.class_names,
        "temperature": predictor.temperature, "threshold": predictor.threshold, "tta": predictor.tta,
    }
    _write_records(records, args.out, header)
    failed = [r for r in records if r["error"]]
    for r in failed:
        print(f"melanoma predict: cannot read {r['path']}: {r['error']}", file=sys.stderr)
    done = len(records) - len(failed)
    print(f"melanoma predict: {done} of {len(records)} images predicted"
          + (f" -> {args.out}" if args.out else "")
          + (f"; attention maps in {args.attention}" if args.attention else "")
          + (f"; {len(failed)} unreadable (listed above)" if failed else ""), file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


# --- evaluate -----------------------------------------------------------------------------------

def cmd_evaluate(args) -> int:
    from melanoma.evaluation.report import evaluate_checkpoint
    from melanoma.models.classifier import Classifier

    # The image size and normalisation are the checkpoint's, whatever the dataset config says.
    _, meta = Classifier.from_checkpoint(args.checkpoint)
    dm = build_datamodule(args.overrides, image_size=meta["image_size"], mean=meta["mean"], std=meta["std"])
    out = args.out or Path(args.checkpoint).with_name(f"{Path(args.checkpoint).stem}_report_{dm.name}")
    metrics = evaluate_checkpoint(
        args.checkpoint, dm, out, calibrate=not args.no_calibration,
        target_sensitivity=args.target_sensitivity, tta=args.tta, device=args.device, head=args.head,
        progress=not args.quiet, precision=args.precision,
    )
    keys = ["n", "accuracy", "balanced_accuracy", "auroc", "average_precision", "sensitivity_argmax",
            "specificity_argmax", "threshold", "sensitivity_at_threshold", "specificity_at_threshold",
            "temperature", "ece_before_calibration", "ece_after_calibration"]
    print(f"test split of {dm.name} (head {metrics['head']}):")
    for k in keys:
        if k in metrics:
            v = metrics[k]
            print(f"  {k:<26} {v:.4f}" if isinstance(v, float) else f"  {k:<26} {v}")
    print(f"report written to {out}; temperature and operating point stored in {args.checkpoint}")
    return EXIT_OK


# --- check-data ---------------------------------------------------------------------------------

def cmd_check_data(args) -> int:
    from melanoma.data.check import check_dataset

    dm = build_datamodule(args.overrides)
    bad = check_dataset(dm, progress=not args.quiet)
    n = len(dm.image_paths())
    for path, reason in bad:
        print(f"{path}: {reason}")
    print(f"{dm.name}: {n - len(bad)} of {n} images readable"
          + (f", {len(bad)} unreadable (listed above): replace or remove them" if bad else ""), file=sys.stderr)
    return EXIT_FAILED if bad else EXIT_OK


# --- export -------------------------------------------------------------------------------------

def cmd_export(args) -> int:
    from melanoma.evaluation.export import export_onnx

    info = export_onnx(args.checkpoint, out=args.out, head=args.head, calibrated=args.calibrated)
    print(f"exported {info['path']} (head {info['head']}, classes {info['class_names']}, "
          f"input (batch, 3, {info['image_size']}, {info['image_size']}), "
          f"max |onnxruntime - torch| = {info['max_abs_diff']:.1e}); metadata in {info['path']}.json")
    return EXIT_OK


# --- parser -------------------------------------------------------------------------------------

def _add_precision(p: argparse.ArgumentParser) -> None:
    from melanoma.precision import AUTO, PRECISIONS

    p.add_argument("--precision", choices=PRECISIONS, default=AUTO,
                   help="forward-pass precision; auto: bf16-mixed on bf16 GPUs and AMX/AVX512-BF16 "
                        "CPUs, 16-mixed on older GPUs, 32-true otherwise (default auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="melanoma", description="Vision Transformers for melanoma classification.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors, no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("predict", parents=[common], help="predict image files or folders with a trained checkpoint",
                       description="Per image: predicted class, every class probability, the melanoma "
                                   "probability and the decision at the checkpoint's operating point. "
                                   "Unreadable files are reported (output and stderr) and the rest predicted; "
                                   "the exit status is then 1.")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGES_OR_FOLDERS")
    p.add_argument("--head", help="which dataset head to use (default: the checkpoint's active head)")
    p.add_argument("--out", type=Path, help="results .csv or .json (default: CSV on stdout)")
    p.add_argument("--attention", type=Path, metavar="DIR", help="write attention-map PNGs into DIR")
    p.add_argument("--attention-method", action="append", choices=["rollout", "grad_rollout", "last_layer"],
                   help="map(s) drawn with --attention (repeatable; default rollout). The per-head "
                        "grid of the last layer is always written")
    p.add_argument("--tta", action="store_true", help="average over the 8 flips/rotations")
    p.add_argument("--uncalibrated", action="store_true", help="ignore the stored temperature")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--batch-size", type=int, default=32)
    _add_precision(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", parents=[common], help="calibrate on val, choose the operating point, report test",
                       description="Writes metrics.json, predictions.csv and figures, and stores the "
                                   "temperature and operating point in the checkpoint.")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. dataset=ham10000 dataset.root=PATH")
    p.add_argument("--out", type=Path, help="report folder (default: <checkpoint>_report_<dataset> beside it)")
    p.add_argument("--head", help="head to evaluate (default: the dataset's name)")
    p.add_argument("--target-sensitivity", type=float, default=0.95)
    p.add_argument("--no-calibration", action="store_true", help="do not fit or store a temperature")
    p.add_argument("--tta", action="store_true")
    p.add_argument("--device", default="cpu")
    _add_precision(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("check-data", parents=[common], help="decode every image of a dataset and list unreadable ones")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. dataset=ph2 dataset.root=PATH")
    p.set_defaults(func=cmd_check_data)

    p = sub.add_parser("export", parents=[common], help="export one head to ONNX, verified with onnxruntime")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument("--head", help="default: the checkpoint's active head")
    p.add_argument("--calibrated", action="store_true", help="fold the stored temperature into the graph")
    p.add_argument("--out", type=Path, help="default: the checkpoint's path with .onnx")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        # expected user errors: one clear line, no traceback (set MELANOMA_DEBUG=1 for one)
        import os

        if os.environ.get("MELANOMA_DEBUG"):
            raise
        print(f"melanoma {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, (ValueError, KeyError, FileNotFoundError)) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
