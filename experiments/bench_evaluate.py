"""What bootstrap intervals add to `melanoma evaluate`, on the HAM10000 test split, CPU.

A random-weight vit_tiny at 224 px (head classes not_melanoma / melanoma) on the shared
HAM10000 (lesion-grouped default split). Timed, in one run:
  (a) the logits pass over the test split (Predictor.logits_of_paths, what evaluate runs: decode, resize, forward),
  (b) the point metrics (metrics.classification_metrics),
  (c) the bootstrap intervals (bootstrap.bootstrap, 1,000 resamples, grouped by lesion).
(a) runs once (it dominates and is the same work `evaluate` does); (b) and (c) are repeated and
their medians taken. Wall time and this process's CPU time (all threads) are both reported:
on a machine shared with other jobs CPU time is the steadier measure.

    python experiments/bench_evaluate.py [--quick] [--out experiments/results/bench_evaluate.md]

Target (trustworthy-results issue): (a+b+c)/(a+b) < 1.10.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import tempfile

from bench_predict import cpu_name
from melanoma.data.ham10000 import HAM10000DataModule
from melanoma.evaluation.bootstrap import N_RESAMPLES, bootstrap
from melanoma.models.checkpoint import softmax
from melanoma.models.checkpoint_io import build_classifier, save_classifier_checkpoint
from melanoma.evaluation.metrics import classification_metrics
from melanoma.evaluation.operating_point import threshold_for_sensitivity
from melanoma.predict import Predictor
from melanoma.conventions import positive_index

CLASS_NAMES = ["not_melanoma", "melanoma"]
TARGET = 1.10
QUICK_IMAGES = 64


def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path,
                    default=Path(os.environ.get("MELANOMA_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "HAM10000")
    ap.add_argument("--quick", action="store_true", help=f"smoke run: the first {QUICK_IMAGES} test images")
    ap.add_argument("--resamples", type=int, default=N_RESAMPLES)
    ap.add_argument("--rounds", type=int, default=5, help="repeats of (b) and (c)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1, help="data-loader workers")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", type=Path, help="also write the result (markdown) here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    dm = HAM10000DataModule(args.root, image_size=224, eval_batch_size=args.batch_size, num_workers=args.workers)
    dm.setup()
    rows = dm.split_table("test")
    if args.quick:
        rows = rows.iloc[:QUICK_IMAGES]
    torch.manual_seed(0)
    model = build_classifier("vit_tiny", {"img_size": 224}, {dm.name: CLASS_NAMES})
    ckpt = save_classifier_checkpoint(Path(tempfile.mkdtemp()) / "bench.ckpt", model, "vit_tiny", {"img_size": 224},
                                      image_size=224)
    predictor = Predictor(ckpt, batch_size=args.batch_size, progress=False, announce=False)
    pos = positive_index(CLASS_NAMES)
    groups = rows["group"].to_numpy()
    labels = rows["label"].to_numpy()

    logits, a_wall, a_cpu = timed(lambda: predictor.logits_of_paths(rows["path"].tolist(), num_workers=args.workers))
    probs = softmax(logits)
    # the report picks the operating point on val; any realistic threshold costs the same here
    threshold = threshold_for_sensitivity(probs[:, pos], labels == pos)["threshold"]
    b_wall, b_cpu, c_wall, c_cpu = [], [], [], []
    for _ in range(args.rounds):  # interleaved so load from other jobs hits both alike
        _, w, c = timed(lambda: classification_metrics(probs, labels, pos, threshold))
        b_wall.append(w), b_cpu.append(c)
        result, w, c = timed(lambda: bootstrap(probs, labels, pos, threshold, groups=groups, n_resamples=args.resamples))
        c_wall.append(w), c_cpu.append(c)
    b_wall, b_cpu = statistics.median(b_wall), statistics.median(b_cpu)
    c_wall, c_cpu = statistics.median(c_wall), statistics.median(c_cpu)

    n, n_groups, n_mel = len(labels), len(np.unique(groups)), int((labels == pos).sum())
    stages = [
        ("(a) logits pass (Predictor.logits_of_paths)", a_wall, a_cpu),
        ("(b) point metrics (classification_metrics)", b_wall, b_cpu),
        (f"(c) bootstrap intervals ({args.resamples} resamples, {n_groups} lesions)", c_wall, c_cpu),
    ]
    ratio_wall = (a_wall + b_wall + c_wall) / (a_wall + b_wall)
    ratio_cpu = (a_cpu + b_cpu + c_cpu) / (a_cpu + b_cpu)
    table = "\n".join(
        ["| stage | wall s | CPU s | ms/image (wall) |", "|---|---:|---:|---:|"]
        + [f"| {name} | {w:.3f} | {c:.3f} | {w / n * 1000:.2f} |" for name, w, c in stages]
        + [f"| (a+b+c)/(a+b) | {ratio_wall:.4f} | {ratio_cpu:.4f} | |"]
    )
    verdict = (f"bootstrap adds {100 * (ratio_wall - 1):.2f}% wall, {100 * (ratio_cpu - 1):.2f}% CPU to evaluate -> "
               f"{'meets' if max(ratio_wall, ratio_cpu) < TARGET else 'MISSES'} the <{100 * (TARGET - 1):.0f}% target")
    header = (f"{n} test images ({n_mel} melanomas, {n_groups} lesions){' [--quick]' if args.quick else ''}; "
              f"vit_tiny 224 px, random weights; batch {args.batch_size}, {args.workers} loader worker(s), "
              f"{args.threads} torch threads")
    print(header)
    print(table)
    print(verdict)
    print("intervals (random weights, for shape only): " +
          ", ".join(f"{k} [{lo:.3f}, {hi:.3f}]" for k, (lo, hi) in result.intervals.items()))
    if args.out:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or "?"
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            f"# Bootstrap intervals in `melanoma evaluate`, CPU\n\n"
            f"{stamp}, commit {commit}; {cpu_name()}, {os.cpu_count()} cores, load average {load} at the end; "
            f"torch {torch.__version__}.\n\n"
            f"`python experiments/bench_evaluate.py {' '.join(sys.argv[1:])}`\n\n"
            f"{header}. (a) once; (b), (c) median of {args.rounds} interleaved rounds.\n\n{table}\n\n- {verdict}\n"
        )


if __name__ == "__main__":
    main()
