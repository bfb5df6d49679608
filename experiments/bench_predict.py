"""Throughput of `melanoma predict` on CPU, plain and with attention maps (--attention).

Random-weight DeiT checkpoints (vit_tiny, vit_base at 224 px) and generated lesion JPEGs. The
code timed is Predictor.predict_paths, the whole of `melanoma predict` except interpreter start,
checkpoint loading and writing the results file (the same for every variant): decoding, resizing,
the forward pass and, with maps, rollout and the PNG files. Variants run interleaved, several
rounds, median per variant, so load from other jobs on the machine hits all of them alike. Wall
time and this process's CPU time (all its threads) are both reported: on a machine shared with
other jobs, CPU time per image is the steadier measure of what each variant costs.

    python experiments/bench_predict.py [--models vit_tiny vit_base] [--images 32] [--rounds 3]

Target (issue 5): maps cost at most 1.5x plain prediction.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from melanoma.data.synthetic import render_lesion
from melanoma.models.checkpoint_io import build_classifier, save_classifier_checkpoint
from melanoma.predict import Predictor

VARIANTS = {
    # name: (attention_dir?, methods, PNGs written?)
    "plain": (False, (), False),
    "maps computed, no PNG (rollout + last layer)": (True, ("rollout",), False),
    "attention maps (rollout + head grid)": (True, ("rollout",), True),
    "attention maps (rollout + grad rollout + head grid)": (True, ("rollout", "grad_rollout"), True),
}
TARGET = "attention maps (rollout + head grid)"


def write_images(folder: Path, n: int, size: int = 450) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img, _ = render_lesion(rng, bool(i % 2), size)
        # 600x450 like HAM10000: a real resize, not a no-op
        p = folder / f"lesion_{i:04d}.jpg"
        Image.fromarray(img).resize((600, 450), Image.BICUBIC).save(p, quality=92)
        paths.append(p)
    return paths


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vit_tiny", "vit_base"])
    ap.add_argument("--images", type=int, nargs="+", default=None,
                    help="images per model (one value, or one per model); default 48 tiny / 16 base")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu", help="cpu (the benchmark's subject) or cuda")
    ap.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    counts = args.images or [48 if m == "vit_tiny" else 16 for m in args.models]
    if len(counts) == 1:
        counts = counts * len(args.models)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        all_paths = write_images(tmp / "images", max(counts))
        for model_name, n in zip(args.models, counts):
            paths = all_paths[:n]
            torch.manual_seed(0)
            kw = {"img_size": 224}
            ckpt = save_classifier_checkpoint(
                tmp / f"{model_name}.ckpt", build_classifier(model_name, kw, {"synthetic": ["not_melanoma", "melanoma"]}),
                model_name, kw, image_size=224,
            )
            predictor = Predictor(ckpt, batch_size=args.batch_size, progress=False, device=args.device)
            write_maps = predictor._write_maps
            predictor.predict_paths(paths[: args.batch_size], attention_dir=tmp / "warmup", attention_methods=("rollout", "grad_rollout"))
            times: dict[str, list[float]] = {v: [] for v in VARIANTS}
            cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for r in range(args.rounds):
                for variant, (maps, methods, png) in VARIANTS.items():
                    out_dir = tmp / f"maps_{model_name}_{r}_{len(methods)}_{png}" if maps else None
                    # isolates the cost of the pictures from that of the maps themselves
                    predictor._write_maps = write_maps if png else (lambda *a, **k: None)
                    t0, c0 = time.perf_counter(), time.process_time()
                    records = predictor.predict_paths(paths, attention_dir=out_dir, attention_methods=methods or ("rollout",))
                    times[variant].append(time.perf_counter() - t0)
                    cpu[variant].append(time.process_time() - c0)  # all threads of this process
                    assert all(rec["error"] is None for rec in records)
            plain, plain_cpu = statistics.median(times["plain"]), statistics.median(cpu["plain"])
            for variant, ts in times.items():
                med, med_cpu = statistics.median(ts), statistics.median(cpu[variant])
                rows.append((model_name, variant, n, n / med, med / n * 1000, med / plain,
                             med_cpu / n * 1000, med_cpu / plain_cpu))
            print(f"{model_name}: done ({n} images x {args.rounds} rounds)", flush=True)

    header = ("| model | variant | images | images/s (wall) | ms/image (wall) | x plain (wall) | CPU ms/image | x plain (CPU) |\n"
              "|---|---|---:|---:|---:|---:|---:|---:|")
    lines = [header] + [f"| {m} | {v} | {n} | {ips:.2f} | {ms:.1f} | {ratio:.2f} | {cms:.1f} | {cratio:.2f} |"
                        for m, v, n, ips, ms, ratio, cms, cratio in rows]
    table = "\n".join(lines)
    print(table)
    verdict = []
    for m in args.models:
        ratio, cratio = next((r[5], r[7]) for r in rows if r[0] == m and r[1] == TARGET)
        verdict.append(f"{m}: {TARGET} = {ratio:.2f}x plain in wall time, {cratio:.2f}x in CPU time -> "
                       f"{'meets' if max(ratio, cratio) <= 1.5 else 'meets in CPU time, not in wall time' if cratio <= 1.5 else 'MISSES'} "
                       f"the 1.5x target")
    print("\n".join(verdict))
    if args.out:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).parent).stdout.strip()
        except OSError:
            commit = "?"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            f"# melanoma predict throughput, CPU\n\n"
            f"{stamp}, commit {commit}; {cpu_name()}, {os.cpu_count()} cores, torch threads {args.threads}, "
            f"torch {torch.__version__}; device {args.device}; batch size {args.batch_size}; "
            f"median of {args.rounds} interleaved rounds.\n\n"
            f"`python experiments/bench_predict.py {' '.join(os.sys.argv[1:])}`\n\n{table}\n\n" + "\n".join(f"- {v}" for v in verdict) + "\n"
        )


if __name__ == "__main__":
    main()
