"""Training throughput users feel: a real train.py run against a bare PyTorch loop, in one run.

Both sides get the same data and compute, built from one composed config:
  train.py   melanoma.workflows.training_run.run(cfg): the HAM10000 DataModule on 600x450 JPEGs (DataLoader
             workers, augmentation), LesionClassifier (metrics, NaN/Inf guard, grad norm, LR
             logging), the Trainer with its callbacks (checkpointing, progress bar) and CSV logger
  bare loop  the same DataModule's train_dataloader(), the same LesionClassifier forward and
             loss, the same AdamW param groups and per-step scheduler, under the same autocast;
             nothing else: no metrics, no logging, no checks
img/s is measured over the training steps after a warm-up (batches ``--warmup``..end of the train
epoch; validation, checkpointing at epoch end and start-up are outside the window, the same for
both). "data wait" is the share of that window spent between the end of one step and the start of
the next: in the bare loop that is the DataLoader fetch; in train.py it also holds Lightning's
between-step bookkeeping, so it is an upper bound of its data wait. Runs alternate (train.py,
bare, bare, train.py, ...) so load on a shared machine hits both alike. img/s are medians over
rounds; "train.py / bare" is the median of the per-round ratios (each pair runs back to back). The
ratio of images per second of main-process CPU time (DataLoader workers excluded: the same work
on both sides) moves much less with other jobs on a shared machine than wall-clock img/s.
"host syncs / step" are counted in one more short run of each side under HostSyncCounter
(melanoma.training.debug): on a GPU each one drains the queue and idles the GPU while Python
catches up; a CPU cannot time that, only count it.

    python experiments/bench_train.py            # vit_tiny + vit_small, 32-true and auto
    python experiments/bench_train.py --quick    # vit_tiny, auto only: ~1 minute on 2 idle cores
    python experiments/bench_train.py --out experiments/results/bench_train.md
    # on a GPU (experiments/gpu_check.sh): adds MFU = model FLOPs/image x img/s / peak bf16 FLOP/s
    python experiments/bench_train.py --accelerator gpu --models vit_base --precisions bf16-mixed \
        --compile off on --batch 64 --workers 8 --threads 8 --warmup 10 --steps 20 --rounds 1
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import hydra
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

from melanoma.data.ham10000 import DX
from melanoma.precision import autocast_context, resolve_precision
from melanoma.workflows.training_run import run
from melanoma.training.debug import HostSyncCounter
from melanoma.training.module import LesionClassifier

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the HAM10000 layout writer of the tests
from layouts import write_ham10000_layout  # noqa: E402

log = logging.getLogger("bench_train")
CONF = Path(__file__).resolve().parents[1] / "conf"
SIZE = 224


# peak dense bf16 tensor FLOP/s by GPU name, first match wins (H100 SXM and H200 share the
# H100's tensor cores; the PCIe card is clocked lower)
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12}


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # the timed window must hold the GPU work, not only its launch


class StepTimer(Callback):
    """Times train.py's steps the way ``bare_loop`` times its own (see the module docstring)."""

    latest: "StepTimer | None" = None

    def __init__(self, warmup: int):
        self.warmup = int(warmup)
        self.last_end: float | None = None
        self.t0 = self.t1 = self.c0 = self.c1 = None
        self.wait = 0.0
        self.images = 0
        StepTimer.latest = self

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx >= self.warmup and self.last_end is not None:
            self.wait += time.perf_counter() - self.last_end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx == self.warmup - 1 or batch_idx == trainer.num_training_batches - 1:
            _sync()
        now = time.perf_counter()
        if batch_idx == self.warmup - 1:
            self.t0, self.c0 = now, time.process_time()
        elif batch_idx >= self.warmup:
            self.images += len(batch[1])
            self.t1, self.c1 = now, time.process_time()
        self.last_end = now

    def result(self) -> dict:
        span = self.t1 - self.t0
        return {"img_s": self.images / span, "wait": self.wait / span, "img_cpu_s": self.images / (self.c1 - self.c0)}


class ProfileSteps(Callback):
    """torch.profiler over train.py's timed steps (``--profile``): from batch ``warmup`` to the
    end of the training batches, validation excluded."""

    def __init__(self, warmup: int, out: str):
        self.warmup, self.out, self.prof = int(warmup), out, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx == self.warmup and self.prof is None:
            self.prof = _profiler()
            self.prof.__enter__()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._stop()

    def on_train_end(self, trainer, pl_module) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.prof is not None:
            _sync()
            self.prof.__exit__(None, None, None)
            _write_profile(self.prof, Path(self.out))
            self.prof = None


def _profiler():
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    return profile(activities=activities, record_shapes=False)


def _write_profile(prof, out: Path) -> None:
    """The top operations by host time and (on a GPU) by device time, as text tables."""
    averages = prof.key_averages()
    tables = [averages.table(sort_by="self_cpu_time_total", row_limit=25)]
    if torch.cuda.is_available():
        tables.append(averages.table(sort_by="self_cuda_time_total", row_limit=25))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(tables))


def make_images(root: Path, n_images: int, unique: int = 28) -> Path:
    """A HAM10000-layout folder of ``n_images`` 600x450 JPEGs (the real size), one image per
    lesion. Rendering a lesion takes ~0.1-0.6 s, so ``unique`` are rendered and the rest are
    byte copies under new image and lesion ids (decoding them costs the same)."""
    import math
    import shutil

    import pandas as pd

    per_dx = {dx: max(1, math.ceil(min(unique, n_images) / len(DX))) for dx in DX}
    write_ham10000_layout(root, per_dx, images_per_lesion=(1, 1), image_size=(600, 450), seed=3)
    meta_path = root / "HAM10000_metadata.csv"
    meta = pd.read_csv(meta_path)
    files = {p.stem: p for p in root.glob("*/*.jpg")}
    rows = []
    for k in range(max(0, n_images - len(meta))):
        row = meta.iloc[k % len(meta)].copy()
        source = files[row["image_id"]]
        row["image_id"], row["lesion_id"] = f"ISIC_{9_000_000 + k:07d}", f"HAM_{9_000_000 + k:07d}"
        shutil.copyfile(source, source.with_name(f"{row['image_id']}.jpg"))
        rows.append(row)
    pd.concat([meta, pd.DataFrame(rows)], ignore_index=True).to_csv(meta_path, index=False)
    return root


def compose_cfg(args, model: str, precision: str, compiled: bool, data: Path, out: Path, syncs: Path | None = None,
                profile: Path | None = None):
    overrides = [
        "dataset=ham10000", f"dataset.root={data}", f"dataset.image_size={SIZE}",
        f"dataset.batch_size={args.batch}", f"dataset.num_workers={args.workers}",
        f"model={model}", "model.pretrained=null", f"model.compile={str(compiled).lower()}", "logger=csv",
        f"trainer.accelerator={args.accelerator}", "trainer.max_epochs=1", f"trainer.precision={precision}",
        f"trainer.limit_train_batches={args.warmup + args.steps}", "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0", "test=false", "evaluate=false",
        f"num_threads={args.threads}", f"paths.output_dir={out}",
        f"+callbacks.step_timer._target_={__name__}.StepTimer", f"+callbacks.step_timer.warmup={args.warmup}",
    ]
    if syncs is not None:
        overrides += ["+callbacks.syncs._target_=melanoma.training.debug.CountHostSyncs",
                      f"+callbacks.syncs.start={args.warmup}", f"+callbacks.syncs.out={syncs}"]
    if profile is not None:
        overrides += [f"+callbacks.profile._target_={__name__}.ProfileSteps",
                      f"+callbacks.profile.warmup={args.warmup}", f"+callbacks.profile.out={profile}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides)


def train_py(cfg) -> dict:
    run(cfg)
    return StepTimer.latest.result()


def bare_loop(cfg, warmup: int, steps: int, device: str, count_syncs: bool = False,
              profile: Path | None = None) -> dict:
    """The same data, model, loss, optimizer and precision as ``run(cfg)``, and nothing else.
    ``count_syncs``: also count the host syncs of the timed steps (HostSyncCounter; slower);
    ``profile``: write torch.profiler's tables of the timed steps there."""
    torch.manual_seed(int(cfg.seed))
    threads = torch.get_num_threads()
    torch.set_num_threads(int(cfg.num_threads))
    mean, std = list(cfg.model.mean), list(cfg.model.std)
    dm = hydra.utils.instantiate(cfg.dataset, mean=mean, std=std, _convert_="all")
    dm.prepare_data()
    dm.setup("fit")
    m = OmegaConf.to_container(cfg.model, resolve=True)
    module = LesionClassifier(backbone=m["backbone"], dataset_name=dm.name, class_names=list(dm.class_names),
                              head=m["head"], optimizer=m["optimizer"], scheduler=m["scheduler"], loss=m["loss"],
                              image_size=SIZE, mean=mean, std=std, compile=bool(m["compile"]),
                              compile_backend=m["compile_backend"])
    module.to(device).train()
    configured = module.configure_optimizers()
    opt = configured["optimizer"] if isinstance(configured, dict) else configured
    sched = configured.get("lr_scheduler", {}).get("scheduler") if isinstance(configured, dict) else None
    precision = resolve_precision(cfg.trainer.precision, device)
    loader = dm.train_dataloader()
    wait = images = 0.0
    t0 = last_end = None
    counter = HostSyncCounter() if count_syncs else None
    try:
        it = iter(loader)
        for i in range(warmup + steps):
            if counter is not None and i == warmup:
                counter.__enter__()
            if profile is not None and i == warmup:
                prof = _profiler()
                prof.__enter__()
            x, y = next(it)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if i >= warmup:
                wait += time.perf_counter() - last_end
            with autocast_context(precision, device):
                logits = module(x)
            loss = module._loss(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            if i in (warmup - 1, warmup + steps - 1):
                _sync()
            last_end = time.perf_counter()
            if i == warmup - 1:
                t0, c0 = last_end, time.process_time()
            elif i >= warmup:
                images += len(y)
        span = last_end - t0
        if profile is not None:
            prof.__exit__(None, None, None)
            _write_profile(prof, profile)
        result = {"img_s": images / span, "wait": wait / span, "img_cpu_s": images / (time.process_time() - c0)}
        if counter is not None:
            counter.__exit__(None, None, None)
            result["syncs"] = len(counter.events) / steps
            counter = None
        return result
    finally:
        if counter is not None:
            counter.__exit__(None, None, None)
        del it
        torch.set_num_threads(threads)


def host_syncs(args, model: str, precision: str, compiled: bool, data: Path, tmp: Path, device: str) -> dict:
    """Host syncs per timed step, train.py and bare loop, from one extra short run of each under
    HostSyncCounter (counted, not timed: the counter slows every operation). On a GPU each sync
    drains the queue; on a CPU they cost nothing, so this is the framework's GPU cost a CPU can
    show. train.py's figure includes the steps the loggers write (every trainer.log_every_n_steps)."""
    import json

    out = tmp / f"syncs_{model}_{precision}_{compiled}.json"
    cfg = compose_cfg(args, model, precision, compiled, data, tmp / f"syncs_run_{model}_{precision}_{compiled}", syncs=out)
    run(cfg)
    steps = json.loads(out.read_text())
    bare = bare_loop(cfg, args.warmup, args.steps, device, count_syncs=True)
    return {"train": sum(len(s) for s in steps) / max(1, len(steps)), "bare": bare["syncs"],
            "quiet_steps": sum(not s for s in steps), "steps": len(steps)}


def train_flops_per_image(cfg) -> float:
    """Model FLOPs of one training image: forward + backward (3x the forward's matmul FLOPs),
    counted by torch's FlopCounterMode on the configured backbone and head."""
    from torch.utils.flop_counter import FlopCounterMode

    m = OmegaConf.to_container(cfg.model, resolve=True)
    module = LesionClassifier(backbone=m["backbone"], dataset_name="bench", class_names=["a", "melanoma"],
                              head=m["head"], image_size=SIZE)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(torch.randn(1, 3, SIZE, SIZE))
    return 3.0 * counter.get_total_flops()


def peak_flops() -> float | None:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def machine(accelerator: str) -> str:
    if accelerator == "gpu":
        return f"{torch.cuda.get_device_name()} (lent), {os.cpu_count()} CPU cores"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        name = "unknown CPU"
    return f"{name}, {os.cpu_count()} cores, CPU only"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="vit_tiny with precision auto, 2 rounds (< 3 minutes)")
    ap.add_argument("--models", nargs="+", default=["vit_tiny", "vit_small"])
    ap.add_argument("--precisions", nargs="+", default=["32-true", "auto"])
    ap.add_argument("--rounds", type=int, default=3, help="alternating train.py/bare pairs per configuration")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1, help="steps before the timed window")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per run")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="torch compute threads (default: cores minus the data worker)")
    ap.add_argument("--compile", nargs="+", choices=["off", "on"], default=["off"], help="model.compile values")
    ap.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--out", type=Path, help="write the Markdown result here")
    ap.add_argument("--profile", type=Path, help="also profile one more run of each side (torch.profiler) and "
                                                 "write its top operations to this folder")
    args = ap.parse_args()
    if args.quick:
        args.models, args.precisions, args.rounds, args.warmup, args.steps = ["vit_tiny"], ["auto"], 2, 2, 4
    logging.basicConfig(level=logging.WARNING)
    load = os.getloadavg()[0]

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        tmp = Path(tmp)
        n_train = args.batch * (args.warmup + args.steps)
        data = make_images(tmp / "HAM10000", int(n_train / 0.7) + len(DX))
        seen = {}
        device = "cuda" if args.accelerator == "gpu" else "cpu"
        peak = peak_flops() if device == "cuda" else None
        for model in args.models:
            flops = None
            for precision in args.precisions:
                resolved = resolve_precision(precision, device)
                label = precision if precision == resolved else f"{precision} -> {resolved}"
                for compiled in [c == "on" for c in args.compile]:
                    key = (model, resolved, compiled)
                    if key in seen:
                        # auto resolved to a precision measured above: same configuration, same numbers
                        rows.append({**seen[key], "precision": label, "repeat": True})
                        continue
                    ours, bare = [], []
                    for r in range(args.rounds):
                        cfg = compose_cfg(args, model, precision, compiled, data,
                                          tmp / f"run_{model}_{resolved}_{compiled}_{r}")
                        if flops is None and peak:
                            flops = train_flops_per_image(cfg)
                        order = ("train", "bare") if r % 2 == 0 else ("bare", "train")
                        for side in order:
                            result = (train_py(cfg) if side == "train"
                                      else bare_loop(cfg, args.warmup, args.steps, device))
                            (ours if side == "train" else bare).append(result)
                            gc.collect()  # the finished side's DataLoader workers must not run beside the next
                            print(f"  {model} {label} compile={compiled} round {r} {side:>5}: "
                                  f"{result['img_s']:.2f} img/s, {result['img_cpu_s']:.2f} img per CPU s, "
                                  f"data wait {100 * result['wait']:.1f}%", flush=True)
                    row = {
                        "model": model, "precision": label, "compile": compiled,
                        "train_img_s": statistics.median(x["img_s"] for x in ours),
                        "bare_img_s": statistics.median(x["img_s"] for x in bare),
                        "train_wait": statistics.median(x["wait"] for x in ours),
                        "bare_wait": statistics.median(x["wait"] for x in bare),
                        "round_ratios": [o["img_s"] / b["img_s"] for o, b in zip(ours, bare)],
                        "cpu_ratio": statistics.median(o["img_cpu_s"] / b["img_cpu_s"] for o, b in zip(ours, bare)),
                    }
                    # pairs run back to back: the median of their ratios resists load drifting over minutes
                    row["ratio"] = statistics.median(row["round_ratios"])
                    row["syncs"] = host_syncs(args, model, precision, compiled, data, tmp, device)
                    if args.profile:
                        stem = f"{model}_{resolved}_compile_{'on' if compiled else 'off'}"
                        cfg = compose_cfg(args, model, precision, compiled, data, tmp / f"profile_{stem}",
                                          profile=args.profile / f"{stem}_train_py.txt")
                        run(cfg)
                        bare_loop(cfg, args.warmup, args.steps, device, profile=args.profile / f"{stem}_bare.txt")
                    if peak and flops:
                        row["mfu"] = flops * row["train_img_s"] / peak
                        row["gflops"] = flops / 1e9
                    seen[key] = row
                    rows.append(row)

    header = (f"{args.batch} images/step at {SIZE} px from 600x450 JPEGs, {args.workers} DataLoader worker(s), "
              f"{args.threads} compute thread(s); {args.warmup} warm-up + {args.steps} timed steps per run, "
              f"{args.rounds} alternating round(s), medians.\n"
              f"Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC. Machine: {machine(args.accelerator)}"
              + (f", shared with other jobs (load average {load:.2f} at start); absolute numbers move with the "
                 f"load, ratios are from the same run" if args.accelerator == "cpu" else "")
              + f". torch {torch.__version__}.")
    mfu = any("mfu" in r for r in rows)
    lines = ["| model | precision | compile | train.py img/s | bare loop img/s | train.py / bare (median of rounds) "
             "| per-round ratios | train.py / bare, per main-process CPU s | data wait train.py | data wait bare "
             "| host syncs / step train.py (quiet steps) | host syncs / step bare |"
             + (" GFLOPs/img (fwd+bwd) | MFU train.py |" if mfu else ""),
             "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if mfu else "")]
    for r in rows:
        note = " (same configuration as above)" if r.get("repeat") else ""
        line = (f"| {r['model']} | {r['precision']}{note} | {'on' if r['compile'] else 'off'} | "
                f"{r['train_img_s']:.2f} | {r['bare_img_s']:.2f} | "
                f"{r['ratio']:.2f} | {', '.join(f'{x:.2f}' for x in r['round_ratios'])} | {r['cpu_ratio']:.2f} | "
                f"{100 * r['train_wait']:.1f}% | {100 * r['bare_wait']:.1f}% | "
                f"{r['syncs']['train']:.2f} ({r['syncs']['quiet_steps']} of {r['syncs']['steps']} with none) | "
                f"{r['syncs']['bare']:.2f} |")
        if mfu:
            line += f" {r.get('gflops', float('nan')):.1f} | {100 * r.get('mfu', float('nan')):.1f}% |"
        lines.append(line)
    table = "\n".join(lines)
    print()
    print(header)
    print()
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# Training throughput (experiments/bench_train.py)\n\n{header}\n\n{table}\n")
    worst = min(rows, key=lambda r: r["ratio"])
    print(f"worst configuration {worst['model']} {worst['precision']} compile {'on' if worst['compile'] else 'off'}: "
          f"train.py / bare loop img/s: {worst['ratio']:.2f}")


if __name__ == "__main__":
    main()
