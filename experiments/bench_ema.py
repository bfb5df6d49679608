"""Cost of the EMA of the weights (``ema=on``) per training step, against the same steps without it.

One process, one model, one batch on the device; rounds alternate the variants so load or clock
changes hit all alike:
  no EMA        forward + loss + backward + AdamW step of LesionClassifier (vit_small, 224 px)
  EMA           the same step, then the per-step hook of ``ema=on``'s callback
                (``melanoma.training.ema.EMAWeights.on_train_batch_end``: an AveragedModel
                updated by torch's foreach ``get_ema_multi_avg_fn``)
  Lightning EMA the same step, then Lightning's own ``EMAWeightAveraging`` hook (a per-parameter
                ``avg_fn``): the peer EMAWeights replaced
"update only" times a hook alone (no training step), per call. Timing: perf_counter around
blocks of ``--steps`` steps, with a device synchronize at both ends.

    python experiments/bench_ema.py                          # GPU when present: vit_small, bf16
    python experiments/bench_ema.py --quick                  # CPU smoke run: tiny model, 32 px
    python experiments/bench_ema.py --out experiments/results/bench_ema.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import statistics
import subprocess
import time
from types import SimpleNamespace

import torch

from melanoma.training.ema import EMAWeights
from melanoma.training.module import LesionClassifier

log = logging.getLogger("bench_ema")
CLASSES = ["not_melanoma", "melanoma"]
DECAY = 0.999


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        name = platform.processor() or "unknown CPU"
    return f"{name}, {os.cpu_count()} cores, CPU only (torch {torch.__version__})"


def build(args, device):
    kwargs = {"img_size": args.size, "drop_path_rate": 0.1}
    if args.quick:
        kwargs.update(patch_size=8, embed_dim=32, depth=2, num_heads=2)
    module = LesionClassifier({"name": args.model, "kwargs": kwargs}, "dermmel", CLASSES,
                              image_size=args.size).to(device)
    module.train()
    groups = [{"params": [p for p in module.model.parameters() if p.requires_grad], "lr": 1e-4}]
    opt = torch.optim.AdamW(groups, fused=device.type == "cuda")
    return module, opt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per block")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny ViT, 32 px, batch 8")
    parser.add_argument("--out", default=None, help="append the result table to this markdown file")
    args = parser.parse_args()
    if args.quick:
        args.size, args.batch, args.steps, args.warmup, args.rounds = 32, 8, 5, 2, 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = torch.bfloat16 if device.type == "cuda" else None

    torch.manual_seed(0)
    module, opt = build(args, device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 2, (args.batch,), device=device)

    # the callback exactly as train.py builds it from conf/ema/on.yaml, set up for fit
    from lightning.pytorch.callbacks import EMAWeightAveraging

    ema, lightning_ema = EMAWeights(decay=DECAY), EMAWeightAveraging(decay=DECAY)
    for cb in (ema, lightning_ema):
        cb.setup(SimpleNamespace(), module, "fit")
    fake = SimpleNamespace(global_step=0)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train_step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = module._loss(module(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def hook(cb):
        fake.global_step += 1
        cb.on_train_batch_end(fake, module, None, None, 0)

    variants = {
        "no EMA": train_step,
        "EMA": lambda: (train_step(), hook(ema)),
        "Lightning EMA": lambda: (train_step(), hook(lightning_ema)),
        "update only (EMA)": lambda: hook(ema),
        "update only (Lightning EMA)": lambda: hook(lightning_ema),
    }
    for fn in variants.values():
        for _ in range(args.warmup):
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for r in range(args.rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                variants[name]()
            sync()
            times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
    ms = {name: statistics.median(v) for name, v in times.items()}
    base = ms["no EMA"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    n_params = sum(p.numel() for p in module.model.parameters())
    lines = [
        f"{args.model} ({n_params / 1e6:.1f} M parameters), batch {args.batch} at {args.size} px, "
        f"{'bf16 autocast' if dtype else 'fp32'}, fused AdamW, EMA decay {DECAY}; {args.warmup} warm-up + "
        f"{args.steps} timed steps per block, {args.rounds} alternating rounds, medians.",
        f"Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC. Machine: {machine()}; load "
        f"average {load:.1f} at the end.",
        "",
        "| variant | ms / step | per-round ms | vs no EMA |",
        "|---|---:|---|---:|",
    ]
    for name, value in ms.items():
        rounds = ", ".join(f"{v:.2f}" for v in times[name])
        rel = f"{value / base:.3f}" if not name.startswith("update only") else f"{value / base * 100:.1f}% of a step"
        lines.append(f"| {name} | {value:.2f} | {rounds} | {rel} |")
    lines += ["", f"EMA overhead per step: {(ms['EMA'] / base - 1) * 100:+.1f}% (target < 5%); "
              f"the hook alone {ms['update only (EMA)'] / base * 100:.1f}% of a step; Lightning's "
              f"per-parameter EMA {(ms['Lightning EMA'] / base - 1) * 100:+.1f}%."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text + "\n")


if __name__ == "__main__":
    main()
