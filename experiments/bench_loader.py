"""Loader throughput, one worker: 600x450 JPEGs through the train pipeline to 224 px.

Compares, in one run on the same files:
  ours           load_rgb (JPEG draft decode at reduced scale) + albumentations train pipeline
  ours, no draft the same at full decode, to show what draft decoding buys
  ours, cached   pre-resized cache (short side 256, JPEG q95 or raw .npy) + the same pipeline
  torchvision    plain PIL open/convert + torchvision.transforms (RandomResizedCrop, flips,
                 90-degree turn, ColorJitter, ToTensor, Normalize), full decode
  torchvision, cached  the same peer reading the cache
  eval, draft    the eval pipeline (resize to 224, normalise) on a draft decode: how validation
                 and test read images during training before issue 19
  eval, full     the same on a full decode: what they read now, as `melanoma predict` does
  eval, cached   the evaluation cache's entries (the exact eval pixels, .npy)
Each row is one process doing decode + transform per image (what one DataLoader worker does),
torch and OpenCV limited to one thread each. The last column runs a real DataLoader with
num_workers=1, batch 32 (adds IPC and collation).

    python experiments/bench_loader.py [--images 200] [--passes 5] [--out experiments/results/bench_loader.md]
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from melanoma.data.base import LesionImageDataset, _seed_worker_augmentations
from melanoma.data.cache import build_cache, build_eval_cache
from melanoma.data.synthetic import _image_rng, _render_rect
from melanoma.conventions import IMAGENET_MEAN, IMAGENET_STD
from melanoma.data.transforms import eval_transform, train_transform

SIZE = 224


def make_jpegs(folder: Path, n: int) -> list[str]:
    paths = []
    for i in range(n):
        img, _ = _render_rect(_image_rng(123, i), i % 2 == 0, 600, 450)
        p = folder / f"img_{i:04d}.jpg"
        Image.fromarray(img).save(p, quality=90)
        paths.append(str(p))
    return paths


class TorchvisionDataset(Dataset):
    def __init__(self, paths):
        self.paths = paths
        self.transform = T.Compose([
            T.RandomResizedCrop(SIZE, scale=(0.35, 1.0), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.RandomHorizontalFlip(),
            T.RandomVerticalFlip(),
            T.RandomApply([T.Lambda(lambda im: im.transpose(Image.Transpose.ROTATE_90))], p=0.5),
            T.RandomApply([T.ColorJitter(0.2, 0.2, 0.2, 0.02)], p=0.8),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as im:
            return self.transform(im.convert("RGB")), 0


def per_item_rounds(datasets: list, rounds: int) -> list[tuple[float, float]]:
    """Median (img/s by wall clock, img/s by this process's CPU time) per dataset.

    Round-robin: every round times one pass of each pipeline in turn, so load changes on the
    shared machine hit all pipelines alike. CPU time is the steadier per-worker cost there."""
    for ds in datasets:  # warm-up
        for i in range(min(20, len(ds))):
            ds[i]
    wall = [[] for _ in datasets]
    cpu = [[] for _ in datasets]
    for _ in range(rounds):
        for k, ds in enumerate(datasets):
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(len(ds)):
                ds[i]
            wall[k].append(len(ds) / (time.perf_counter() - t0))
            cpu[k].append(len(ds) / (time.process_time() - c0))
    return [(float(np.median(w)), float(np.median(c))) for w, c in zip(wall, cpu)]


def with_loader(ds, passes: int) -> float:
    loader = DataLoader(ds, batch_size=32, num_workers=1, persistent_workers=True,
                        worker_init_fn=_seed_worker_augmentations)
    for _ in loader:  # first epoch starts the worker
        break
    n, t0 = 0, time.perf_counter()
    for _ in range(passes):
        for x, _ in loader:
            n += len(x)
    return n / (time.perf_counter() - t0)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except Exception:
        return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--passes", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "src").mkdir()
        paths = make_jpegs(tmp / "src", args.images)
        t0 = time.perf_counter()
        cached = build_cache(paths, tmp / "cache", 256, num_threads=1, progress=False)
        cache_build = args.images / (time.perf_counter() - t0)
        cached_npy = build_cache(paths, tmp / "cache", 256, num_threads=1, progress=False, fmt="npy")
        ours_t = train_transform(SIZE)
        eval_t = eval_transform(SIZE)
        cached_eval = build_eval_cache(paths, tmp / "cache", eval_t, num_threads=1, progress=False)
        rows = [
            ("ours (draft decode + albumentations)", LesionImageDataset(paths, [0] * len(paths), ours_t, decode_size=SIZE)),
            ("ours, no draft (full decode)", LesionImageDataset(paths, [0] * len(paths), ours_t, decode_size=None)),
            ("ours, cached jpg (short side 256)", LesionImageDataset(cached, [0] * len(paths), ours_t)),
            ("ours, cached npy (short side 256)", LesionImageDataset(cached_npy, [0] * len(paths), ours_t)),
            ("torchvision (PIL + transforms)", TorchvisionDataset(paths)),
            ("torchvision, cached", TorchvisionDataset(cached)),
            ("eval, draft decode (val/test before)", LesionImageDataset(paths, [0] * len(paths), eval_t, decode_size=SIZE)),
            ("eval, full decode (val/test now, = predict)", LesionImageDataset(paths, [0] * len(paths), eval_t)),
            ("eval, cached eval pixels (npy)", LesionImageDataset(cached_eval, [0] * len(paths), eval_t)),
        ]
        rates = per_item_rounds([ds for _, ds in rows], args.passes)
        results = [(name, r, with_loader(ds, 1)) for (name, ds), r in zip(rows, rates)]

    base, base_cpu = next(r for name, r, _ in results if name.startswith("torchvision ("))
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        f"Loader throughput, one worker, {args.images} JPEGs 600x450 -> train (or eval) pipeline -> {SIZE} px, "
        f"median of {args.passes} interleaved rounds (one pass per pipeline per round).",
        f"Date: {when}. Machine: {cpu_name()}, 2 cores, CPU only, shared with other jobs "
        f"(absolute numbers move with the load; ratios are from the same run).",
        "",
        "| pipeline | img/s wall (1 process) | img/s CPU time | ms CPU/img | vs torchvision (CPU) | img/s (DataLoader, 1 worker, batch 32) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, (ips, cpu_ips), loader_ips in results:
        lines.append(f"| {name} | {ips:.0f} | {cpu_ips:.0f} | {1000 / cpu_ips:.2f} | {cpu_ips / base_cpu:.2f}x | {loader_ips:.0f} |")
    lines += ["", f"Building the cache (decode 600x450 + resize + JPEG write): {cache_build:.0f} img/s, one thread."]
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("# Loader benchmark (experiments/bench_loader.py)\n\n" + table + "\n")


if __name__ == "__main__":
    main()
