"""Speed of the content check: fingerprinting 600x450 JPEGs (decode included, one core), and a
repeated `evaluate --external` with the overlap check against one without it (same checkpoint,
its seen-set removed), on real PH2 images against a seen-set of the real HAM10000.

    python experiments/bench_fingerprints.py [--images 300] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

torch.set_num_threads(1)

from melanoma.data.fingerprints import fingerprint_files, fingerprint_image  # noqa: E402
from melanoma.data.ham10000 import HAM10000DataModule  # noqa: E402
from melanoma.data.ph2 import PH2DataModule  # noqa: E402
from melanoma.models.checkpoint_io import build_classifier, save_classifier_checkpoint  # noqa: E402
from melanoma.workflows.evaluate import evaluate_external  # noqa: E402
from melanoma.models.checkpoint import SeenImages, update_meta  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data")
    ap.add_argument("--images", type=int, default=300)
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp())
    os.environ["MELANOMA_CACHE_DIR"] = str(tmp / "cache")

    # 1. fingerprints per second, 600x450 JPEGs (HAM10000's original size), one process
    src = sorted((args.data / "HAM10000").glob("HAM10000_images_part_1/*.jpg"))[: args.images]
    big = tmp / "big"
    big.mkdir()
    for p in src:
        Image.open(p).resize((600, 450), Image.Resampling.BICUBIC).save(big / p.name, quality=90)
    files = sorted(big.glob("*.jpg"))
    t = time.perf_counter()
    for p in files:
        fingerprint_image(p)
    per_s = len(files) / (time.perf_counter() - t)
    t = time.perf_counter()
    fingerprint_files(files, root=big)
    cold = time.perf_counter() - t
    t = time.perf_counter()
    fingerprint_files(files, root=big)
    warm = time.perf_counter() - t

    # 2. evaluate --external twice, with and without the check
    torch.manual_seed(0)
    kw = {"img_size": 224}
    model = build_classifier("vit_tiny", kw, {"ham10000": ["not_melanoma", "melanoma"]}).eval()
    with_seen = save_classifier_checkpoint(tmp / "with.ckpt", model, "vit_tiny", kw, image_size=224)
    without = save_classifier_checkpoint(tmp / "without.ckpt", model, "vit_tiny", kw, image_size=224)
    ham = HAM10000DataModule(args.data / "HAM10000", num_workers=0)
    ham.setup()
    records = []
    for split in ("train", "val", "test"):
        ids, hashes = ham.seen_images(split)
        records.append(SeenImages("ham10000", split, "ham10000", ids, hashes, model="bench"))
    update_meta(with_seen, lambda m: setattr(m, "seen", records))
    rows = []
    for run in (1, 2):
        for name, ckpt in (("with check", with_seen), ("without", without)):
            dm = PH2DataModule(args.data / "PH2", image_size=224, num_workers=0, eval_batch_size=32)
            t = time.perf_counter()
            evaluate_external(ckpt, dm, tmp / f"out_{name}_{run}", progress=False, precision="32-true")
            rows.append((run, name, time.perf_counter() - t))
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads 1\n")
    print("| what | result |\n|---|---|")
    print(f"| fingerprint_image, 600x450 JPEG, decode included, 1 process | {per_s:.0f} images/s |")
    print(f"| fingerprint_files {len(files)} files: first run / cached run | {cold:.2f} s / {warm:.3f} s |")
    for run, name, sec in rows:
        print(f"| evaluate --external PH2 (200 images, vit_tiny 224 px), run {run}, {name} | {sec:.1f} s |")
    w2 = dict(((r, n), s) for r, n, s in rows)
    print(f"| repeated run: with check / without | {w2[(2, 'with check')] / w2[(2, 'without')]:.3f}x |")
    print(f"| seen-set: {sum(len(r.ids) for r in records)} HAM10000 images in the checkpoint | "
          f"{sum(len(r.to_dict()['ids']) + r.hashes.nbytes for r in records) / 1024:.0f} KiB |")


if __name__ == "__main__":
    main()
