"""Our ViT against timm's, same config and same weights, in one process.

Measures inference images/s (batch 32) and one AdamW training step images/s (batch 16) for
DeiT-tiny and DeiT-small (``--base`` adds DeiT-base), in fp32 and under bf16 autocast, on CPU
(default, ``torch.set_num_threads(2)``) or ``--device cuda``.
Ours and timm's runs alternate, and each number is the median over repetitions, because the
machine is shared with other jobs and its speed drifts. Prints a Markdown table with the ratio
ours/timm (> 1 means ours is faster).

    python experiments/bench_vit.py [--reps 3] [--threads 2] [--base] [--control] [--device cuda] [--out table.md]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import platform
import statistics
import subprocess
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from tqdm import tqdm

from melanoma.models.vit import vit_base, vit_small, vit_tiny

ARCHS = {
    "tiny": (vit_tiny, "deit_tiny_patch16_224"),
    "small": (vit_small, "deit_small_patch16_224"),
    "base": (vit_base, "deit_base_patch16_224"),
}
INFER_BATCH, TRAIN_BATCH, NUM_CLASSES = 32, 16, 2


def _autocast(device: str, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _inference_step(model, x, device, dtype):
    with torch.inference_mode(), _autocast(device, dtype):
        model(x)


def _train_step(model, opt, x, y, device, dtype):
    with _autocast(device, dtype):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _timed(fn, iters: int, device: str) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per call of ``fn``, over ``iters`` back-to-back calls.
    CPU time is what a CPU run costs when other jobs share the cores: waiting for a core does not
    count, so it is steadier than wall time on a shared machine."""
    if device == "cuda":
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(iters):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters, (time.process_time() - cpu_start) / iters


def _alternate(models: dict, step, reps: int, iters: int, device: str, bar) -> dict:
    """Seconds per step of each model, one list entry per repetition. Runs alternate in one fixed
    cycle (a, b, a, b, ...), so drifts in the machine's speed hit all alike and no model ever runs
    twice in a row: swapping the order each repetition would give one model back-to-back runs
    with its weights still in cache. Rep 0 is a warm-up (allocator, oneDNN/cuBLAS plans)."""
    names = list(models)
    times = {k: [] for k in names}
    for rep in range(reps + 1):
        for name in names:
            t = _timed(lambda: step(name), iters if rep else max(1, iters // 2), device)
            if rep:
                times[name].append(t)
        bar.update(1)
    return times


def bench_pair(arch: str, device: str, dtype: str, reps: int, iters: int, bar,
               img_size: int = 224, infer_batch: int = INFER_BATCH, train_batch: int = TRAIN_BATCH,
               control: bool = False) -> dict:
    """{"infer"|"train": {model: [images/s per repetition]}} for ours, timm (and a control: a
    second, identical timm model, whose ratio to the first shows the noise of the machine)."""
    factory, timm_name = ARCHS[arch]
    torch.manual_seed(0)
    ref = timm.create_model(timm_name, pretrained=False, num_classes=NUM_CLASSES, img_size=img_size)
    ours = factory(num_classes=NUM_CLASSES, img_size=img_size)
    ours.load_state_dict(ref.state_dict(), strict=True)  # same weights: same work, same numerics
    models = {"ours": ours.to(device), "timm": ref.to(device)}
    if control:
        twin = timm.create_model(timm_name, pretrained=False, num_classes=NUM_CLASSES, img_size=img_size)
        twin.load_state_dict(ref.state_dict(), strict=True)
        models["control"] = twin.to(device)
    x_inf = torch.randn(infer_batch, 3, img_size, img_size, device=device)
    x_tr = torch.randn(train_batch, 3, img_size, img_size, device=device)
    y_tr = torch.randint(0, NUM_CLASSES, (train_batch,), device=device)

    for m in models.values():
        m.eval()
    sec = _alternate(models, lambda k: _inference_step(models[k], x_inf, device, dtype), reps, iters, device, bar)
    out = {"infer": {k: [infer_batch / t for t, _ in v] for k, v in sec.items()},
           "infer_cpu": {k: [c for _, c in v] for k, v in sec.items()}}

    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    for m in models.values():
        m.train()
    sec = _alternate(models, lambda k: _train_step(models[k], opts[k], x_tr, y_tr, device, dtype),
                     reps, iters, device, bar)
    out["train"] = {k: [train_batch / t for t, _ in v] for k, v in sec.items()}
    out["train_cpu"] = {k: [c for _, c in v] for k, v in sec.items()}
    return out


def keep_heap() -> bool:
    """Stop glibc from returning freed heap memory to the OS during the run.

    With glibc's defaults, whether a big activation buffer is recycled or freshly mapped (and
    page-faulted, in every op that writes it) depends on what the *previous* model left in the
    heap. Alternating two models then favours whichever allocation order matches the other's
    leftovers: measured here, the same code read 0.86x or 1.03x depending on the cycle order,
    while one model run repeatedly (what training does) was equal to timm within 1%. Keeping the
    heap makes alternation measure the models, not the allocator's history.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_trim_threshold, 2**31 - 1)) and bool(libc.mallopt(m_mmap_threshold, 32 << 20))
    except (OSError, AttributeError):
        return False


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per model (after 1 warm-up)")
    ap.add_argument("--iters", type=int, default=None,
                    help="steps per timed repetition (default: 1 on cpu, 10 on cuda)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--infer-batch", type=int, default=INFER_BATCH)
    ap.add_argument("--train-batch", type=int, default=TRAIN_BATCH)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--archs", nargs="+", default=["tiny", "small"], choices=list(ARCHS))
    ap.add_argument("--base", action="store_true", help="also DeiT-base")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--out", type=Path, help="write the table (with date and machine) to this .md")
    ap.add_argument("--machine", default=None, help="machine description for the record")
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc's heap trimming on (see keep_heap; only affects --device cpu)")
    ap.add_argument("--control", action="store_true",
                    help="also time a second, identical timm model: its ratio to timm is the noise floor")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    heap_kept = args.device == "cpu" and not args.default_malloc and keep_heap()
    archs = args.archs + (["base"] if args.base and "base" not in args.archs else [])
    iters = args.iters or (10 if args.device == "cuda" else 1)

    rows = []
    with tqdm(total=len(archs) * len(args.dtypes) * 2 * (args.reps + 1), desc="bench_vit") as bar:
        for arch in archs:
            for dtype in args.dtypes:
                res = bench_pair(arch, args.device, dtype, args.reps, iters, bar,
                                 args.img_size, args.infer_batch, args.train_batch, args.control)
                for mode, batch in (("infer", args.infer_batch), ("train", args.train_batch)):
                    o, t = res[mode]["ours"], res[mode]["timm"]
                    med_o, med_t = statistics.median(o), statistics.median(t)
                    control = ""
                    if args.control:
                        control = f" {statistics.median(res[mode]['control']) / med_t:.3f} |"
                    cpu = res[mode + "_cpu"]
                    cpu_ratio = statistics.median(cpu["timm"]) / statistics.median(cpu["ours"])
                    rows.append(f"| deit_{arch} | {dtype} | {'inference' if mode == 'infer' else 'AdamW train step'}"
                                f" | {batch} | {med_o:.1f} | {med_t:.1f} | **{med_o / med_t:.3f}** |"
                                f" {max(o) / max(t):.3f} | {cpu_ratio:.3f} |{control}")
                    tqdm.write(rows[-1])  # partial results survive an interrupted run

    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = args.machine or (
        f"{torch.cuda.get_device_name()} (host {cpu_name()})" if args.device == "cuda"
        else f"{cpu_name()}, {args.threads} threads, CPU only")
    header = [
        f"Date: {date}  ",
        f"Machine: {machine}  ",
        f"torch {torch.__version__}, timm {timm.__version__}; {args.img_size} px, {NUM_CLASSES} classes, same weights; "
        f"device {args.device}; img/s = median of {args.reps} alternating runs of {iters} step(s) after a "
        f"warm-up; best/best = ratio of the fastest runs; cpu-time = ratio of median process CPU "
        f"seconds per step (> 1: ours needs less); "
        f"{'glibc heap kept (no trimming, mmap threshold 32 MiB); ' if heap_kept else ''}"
        f"bf16 = torch.autocast('{args.device}', bfloat16).",
        "",
        "| model | precision | workload | batch | ours img/s | timm img/s | ours/timm | best/best | cpu-time timm/ours |"
        + (" control timm/timm |" if args.control else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if args.control else ""),
    ]
    table = "\n".join(header + rows)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
