"""Where bf16-mixed starts to pay for training on a CPU, by model width.

A CPU with native bf16 matmuls (avx512_bf16 / amx_bf16) runs bf16 GEMMs faster than fp32 ones,
but autocast adds casts around every op; on a narrow model the casts cost more than the matmuls
save. This times training steps (forward, backward, AdamW) of the project's ViT at several widths
(embed_dim; heads = embed_dim / 64, at least 1) in 32-true and under bf16 autocast, alternating
the two in every round so load on a shared machine hits both alike, and prints the median
per-round ratio fp32 time / bf16 time (> 1: bf16 is faster). melanoma.precision's
BF16_CPU_MIN_EMBED_DIM is the narrowest width measured here that was faster in bf16 in every
round (steps only: a whole run adds per-step work that bf16 does not speed up).

Every model sees 64 tokens (image 64 px, patch 8), the token count of both the quickstart
(32 px, patch 4) and vit_small at 128 px (patch 16).

    python experiments/bench_precision_cpu.py                      # ~3 minutes on 2 busy cores
    python experiments/bench_precision_cpu.py --out experiments/results/bench_precision_cpu.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import time

import torch

from melanoma.models.checkpoint_io import build_classifier
from melanoma.precision import BF16_CPU_FLAGS, BF16_CPU_MIN_EMBED_DIM, autocast_context, cpu_flags


def _model(width: int, depth: int) -> torch.nn.Module:
    kwargs = dict(img_size=64, patch_size=8, embed_dim=width, depth=depth, num_heads=max(1, width // 64),
                  drop_path_rate=0.0)
    return build_classifier("vit_tiny", kwargs, {"bench": ["not_melanoma", "melanoma"]})


def _steps(model, opt, x, y, precision: str, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        with autocast_context(precision, "cpu"):
            loss = torch.nn.functional.cross_entropy(model(x, "bench"), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / n


def measure(width: int, depth: int, batch: int, steps: int, rounds: int) -> dict:
    torch.manual_seed(0)
    model = _model(width, depth).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch, 3, 64, 64), torch.randint(0, 2, (batch,))
    for precision in ("32-true", "bf16-mixed"):  # warm-up: allocator, oneDNN kernels
        _steps(model, opt, x, y, precision, 2)
    t32, t16, ratios = [], [], []
    for r in range(rounds):
        order = ("32-true", "bf16-mixed") if r % 2 == 0 else ("bf16-mixed", "32-true")
        times = {p: _steps(model, opt, x, y, p, steps) for p in order}
        t32.append(times["32-true"])
        t16.append(times["bf16-mixed"])
        ratios.append(times["32-true"] / times["bf16-mixed"])
    return {"width": width, "fp32_ms": 1e3 * statistics.median(t32), "bf16_ms": 1e3 * statistics.median(t16),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 128, 192, 256, 384])
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the quickstart trains on 1)")
    ap.add_argument("--out", help="also write the table (markdown) here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    native = sorted(set(BF16_CPU_FLAGS) & cpu_flags())
    rows = [measure(w, args.depth, args.batch, args.steps, args.rounds) for w in args.widths]
    lines = [
        f"# bf16-mixed vs 32-true training steps on a CPU, by width ({dt.date.today()})",
        "",
        f"Machine: {platform.processor() or platform.machine()}, native bf16 flags: {', '.join(native) or 'none'}; "
        f"torch {torch.__version__}, {args.threads} thread(s). ViT depth {args.depth}, 64 tokens (64 px, patch 8), "
        f"batch {args.batch}, {args.steps} steps per timing, {args.rounds} rounds alternating the order.",
        "`python experiments/bench_precision_cpu.py " + " ".join(
            f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items()
            if k != "out" and v is not None) + "`",
        "",
        "| embed_dim | fp32 ms/step | bf16 ms/step | fp32 / bf16 (median of rounds) | range over rounds |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['width']} | {r['fp32_ms']:.1f} | {r['bf16_ms']:.1f} | {r['ratio']:.2f} | "
              f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f} |" for r in rows]
    paying = [r["width"] for r in rows if r["ratio_min"] > 1.0]
    lines += ["", f"bf16 faster in every round from width {min(paying) if paying else 'none measured'}; "
                  f"melanoma.precision.BF16_CPU_MIN_EMBED_DIM = {BF16_CPU_MIN_EMBED_DIM}."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
