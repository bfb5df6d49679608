"""Does a ViT that learned the synthetic task look at the lesion?

Trains a small ViT on generated lesions (melanoma vs not, render_lesion) for a fixed number of
steps, then measures on held-out images how much of each attention map's mass falls inside the
generator's lesion mask, against the mask's share of the image (what a uniform map would give).
The same measurement on the untrained model is the peer. tests/test_explain_learned.py is the
short version (32 px); this one defaults to 64 px with 8 px patches.

    python experiments/attention_mass.py [--size 64 --patch 8 --steps 300]
"""

from __future__ import annotations

import argparse
import functools
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from melanoma.data.synthetic import render_lesion
from melanoma.conventions import IMAGENET_MEAN, IMAGENET_STD
from melanoma.models.checkpoint_io import build_classifier
from melanoma.explain.attention import METHODS, compute_attention_maps, mass_inside


def lesions(n: int, size: int, seed: int):
    rng = np.random.default_rng(seed)
    pairs = [render_lesion(rng, bool(i % 2), size) for i in range(n)]
    images = np.stack([p[0] for p in pairs]).astype(np.float32) / 255.0
    x = torch.from_numpy(((images - IMAGENET_MEAN) / IMAGENET_STD).transpose(0, 3, 1, 2)).float()
    return x, torch.arange(n) % 2, torch.from_numpy(np.stack([p[1] for p in pairs])).float()


def measure(model, x, y, masks, patch: int) -> dict:
    with torch.no_grad():
        accuracy = float((model(x, "synthetic").argmax(1) == y).float().mean())
    share_per_patch = F.avg_pool2d(masks[:, None], patch)[:, 0].numpy()
    share = share_per_patch.mean(axis=(1, 2))
    maps = compute_attention_maps(functools.partial(model.forward, head="synthetic"), x, model.backbone.grid_size,
                                  methods=METHODS)
    out = {"accuracy": accuracy, "mask share": float(share.mean())}
    for method, m in maps.maps.items():
        inside = mass_inside(m, share_per_patch)
        out[method] = (float((inside > share).mean()), float(inside.mean()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--train-images", type=int, default=400)
    ap.add_argument("--test-images", type=int, default=200)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    torch.manual_seed(0)
    x, y, _ = lesions(args.train_images, args.size, seed=1)
    xt, yt, mt = lesions(args.test_images, args.size, seed=2)
    kw = dict(img_size=args.size, patch_size=args.patch, embed_dim=args.dim, depth=args.depth, num_heads=args.heads)
    model = build_classifier("vit_tiny", kw, {"synthetic": ["not_melanoma", "melanoma"]})
    rows = [("untrained", measure(model.eval(), xt, yt, mt, args.patch))]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        loss = F.cross_entropy(model(torch.rot90(x[idx], step % 4, (-2, -1)), "synthetic"), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_s = time.perf_counter() - t0
    rows.append((f"trained {args.steps} steps", measure(model.eval(), xt, yt, mt, args.patch)))

    header = ("| model | test accuracy | mean mask share | " + " | ".join(
        f"{m}: images with mass inside > share / mean mass inside" for m in METHODS) + " |")
    lines = [header, "|---|---:|---:|" + "---:|" * len(METHODS)]
    for name, r in rows:
        cells = " | ".join(f"{r[m][0]:.0%} / {r[m][1]:.3f}" for m in METHODS)
        lines.append(f"| {name} | {r['accuracy']:.2f} | {r['mask share']:.3f} | {cells} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            f"# Attention mass inside the lesion mask (synthetic lesions)\n\n{stamp}; ViT {kw}, "
            f"{args.train_images} training images, {args.steps} AdamW steps of 32 ({train_s:.0f} s), "
            f"{args.test_images} test images (half melanoma). Mass inside = share of a map's mass on "
            f"patches weighted by their mask coverage; a uniform map gives exactly the mask share.\n\n"
            f"`python experiments/attention_mass.py {' '.join(__import__('sys').argv[1:])}`\n\n{table}\n"
        )


if __name__ == "__main__":
    main()
