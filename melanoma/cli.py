"""`melanoma` command line: predict, evaluate, zero-shot, recalibrate, summarize, check-data, export, serve.

    melanoma predict runs/.../best.ckpt photos/ --out results.csv --attention maps/
    melanoma evaluate runs/.../best.ckpt [dataset.root=/data/HAM10000]
    melanoma evaluate runs/.../best.ckpt dataset=ph2 dataset.root=/data/PH2 --external
    melanoma zero-shot model=open_clip model.backbone.name=ViT-B-16 model.pretrained=DIR dataset=ph2 --out zs.ckpt
    melanoma summarize runs/train/multirun/<stamp>        # k-fold or sweep: summary.json/.md
    melanoma recalibrate runs/.../best.ckpt dataset=ph2 dataset.root=/data/PH2 --fraction 0.5 --out ph2.ckpt
    melanoma check-data dataset=ph2 dataset.root=/data/PH2
    melanoma export runs/.../best.ckpt --format onnx
    melanoma serve runs/.../best.ckpt --port 8000

`evaluate --external` and `check-data` take Hydra-style overrides of the training configs in
conf/, so a dataset is described exactly as for `python train.py`.
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
#: decimals of the numbers `predict` prints on a terminal
STDOUT_DIGITS = 4


# --- predict ------------------------------------------------------------------------------------

def _write_records(records: list[dict], out: Path | None, header: dict) -> None:
    from melanoma.predict.predictor import MAPS_FIELD

    # the map files by method repeat the `attention` column, for programs: not written out
    records = [{k: v for k, v in r.items() if k != MAPS_FIELD} for r in records]
    columns = list(dict.fromkeys(k for r in records for k in r))
    if out is not None and out.suffix.lower() == ".json":
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**header, "predictions": records}, indent=2))
        return
    if out is None:
        writer = csv.DictWriter(sys.stdout, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        if sys.stdout.isatty():  # for reading: rounded (a pipe, like an --out file, keeps full precision)
            records = [{k: round(v, STDOUT_DIGITS) if isinstance(v, float) else v for k, v in r.items()}
                       for r in records]
        writer.writerows(records)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)


def cmd_predict(args) -> int:
    from melanoma.data.io import find_images
    from melanoma.predict import Predictor

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
        announce=False,  # its warnings are printed below, once
    )
    methods = args.attention_method or None  # None: the backbone's default (rollout for ViTs, gradcam for CNNs)
    metadata, notes = None, []
    if args.metadata is not None:
        from melanoma.metadata import read_metadata_table

        if predictor.metadata_schema is None:
            raise ValueError(f"--metadata: head {predictor.head!r} of {args.checkpoint} was trained on images alone "
                             f"and takes no patient metadata; leave out --metadata")
        metadata, notes = read_metadata_table(args.metadata, paths, predictor.metadata_schema.fields)
    elif predictor.metadata_schema is not None:
        notes = [f"head {predictor.head!r} takes patient metadata {list(predictor.metadata_schema.fields)} and no "
                 f"--metadata table was given: every value is scored as missing"]
    records = predictor.predict_paths(paths, attention_dir=args.attention, attention_methods=methods,
                                      metadata=metadata)
    header = {
        "checkpoint": str(args.checkpoint), "head": predictor.head, "class_names": predictor.class_names,
        "calibrated": predictor.calibrated, "temperature": predictor.temperature, "threshold": predictor.threshold,
        # the whole map softmax(logits / T + bias) and where it was fitted (a site recalibration names its sample)
        "calibration": None if predictor.calibration is None else {
            "method": predictor.calibration.method, "bias": list(predictor.calibration.bias),
            "fitted_on": predictor.calibration.fitted_on},
        "target_sensitivity": predictor.target_sensitivity, "tta": predictor.tta, "precision": predictor.precision,
    }
    if predictor.metadata_schema is not None:
        header["metadata"] = predictor.metadata_schema.to_dict()
    _write_records(records, args.out, header)
    for note in notes:
        print(f"melanoma predict: metadata: {note}", file=sys.stderr)
    if predictor.metadata_schema is not None:
        counts = {f: sum(f in (r.get("metadata_missing") or "").split(";") for r in records if not r["error"])
                  for f in predictor.metadata_schema.fields}
        print(f"melanoma predict: metadata values missing (scored as missing), per field: {counts}", file=sys.stderr)
    for warning in (predictor.data_warning, predictor.calibration_warning):
        if warning:
            print(f"melanoma predict: WARNING: head {predictor.head!r}: {warning}", file=sys.stderr)
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
    from melanoma.workflows.datasets import external_datamodule, training_datamodule
    from melanoma.models.checkpoint import Checkpoint
    from melanoma.workflows.evaluate import evaluate_checkpoint, evaluate_external
    from melanoma.workflows.report import format_metrics
    from melanoma.workflows.seen import overlap_message

    checkpoint = Checkpoint.read(args.checkpoint)  # the one read of the file; passed down from here
    meta = checkpoint.meta
    head = meta.choose_head(args.head)
    stem = Path(args.checkpoint)
    if args.external:
        dm = external_datamodule(meta, args.overrides)
        out = args.out or stem.with_name(f"{stem.stem}_external_{dm.name}")
        metrics = evaluate_external(checkpoint, dm, out, head=head, tta=args.tta, device=args.device,
                                    progress=not args.quiet, precision=args.precision, keep_overlap=args.keep_overlap)
        mapped = " (labels mapped to melanoma vs rest)" if metrics["labels_mapped_to_melanoma_vs_rest"] else ""
        print(f"overlap: {overlap_message(metrics['overlap'])}")
        print(f"external test set {dm.name}, {metrics['n']} images (head {head}){mapped}:")
        print(format_metrics(metrics))
        print(f"report written to {out}; nothing was fitted and {args.checkpoint} is unchanged")
        return EXIT_OK
    dm = training_datamodule(meta.heads[head].data, head, args.overrides, meta.preprocessing)
    out = args.out or stem.with_name(f"{stem.stem}_report_{dm.name}")
    metrics = evaluate_checkpoint(
        checkpoint, dm, out, calibrate=not args.no_calibration,
        target_sensitivity=args.target_sensitivity, tta=args.tta, device=args.device, head=head,
        progress=not args.quiet, precision=args.precision,
    )
    print(f"test split of {dm.name} as trained (head {head}; {metrics['n']} images):")
    print(format_metrics(metrics))
    print(f"report written to {out}; calibration and operating point{' (TTA)' if args.tta else ''} "
          f"stored in {args.checkpoint}")
    return EXIT_OK


# --- zero-shot ----------------------------------------------------------------------------------

def cmd_zero_shot(args) -> int:
    from melanoma.workflows.report import format_metrics
    from melanoma.workflows.zero_shot import zero_shot

    ckpt, metrics = zero_shot(args.overrides, args.out, args.report, prompts=args.prompts, external=args.external,
                              target_sensitivity=args.target_sensitivity, device=args.device,
                              progress=not args.quiet, precision=args.precision)
    where = "every image, uncalibrated (nothing fitted)" if args.external else "test split, calibrated on val"
    print(f"zero-shot {metrics['dataset']} ({where}; {metrics['n']} images):")
    print(format_metrics(metrics))
    print(f"checkpoint {ckpt} (predict, evaluate, export and serve take it); report written to {metrics['report_dir']}")
    return EXIT_OK


# --- summarize ----------------------------------------------------------------------------------

def cmd_summarize(args) -> int:
    from melanoma.evaluation.bootstrap import format_ci
    from melanoma.workflows.summarize import SUMMARY_JSON, SUMMARY_MD, summarize

    out = args.out or args.run_dir
    s = summarize(args.run_dir, out, target_sensitivity=args.target_sensitivity)
    print(f"{s['n_jobs']} jobs; swept: {', '.join(s['swept_keys']) or 'nothing'}")
    for group in s.get("groups", [s]):
        for part, name in (("oof", "out-of-fold"), ("ensemble_test", "fold-ensemble test")):
            if part in group:
                m = group[part]
                print(f"{name} auroc {format_ci(m['auroc'], m['ci95'].get('auroc'))} (n {m['n']})")
    print(f"written to {out}: {SUMMARY_JSON}, {SUMMARY_MD}, tables and figures")
    return EXIT_OK


# --- recalibrate --------------------------------------------------------------------------------

def cmd_recalibrate(args) -> int:
    from melanoma.evaluation.bootstrap import format_ci
    from melanoma.workflows.datasets import external_datamodule
    from melanoma.workflows.recalibrate import recalibrate_checkpoint
    from melanoma.workflows.seen import overlap_message
    from melanoma.models.checkpoint import Checkpoint

    checkpoint = Checkpoint.read(args.checkpoint)
    head = checkpoint.meta.choose_head(args.head)
    dm = external_datamodule(checkpoint.meta, args.overrides)
    report_dir = args.report or args.out.with_name(f"{args.out.stem}_recalibration_{dm.name}")
    r = recalibrate_checkpoint(checkpoint, dm, args.out, report_dir, fraction=args.fraction, seed=args.seed,
                               target_sensitivity=args.target_sensitivity, head=head, device=args.device,
                               progress=not args.quiet, precision=args.precision, keep_overlap=args.keep_overlap)
    print(f"overlap: {overlap_message(r['overlap'])}")
    s = r["sample"]
    print(f"{dm.name}: calibration ({r['calibration']}) and operating point fitted on a sample of {s['n']} images "
          f"({s['melanomas']} melanomas); reported on the other {r['test_part']['n']} "
          f"({r['test_part']['melanomas']} melanomas), target sensitivity {r['target_sensitivity']}:")
    for name, pt in r["operating_points"].items():
        print(f"  {name:<46} threshold {pt['threshold']:.4f}  sensitivity "
              f"{format_ci(pt['sensitivity'], pt['ci95']['sensitivity'])}  specificity "
              f"{format_ci(pt['specificity'], pt['ci95']['specificity'])}")
    ci = r["ci95_calibration"]
    for key in ("ece_melanoma_before_calibration", "ece_melanoma_after_calibration"):
        print(f"  {key:<46} {format_ci(r[key], ci[key])}")
    print(f"new checkpoint {args.out}; report in {report_dir}; {args.checkpoint} is unchanged")
    return EXIT_OK


# --- check-data ---------------------------------------------------------------------------------

def _dataset_groups(overrides: list[str]) -> list[list[str]]:
    """`dataset=A dataset.root=X dataset=B ...` cut into one override list per dataset."""
    groups: list[list[str]] = []
    for o in overrides:
        if o.startswith("dataset=") or not groups:
            groups.append([])
        groups[-1].append(o)
    return groups


def cmd_duplicates(args) -> int:
    from melanoma.workflows.datasets import datamodule_from_overrides
    from melanoma.data.duplicates import (DUPLICATES_FILE, MONTAGE_FILE, duplicate_counts, duplicate_montage,
                                          duplicate_pairs)

    tables, fingerprints = {}, {}
    for group in _dataset_groups(args.overrides):
        dm = datamodule_from_overrides(group)
        for name, member in (getattr(dm, "members", None) or {dm.name: dm}).items():
            if name in tables:
                raise ValueError(f"dataset {name} is named twice; give each dataset once")
            table = member._make_table()
            tables[name], fingerprints[name] = table, member.fingerprints(table["path"].tolist())
    pairs = duplicate_pairs(tables, fingerprints)
    out = args.out or Path("duplicates")
    out.mkdir(parents=True, exist_ok=True)
    pairs.to_csv(out / DUPLICATES_FILE, index=False)
    montage = duplicate_montage(pairs, out / MONTAGE_FILE)
    print(duplicate_counts(tables, pairs).to_string(index=False))
    print(f"{len(pairs)} matched pair(s) in {out / DUPLICATES_FILE}"
          + (f"; closest and borderline pairs in {montage}" if montage else ""), file=sys.stderr)
    return EXIT_OK


def cmd_check_data(args) -> int:
    from melanoma.data.check import check_images, dataset_image_paths
    from melanoma.workflows.datasets import datamodule_from_overrides

    if args.duplicates:
        return cmd_duplicates(args)
    dm = datamodule_from_overrides(args.overrides)
    # a joint config: every member's images, then the images one member holds out (val/test) that
    # another trains on (a leak that training drops from train by default)
    members = getattr(dm, "members", None) or {dm.name: dm}
    failed = False
    for name, member in members.items():
        # the paths without setup(): with a cache configured, setup() builds the cache and would
        # stop at the first unreadable image
        paths = dataset_image_paths(member)
        bad = check_images(paths, progress=not args.quiet)
        failed |= bool(bad)
        for path, reason in bad:
            print(f"{path}: {reason}")
        print(f"{name}: {len(paths) - len(bad)} of {len(paths)} images readable"
              + (f", {len(bad)} unreadable (listed above): replace or remove them" if bad else ""), file=sys.stderr)
    if len(members) > 1 and not failed:
        from melanoma.data.overlap import cross_dataset_overlap

        tables = {n: m.table if m.table is not None else m._make_table() for n, m in members.items()}
        overlap = cross_dataset_overlap(tables, {n: members[n].fingerprints(t["path"].tolist()) for n, t in tables.items()})
        print(f"{dm.name}: {len(overlap)} image(s) held out (val/test) in one member are in another's train split"
              + (" (dropped from train when training, unless dataset.drop_overlap=false):" if len(overlap) else ""),
              file=sys.stderr)
        if len(overlap):
            print(overlap.to_string(index=False))
    return EXIT_FAILED if failed else EXIT_OK


# --- export -------------------------------------------------------------------------------------

def cmd_export(args) -> int:
    from melanoma.predict.export import export_onnx

    info = export_onnx(args.checkpoint, out=args.out, head=args.head, calibrated=not args.uncalibrated)
    print(f"exported {info['path']} (head {info['head']}, classes {info['class_names']}, "
          f"input (batch, 3, {info['image_size']}, {info['image_size']}), "
          f"max |onnxruntime - torch| = {info['max_abs_diff']:.1e}); metadata in {info['path']}.json")
    return EXIT_OK


# --- serve --------------------------------------------------------------------------------------

def cmd_serve(args) -> int:
    from melanoma.serve import ServeLimits, run_server

    limits = ServeLimits(max_files=args.max_files, max_bytes=args.max_bytes, max_pixels=args.max_pixels)
    run_server(args.checkpoint, host=args.host, port=args.port, head=args.head, device=args.device,
               limits=limits, quiet=args.quiet)
    return EXIT_OK


# --- parser -------------------------------------------------------------------------------------

def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")


def _add_precision(p: argparse.ArgumentParser) -> None:
    from melanoma.precision import AUTO, PRECISIONS

    p.add_argument("--precision", choices=PRECISIONS, default=AUTO,
                   help="forward-pass precision; auto: 32-true on every device, so decisions are the same "
                        "everywhere and at the precision the calibration was fitted at; lower precision only "
                        "when asked (default auto)")


def _add_keep_overlap(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep-overlap", action="store_true",
                   help="score the images the model has seen (by id or content) instead of excluding them; "
                        "the report then warns that its numbers are not external")


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default where it has a real one and the help text does not say it
    already (argparse's ArgumentDefaultsHelpFormatter would also print "(default: None)")."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (action.option_strings and default is not None and default is not False
                and default != argparse.SUPPRESS
                and "default" not in text and "%(default)" not in text):
            text += " (default: %(default)s)"
        return text


#: `melanoma train` is not a subcommand: training is Hydra's `python train.py` (conf/ overrides)
TRAIN_POINTER = ("training is not a `melanoma` subcommand: run `python train.py` from the repository "
                 "(Hydra overrides of conf/), e.g. `python train.py experiment=quickstart` or "
                 "`python train.py dataset=ham10000 dataset.root=/data/HAM10000`")


def build_parser() -> argparse.ArgumentParser:
    from melanoma.conventions import ALL_MAP_METHODS, DEFAULT_TARGET_SENSITIVITY  # torch-free: --help stays fast
    from melanoma import __version__

    parser = argparse.ArgumentParser(
        prog="melanoma", formatter_class=_HelpFormatter,
        description="Vision Transformers for melanoma classification: use a trained checkpoint. "
                    "Training is `python train.py ...` (see README).")
    parser.add_argument("--version", action="version", version=f"melanoma {__version__}")
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
    p.add_argument("--attention-method", action="append", choices=list(ALL_MAP_METHODS),
                   help="map(s) drawn with --attention (repeatable); they follow the backbone: rollout "
                        "(default), grad_rollout, last_layer for ViTs (ours and timm's; the per-head grid of "
                        "the last layer is always written), gradcam (default) for CNNs")
    p.add_argument("--tta", action="store_true", help="average over the 8 flips/rotations")
    p.add_argument("--uncalibrated", action="store_true",
                   help="show raw (uncalibrated) probabilities; the threshold column is mapped onto that "
                        "scale (two-class heads) and decisions stay the calibrated ones")
    _add_device(p)
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--metadata", type=Path, metavar="TABLE.csv",
                   help="patient metadata for a checkpoint trained with it (model.fusion): a column image (file "
                        "name or path) and a column per field (age, sex, site); a missing row or value is scored "
                        "as missing and said so")
    _add_precision(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", parents=[common], help="calibrate on val, choose the operating point, report test",
                       description="On the data the head was trained on: rebuilds exactly the split the "
                                   "checkpoint recorded (pass dataset.root=DIR if the data moved; overrides "
                                   "that change the split are refused), fits the calibration and the "
                                   "operating point on val, stores them in the checkpoint and reports test. "
                                   "With --external: every image of a dataset the model never trained on is "
                                   "a test image, the stored calibration is used as it is and the checkpoint "
                                   "is not changed. Writes metrics.json (with 95% bootstrap intervals), "
                                   "predictions.csv and figures.")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("overrides", nargs="*", help="Hydra overrides: dataset.root=PATH (and loader settings); "
                                                "with --external, dataset=NAME dataset.root=PATH")
    p.add_argument("--out", type=Path, help="report folder (default: beside the checkpoint)")
    p.add_argument("--head", help="head to evaluate (default: the checkpoint's active head)")
    p.add_argument("--external", action="store_true",
                   help="test on a dataset the model never trained on, with the stored calibration")
    p.add_argument("--target-sensitivity", type=float, default=DEFAULT_TARGET_SENSITIVITY,
                   help="the operating point: the lowest threshold whose val sensitivity reaches this")
    _add_keep_overlap(p)
    p.add_argument("--no-calibration", action="store_true",
                   help="store temperature 1 (no calibration) with the operating point fitted on it")
    p.add_argument("--tta", action="store_true",
                   help="8-view TTA; the calibration fitted with it is stored beside the plain one")
    _add_device(p)
    _add_precision(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("zero-shot", parents=[common], help="zero-shot classification by a CLIP-style model, reported",
                       description="Builds a zero-shot classifier from an open_clip model (the image tower, and a "
                                   "head of the class prompts' text embeddings: conf/prompts/), writes it as a "
                                   "checkpoint (predict, evaluate, export and serve take it), then reports it as a "
                                   "trained head is reported: calibration and operating point fitted on the "
                                   "dataset's val split, test reported with 95% intervals. With --external: every "
                                   "image is a test image and nothing is fitted. Example: melanoma zero-shot "
                                   "model=open_clip model.backbone.name=ViT-B-16 model.pretrained=DIR "
                                   "dataset=ham10000 dataset.root=DATA --out zs.ckpt")
    p.add_argument("overrides", nargs="+", help="Hydra overrides as for train.py: model=open_clip "
                                                "model.backbone.name=... model.pretrained=... dataset=NAME "
                                                "dataset.root=PATH [dataset.label_set=...]")
    p.add_argument("--out", type=Path, required=True, help="the zero-shot checkpoint to write (.ckpt)")
    p.add_argument("--report", type=Path, help="report folder (default: beside the checkpoint)")
    p.add_argument("--prompts", help="prompt set: a name in conf/prompts/ or a YAML file (default dermatology)")
    p.add_argument("--external", action="store_true",
                   help="report every image of the dataset, uncalibrated (no val split used)")
    p.add_argument("--target-sensitivity", type=float, default=DEFAULT_TARGET_SENSITIVITY,
                   help="the operating point: the lowest threshold whose val sensitivity reaches this")
    _add_device(p)
    _add_precision(p)
    p.set_defaults(func=cmd_zero_shot)

    p = sub.add_parser("summarize", parents=[common], help="sum up a multirun: k-fold out-of-fold and ensemble, or a sweep",
                       description="Reads every job of a `python train.py -m ...` folder and writes summary.json, "
                                   "summary.md and figures: per-job metrics and mean +- sd; for k-fold "
                                   "(dataset.fold swept) the pooled out-of-fold validation predictions and the "
                                   "fold ensemble on the test split, with 95% bootstrap intervals.")
    p.add_argument("run_dir", type=Path, metavar="MULTIRUN_DIR")
    p.add_argument("--out", type=Path, help="where to write (default: MULTIRUN_DIR)")
    p.add_argument("--target-sensitivity", type=float, default=DEFAULT_TARGET_SENSITIVITY,
                   help="the out-of-fold operating point's sensitivity (chosen on the pooled predictions)")
    p.set_defaults(func=cmd_summarize)
    p = sub.add_parser("recalibrate", parents=[common], help="refit calibration and threshold on a new site's sample",
                       description="For a dataset the model never trained on (a new site): draws a stratified "
                                   "sample (whole lesions/patients where the dataset has groups), fits the "
                                   "calibration map and the operating point at the target sensitivity on it, "
                                   "writes them into a copy of the checkpoint (--out; the input is not "
                                   "changed) and reports the other images: the original, the recalibrated "
                                   "and an oracle (optimistic) operating point, with 95% bootstrap intervals.")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("overrides", nargs="*", help="dataset=NAME dataset.root=PATH (Hydra overrides, as for training)")
    p.add_argument("--out", type=Path, required=True, help="the recalibrated checkpoint to write")
    p.add_argument("--fraction", type=float, default=0.2, help="share of the site's images used to recalibrate")
    p.add_argument("--seed", type=int, default=0, help="which sample is drawn")
    p.add_argument("--target-sensitivity", type=float, default=DEFAULT_TARGET_SENSITIVITY,
                   help="the recalibrated operating point's sensitivity on the sample")
    p.add_argument("--head", help="default: the checkpoint's active head")
    p.add_argument("--report", type=Path, help="report folder (default: beside --out)")
    _add_keep_overlap(p)
    _add_device(p)
    _add_precision(p)
    p.set_defaults(func=cmd_recalibrate)

    p = sub.add_parser("check-data", parents=[common], help="decode every image of a dataset and list unreadable ones",
                       description="Builds the dataset described by the overrides (as `python train.py` "
                                   "would), decodes every image at full size and lists the unreadable ones "
                                   "(exit status 1 if any). For dataset=joint it also lists images one member "
                                   "holds out (val/test) that another member trains on, by ISIC id and by content. "
                                   "With --duplicates it audits near-duplicates instead.")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. dataset=ph2 dataset.root=PATH; with "
                   "--duplicates, several datasets: dataset=A dataset.root=X dataset=B dataset.root=Y")
    p.add_argument("--duplicates", action="store_true",
                   help="audit near-duplicates by content: clusters within each dataset and pairs across them "
                        "(duplicates.csv, a table of counts, a montage PNG of the closest and borderline pairs)")
    p.add_argument("--out", type=Path, help="with --duplicates: the folder to write (default: ./duplicates)")
    p.set_defaults(func=cmd_check_data)

    p = sub.add_parser("export", parents=[common], help="export one head to ONNX, verified with onnxruntime",
                       description="Writes one head of a checkpoint as an ONNX model (input: normalised "
                                   "images; output: class probabilities) and a .json sidecar with the class "
                                   "names, preprocessing and threshold, after checking onnxruntime's output "
                                   "against torch's on the same input.")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--format", choices=["onnx"], default="onnx", help="the export format")
    p.add_argument("--head", help="default: the checkpoint's active head")
    p.add_argument("--uncalibrated", action="store_true",
                   help="probabilities output without the stored calibration (default: calibrated, as "
                        "`melanoma predict` shows them); the sidecar's threshold is mapped onto that scale")
    p.add_argument("--out", type=Path, help="default: the checkpoint's path with .onnx")
    p.set_defaults(func=cmd_export)

    from melanoma.serve.limits import DEFAULT_HOST, DEFAULT_PORT, ServeLimits

    limits = ServeLimits()
    p = sub.add_parser("serve", parents=[common], help="a local web page and JSON API to try a checkpoint",
                       description="Serves a page (drop lesion photos, see the decision and the attention "
                                   "overlay) and POST /api/predict, GET /api/model, GET /healthz. Needs the "
                                   "serve extra. A research tool, not a diagnosis.")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default {DEFAULT_HOST}: this machine only; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port")
    p.add_argument("--head", help="default head (default: the checkpoint's active head); the page can switch")
    _add_device(p)
    p.add_argument("--max-files", type=int, default=limits.max_files, help="images per request")
    p.add_argument("--max-bytes", type=int, default=limits.max_bytes, help="request body size")
    p.add_argument("--max-pixels", type=int, default=limits.max_pixels, help="pixels per image (decompression bombs)")
    p.set_defaults(func=cmd_serve)
    for p in sub.choices.values():  # sub-parsers do not inherit the formatter
        p.formatter_class = _HelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        print(f"melanoma: {TRAIN_POINTER}", file=sys.stderr)
        return EXIT_USAGE
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
