"""Choose the content-match threshold on real dermoscopy images (HAM10000 in ../shared/data).

Reference set: every image of a random half of the lesions (what a model "has seen"). Then:
- copies: images of that half, each put through one transformation a copy goes through
  (renamed is implicit; JPEG re-encoding, resizing, small crops, brightness, flips, 90-degree
  rotations) and all of them at once; recall = share whose nearest reference is its original,
  within the threshold;
- distinct: every image of the other half of the lesions (never in the reference set); false-match
  rate = share with any reference within the threshold. HAM10000's own "missed duplicates"
  (one lesion under two lesion_ids) count as false matches here, so the rate is an upper bound.

    python experiments/fingerprint_threshold.py [--data ../shared/data/HAM10000] [--copies 500]

Prints a table per threshold and the largest threshold meeting: false matches <= 0.5% and
recall >= 95% on every transformation.
"""

from __future__ import annotations

import argparse
import io
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageEnhance, ImageOps

from melanoma.data.fingerprints import HASH_SIZE, MATCH_DISTANCE, distances, fingerprint_files, fingerprint_image

#: "small crop": up to this share of the width / height off each side (the combined copy uses it)
MAX_CROP = 0.02


def jpeg(im, rng):
    b = io.BytesIO()
    im.convert("RGB").save(b, "JPEG", quality=int(rng.integers(50, 91)))
    return Image.open(io.BytesIO(b.getvalue()))


def resize(im, rng):
    s = float(rng.uniform(0.5, 2.0))
    return im.resize((max(8, round(im.width * s)), max(8, round(im.height * s))), Image.Resampling.BILINEAR)


def crop(im, rng, most: float = MAX_CROP):
    w, h = im.size
    l, r = (rng.uniform(0, most, 2) * w).astype(int)
    t, b = (rng.uniform(0, most, 2) * h).astype(int)
    return im.crop((l, t, w - r, h - b))


def brightness(im, rng):
    return ImageEnhance.Brightness(im).enhance(float(rng.choice([rng.uniform(0.8, 0.9), rng.uniform(1.1, 1.25)])))


def flip(im, rng):
    return ImageOps.mirror(im) if rng.random() < 0.5 else ImageOps.flip(im)


def rotate(im, rng):
    return im.rotate(90 * int(rng.integers(1, 4)), expand=True)


TRANSFORMS = {"jpeg": jpeg, "resize": resize, "crop 1%": lambda im, rng: crop(im, rng, 0.01), "crop 2%": crop,
              "crop 3%": lambda im, rng: crop(im, rng, 0.03), "brightness": brightness, "flip": flip,
              "rotate90": rotate}


def combined(im, rng):
    for f in (rotate, flip, crop, resize, brightness, jpeg):
        im = f(im, rng)
    return im


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/HAM10000")
    ap.add_argument("--copies", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    meta = pd.read_csv(args.data / "HAM10000_metadata.csv")
    files = {p.stem: p for p in args.data.glob("HAM10000_images_part_*/*.jpg")}
    meta = meta[meta.image_id.isin(files)].reset_index(drop=True)
    rng = np.random.default_rng(args.seed)
    lesions = meta.lesion_id.unique()
    seen_lesions = set(rng.choice(lesions, len(lesions) // 2, replace=False))
    seen = meta[meta.lesion_id.isin(seen_lesions)].reset_index(drop=True)
    unseen = meta[~meta.lesion_id.isin(seen_lesions)].reset_index(drop=True)

    t = time.perf_counter()
    ref = fingerprint_files([files[i] for i in seen.image_id], root=args.data, progress=True)[:, 0]
    other = fingerprint_files([files[i] for i in unseen.image_id], root=args.data, progress=True)
    print(f"fingerprints of {len(meta)} images (cached after the first run): {time.perf_counter() - t:.1f} s")

    originals = rng.choice(len(seen), args.copies, replace=False)
    copy_d = {}
    for name, f in {**TRANSFORMS, "all combined": combined}.items():
        q = np.stack([fingerprint_image(f(Image.open(files[seen.image_id[i]]).convert("RGB"), rng)) for i in originals])
        d = np.concatenate([dd for _, dd in distances(q, ref)])
        # found = its own original is the nearest and within the threshold
        own = d[np.arange(len(q)), originals]
        copy_d[name] = np.where(own <= d.min(1), own, 10**6)
    other_min = np.concatenate([d.min(1) for _, d in distances(other, ref)])

    thresholds = list(range(8, 33, 2))
    cols = list(copy_d)
    print(f"\nDCT hash {HASH_SIZE}x{HASH_SIZE} = {HASH_SIZE ** 2} bits; {len(ref)} reference images ({len(seen_lesions)} "
          f"lesions), {len(other)} images of {len(lesions) - len(seen_lesions)} other lesions, {args.copies} copies per "
          f"transformation (crops up to {MAX_CROP:.0%} per side)\n")
    print("| threshold | false matches (distinct lesions) | " + " | ".join(f"recall {c}" for c in cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    best = None
    for th in thresholds:
        fm = float(np.mean(other_min <= th))
        rec = [float(np.mean(copy_d[c] <= th)) for c in cols]
        print(f"| {th} | {fm:.4f} ({int(np.sum(other_min <= th))}) | " + " | ".join(f"{r:.3f}" for r in rec) + " |")
        if fm <= 0.005 and min(r for c, r in zip(cols, rec) if c != "crop 3%") >= 0.95:
            best = th
    print(f"\nlargest threshold with false matches <= 0.5% and recall >= 95% on every transformation (crops up to {MAX_CROP:.0%}): {best} "
          f"(in use: MATCH_DISTANCE = {MATCH_DISTANCE})")
    print(f"machine: {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores")


if __name__ == "__main__":
    main()
