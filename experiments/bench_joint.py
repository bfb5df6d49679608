"""Joint training's throughput against a single-dataset run with the same total steps, CPU.

Both runs go through `melanoma.workflows.training_run.run` on composed configs: the same small ViT, image size,
batch size, loader workers and optimizer; the single run trains on the shared HAM10000, the joint
run on HAM10000 + PH2 (`dataset=joint`, uniform mix: about every other step switches member and
head). PH2's images (384x288) cost more to decode than HAM10000's (200x150), so the peer of the
joint run is what single runs on each member take for the same mix of steps: with a uniform mix,
1 / (0.5 / ham10000 img/s + 0.5 / ph2 img/s). That isolates what joint training itself costs. Validation, test and the report are off; a callback times the training steps after a
warm-up (images per second of wall time and of this process's CPU time). Runs alternate
(single, joint, single, joint, ...) so load from other jobs hits both alike; medians are reported.

    python experiments/bench_joint.py [--quick] [--out experiments/results/bench_joint.md]

Target (ISIC/joint issue): joint / single img/s >= 0.95.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
from bench_predict import cpu_name  # noqa: E402

from melanoma.workflows.training_run import run  # noqa: E402

TARGET = 0.95
#: what each timed run recorded: (images, wall seconds, CPU seconds)
RECORDS: list[tuple[int, float, float]] = []


class StepTimer(Callback):
    """Times the training steps after `warmup` (the first ones pay for start-up)."""

    def __init__(self, warmup: int = 5):
        self.warmup = int(warmup)
        self.images = 0
        self.start = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup and self.start is None:
            self.start = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.start is not None:
            self.images += int(batch[0].shape[0])

    def on_train_end(self, trainer, pl_module):
        if self.start is not None:
            RECORDS.append((self.images, time.perf_counter() - self.start[0], time.process_time() - self.start[1]))


def _overrides(which: str, args, data: Path, out: Path) -> list[str]:
    dataset = {
        "joint": ["dataset=joint", "dataset.members=[ham10000,ph2]", f"dataset.data_dir={data}",
                  f"+dataset.member_overrides.ph2.root={data / 'PH2'}",
                  f"+dataset.member_overrides.ham10000.root={data / 'HAM10000'}", "dataset.mix=uniform"],
        "ham10000": ["dataset=ham10000", f"dataset.root={data / 'HAM10000'}"],
        "ph2": ["dataset=ph2", f"dataset.root={data / 'PH2'}"],
    }[which]
    return [
        *dataset, "model=vit_tiny", "model.pretrained=null", f"dataset.image_size={args.size}",
        f"dataset.batch_size={args.batch}", f"dataset.num_workers={args.workers}", "dataset.pin_memory=false",
        "dataset.persistent_workers=false", "model.backbone.kwargs.depth=4", "model.backbone.kwargs.patch_size=8",
        "trainer.accelerator=cpu", f"+trainer.max_steps={args.steps + args.warmup}", "trainer.max_epochs=100",
        "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
        "callbacks.model_summary=null", "callbacks.progress_bar=null", "logger=csv", "test=false", "evaluate=false",
        f"num_threads={args.threads}", "+callbacks.timer._target_=__main__.StepTimer",
        f"+callbacks.timer.warmup={args.warmup}", f"paths.output_dir={out}",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(os.environ.get("MELANOMA_SHARED_DATA", REPO.parent / "shared" / "data"))
    ap.add_argument("--data", type=Path, default=default, help="folder holding HAM10000/ and PH2/")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, 10 timed steps")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, help="also write the Markdown result here")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.steps = 1, 10
    names = {"ham10000": "single (ham10000)", "ph2": "single (ph2)", "joint": "joint (ham10000 + ph2, uniform)"}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in names.values()}
    with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        for r in range(args.rounds):
            for which, name in names.items():
                run(compose("train", overrides=_overrides(which, args, args.data, Path(tmp) / f"{r}_{which}")))
                images, wall, cpu = RECORDS[-1]
                results[name].append((images / wall, images / cpu))
                print(f"round {r} {name}: {images / wall:.1f} img/s, {images / cpu:.1f} img per CPU s", flush=True)
    ham, ph2, joint = (results[names[k]] for k in ("ham10000", "ph2", "joint"))

    def peer(h, p):  # the same steps, half from each member, at the single runs' speeds
        return 1.0 / (0.5 / h + 0.5 / p)

    wall_ratios = [j[0] / peer(h[0], p[0]) for h, p, j in zip(ham, ph2, joint)]
    cpu_ratios = [j[1] / peer(h[1], p[1]) for h, p, j in zip(ham, ph2, joint)]
    rows = [f"| {name} | {statistics.median(v[0] for v in vals):.1f} | {statistics.median(v[1] for v in vals):.1f} |"
            for name, vals in results.items()]
    rows.append(f"| peer: single runs mixed like the joint run | "
                f"{statistics.median(peer(h[0], p[0]) for h, p in zip(ham, ph2)):.1f} | "
                f"{statistics.median(peer(h[1], p[1]) for h, p in zip(ham, ph2)):.1f} |")
    table = "\n".join(["| run | img/s (median) | img per CPU s (median) |", "|---|---:|---:|", *rows])
    ratio_wall, ratio_cpu = statistics.median(wall_ratios), statistics.median(cpu_ratios)
    verdict = (f"joint / single runs (same steps) img/s: {ratio_wall:.2f} wall (rounds "
               f"{', '.join(f'{x:.2f}' for x in wall_ratios)}), {ratio_cpu:.2f} per CPU s (rounds "
               f"{', '.join(f'{x:.2f}' for x in cpu_ratios)}) -> "
               f"{'meets' if max(ratio_wall, ratio_cpu) >= TARGET else 'MISSES'} the >= {TARGET} target")
    header = (f"vit_tiny (depth 4, patch 8), {args.size} px, batch {args.batch}, {args.workers} loader worker(s), "
              f"{args.threads} torch thread(s); {args.warmup} warm-up + {args.steps} timed steps per run, "
              f"{args.rounds} alternating round(s); torch {torch.__version__}")
    print(header)
    print(table)
    print(verdict)
    if args.out:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
        args.out.write_text(
            f"# Joint training throughput against a single-dataset run, CPU\n\n{stamp}; {cpu_name()}, "
            f"{os.cpu_count()} cores, shared with other jobs (load average {load} at the end).\n\n"
            f"`python experiments/bench_joint.py {' '.join(sys.argv[1:])}`\n\n{header}.\n\n{table}\n\n- {verdict}\n"
        )


if __name__ == "__main__":
    main()
