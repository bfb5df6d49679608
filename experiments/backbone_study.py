"""Backbone study: our ViT, a ResNet and an EfficientNet of similar size, all from scratch at the
same small budget on a CPU. HAM10000 melanoma vs rest on the lesion-grouped test split, and PH2
as an external test set; AUROC with 95% intervals and paired differences against our ViT.

Every model trains through the framework as a user would run it:

    python train.py model=vit_tiny model.pretrained=null model.backbone.kwargs.depth=6 ...   # ours
    python train.py model=timm model.backbone.name=resnet10t model.pretrained=null ...
    python train.py model=timm model.backbone.name=efficientnet_b0 model.pretrained=null ...

with the same data (dataset=ham10000 label_set=binary, the DataModule's lesion-grouped split of
seed 42), resolution, epochs, batch, optimiser (AdamW, warmup + cosine, recipe=full_finetune),
loss, augmentation and fp32; the best epoch is chosen on val AUROC, then train.py writes its
calibrated test report (report/metrics.json: AUROC with the framework's lesion-grouped bootstrap
interval). PH2 is then scored by ``melanoma evaluate CKPT dataset=ph2 --external`` (all 200
images, nothing fitted). Paired AUROC differences against our ViT use
``melanoma.evaluation.bootstrap.paired_difference`` on the same resampled lesions for both models.

    python experiments/backbone_study.py --quick                      # smoke run: 32 px, 5 batches (3-7 min, mostly data set-up)
    python experiments/backbone_study.py --results experiments/results  # 10 epochs; the recorded run used --epochs 6 --seeds 42 (45 min on a loaded 2-core CPU)
    python experiments/backbone_study.py --analyse /tmp/backbone_study/full/<stamp> --results experiments/results

Needs the real data under ../shared/data (HAM10000 and PH2) or $MELANOMA_SHARED_DATA; without
it the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("MELANOMA_SHARED_DATA", REPO.parent / "shared" / "data"))
REFERENCE = "ViT (ours)"

# model name -> train.py overrides choosing it (everything else is shared, see common()).
# Sizes (backbone parameters, no classifier): ViT 2.72 M, resnet10t 4.92 M, efficientnet_b0 4.01 M.
MODELS = {
    REFERENCE: ["model=vit_tiny", "model.pretrained=null", "model.backbone.kwargs.patch_size=8",
                "model.backbone.kwargs.depth=6", "model.backbone.kwargs.drop_path_rate=0.0"],
    "ResNet-10-T": ["model=timm", "model.backbone.name=resnet10t", "model.pretrained=null"],
    "EfficientNet-B0": ["model=timm", "model.backbone.name=efficientnet_b0", "model.pretrained=null"],
}


@dataclass
class Plan:
    image_size: int = 64
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    seeds: list[int] = field(default_factory=lambda: [42])
    limit_train_batches: int | None = None
    parallel: int = 2
    n_resamples: int = 2000


QUICK = Plan(image_size=32, epochs=1, limit_train_batches=5, n_resamples=200)


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
            "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def common(plan: Plan, cache: Path) -> list[str]:
    out = [
        "dataset=ham10000", f"dataset.root={DATA / 'HAM10000'}", "dataset.label_set=binary",
        f"dataset.image_size={plan.image_size}", f"dataset.batch_size={plan.batch_size}", "dataset.seed=42",
        "dataset.num_workers=0", "dataset.pin_memory=false", "dataset.persistent_workers=false",
        f"dataset.cache_dir={cache}",
        "recipe=full_finetune", f"model.optimizer.lr={plan.lr}", f"model.optimizer.head_lr={plan.lr}",
        f"trainer.max_epochs={plan.epochs}", "trainer.accelerator=cpu", "trainer.precision=32-true",
        "trainer.enable_progress_bar=false", "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=20",
        "callbacks.progress_bar=null", "logger=csv", "num_threads=1",
        "optimized_metric=val/auroc", "test=false", "evaluate=true",
    ]
    if plan.limit_train_batches:
        out.append(f"trainer.limit_train_batches={plan.limit_train_batches}")
    return out


def run(cmd: list[str], log_file: Path) -> float:
    t0 = time.perf_counter()
    with open(log_file, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env(), stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}); see {log_file}")
    return time.perf_counter() - t0


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def train_and_score(name: str, seed: int, plan: Plan, out: Path, cache: Path) -> dict:
    run_dir = out / f"{slug(name)}_s{seed}"
    train_s = run([sys.executable, str(REPO / "train.py"), *common(plan, cache), *MODELS[name], f"seed={seed}",
                   f"hydra.run.dir={run_dir}"], out / f"{slug(name)}_s{seed}.log")
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    if not ckpt.exists():
        raise RuntimeError(f"{name}: train.py wrote no {ckpt}")
    ext_s = run([sys.executable, "-m", "melanoma.cli", "evaluate", str(ckpt), "dataset=ph2", f"dataset.root={DATA / 'PH2'}",
                 "dataset.label_set=binary", "dataset.num_workers=0", "--external", "--out", str(run_dir / "external_ph2"),
                 "--quiet"], out / f"{slug(name)}_s{seed}_ph2.log")
    print(f"  {name} seed {seed}: trained + HAM10000 report {train_s:.0f} s, PH2 {ext_s:.0f} s", flush=True)
    return {"model": name, "seed": seed, "run_dir": str(run_dir), "train_and_report_seconds": train_s,
            "external_seconds": ext_s}


def adopt(name: str, seed: int, out: Path, poll_s: float = 20.0) -> dict:
    """A run an earlier invocation started (its train.py may still be running): wait for its
    HAM10000 report, then score PH2. Its train time is read from its log (first line to report)."""
    run_dir, log_file = out / f"{slug(name)}_s{seed}", out / f"{slug(name)}_s{seed}.log"
    report = run_dir / "report" / "metrics.json"
    while not report.exists():
        if "Traceback" in log_file.read_text(errors="replace"):
            raise RuntimeError(f"{name} seed {seed} failed; see {log_file}")
        time.sleep(poll_s)
    time.sleep(5)  # the report's other files are written right after metrics.json
    first = re.search(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d+)\]", log_file.read_text(errors="replace"), re.M)
    began = datetime.datetime.strptime(first.group(1), "%Y-%m-%d %H:%M:%S").timestamp()
    train_s = report.stat().st_mtime - began
    ext_s = run([sys.executable, "-m", "melanoma.cli", "evaluate", str(run_dir / "checkpoints" / "best.ckpt"),
                 "dataset=ph2", f"dataset.root={DATA / 'PH2'}", "dataset.label_set=binary", "dataset.num_workers=0",
                 "--external", "--out", str(run_dir / "external_ph2"), "--quiet"], out / f"{slug(name)}_s{seed}_ph2.log")
    print(f"  {name} seed {seed} (adopted): trained + HAM10000 report {train_s:.0f} s, PH2 {ext_s:.0f} s", flush=True)
    return {"model": name, "seed": seed, "run_dir": str(run_dir), "train_and_report_seconds": train_s,
            "external_seconds": ext_s}


# --- analysis -----------------------------------------------------------------------------------

def _param_counts(ckpt: Path) -> dict:
    from melanoma.models.checkpoint import read_meta
    from melanoma.models.classifier import Classifier

    meta = read_meta(ckpt)
    model = Classifier.from_meta(meta)
    return {"family": meta.backbone_family, "backbone": meta.backbone,
            "backbone_params": sum(p.numel() for p in model.backbone.parameters()),
            "total_params": sum(p.numel() for p in model.parameters())}


def _forward_gflops(ckpt: Path, image_size: int) -> float:
    """Forward multiply-adds x 2 of one image through the checkpoint's network (torch's counter)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from melanoma.models.checkpoint import read_meta
    from melanoma.models.classifier import Classifier

    model = Classifier.from_meta(read_meta(ckpt)).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.backbone(torch.zeros(1, 3, image_size, image_size))
    return counter.get_total_flops() / 1e9


def _best_val(log_file: Path) -> float | None:
    hit = re.findall(r"best checkpoint .*\(val/auroc = ([0-9.]+)\)", log_file.read_text(errors="replace"))
    return float(hit[-1]) if hit else None


def _scores(report_dir: Path):
    import pandas as pd

    metrics = json.loads((report_dir / "metrics.json").read_text())
    table = pd.read_csv(report_dir / "predictions.csv")
    return metrics, table.set_index("path")


def _groups_ham(run_dir: Path):
    import pandas as pd

    split = pd.read_csv(run_dir / "splits.csv")
    return split[split["split"] == "test"].set_index("path")["group"]


def _groups_ph2(ckpt: Path):
    """PH2's lesion groups as the external report formed them (near-duplicates join a group)."""
    from melanoma.evaluation.datasets import external_datamodule
    from melanoma.models.checkpoint import read_meta

    dm = external_datamodule(read_meta(ckpt), ["dataset=ph2", f"dataset.root={DATA / 'PH2'}",
                                               "dataset.label_set=binary", "dataset.num_workers=0"])
    return dm.table.set_index("path")["group"]


def analyse(out: Path, plan: Plan) -> dict:
    import pandas as pd

    from melanoma.evaluation.bootstrap import paired_difference
    from melanoma.evaluation.metrics import binary_auroc

    record = json.loads((out / "runs.json").read_text())
    runs = record["runs"]
    ph2_groups = None
    rows, paired = [], []
    preds: dict[tuple[str, int, str], object] = {}
    for r in runs:
        run_dir = Path(r["run_dir"])
        ckpt = run_dir / "checkpoints" / "best.ckpt"
        row = {**r, **_param_counts(ckpt), "forward_gflops": _forward_gflops(ckpt, plan.image_size),
               "best_val_auroc": _best_val(out / f"{slug(r['model'])}_s{r['seed']}.log")}
        if ph2_groups is None:
            ph2_groups = _groups_ph2(ckpt)
        for key, report_dir, groups in (("ham10000", run_dir / "report", _groups_ham(run_dir)),
                                        ("ph2", run_dir / "external_ph2", ph2_groups)):
            metrics, table = _scores(report_dir)
            table = table.sort_index()
            y = (table["true_label"] == "melanoma").to_numpy()
            p = table["melanoma_probability"].to_numpy()
            # the report's AUROC is the one fact; the predictions must give it back exactly
            assert abs(binary_auroc(p, y) - metrics["auroc"]) < 1e-9, (key, r["model"])
            row[key] = {"n": int(metrics["n"]), "n_melanoma": int(y.sum()), "auroc": metrics["auroc"],
                        "auroc_ci": metrics["ci95"]["auroc"], "ci_method": metrics["ci95_method"]["method"]}
            preds[(r["model"], r["seed"], key)] = (table.index, y, p, groups.reindex(table.index).to_numpy())
        rows.append(row)
    for r in rows:
        if r["model"] == REFERENCE:
            continue
        for key in ("ham10000", "ph2"):
            idx, y, p, g = preds[(r["model"], r["seed"], key)]
            ridx, ry, rp, _ = preds[(REFERENCE, r["seed"], key)]
            if not (idx.equals(ridx) and (y == ry).all()):
                raise RuntimeError(f"{key}: {r['model']} and {REFERENCE} were scored on different images")
            if pd.isna(g).any():
                raise RuntimeError(f"{key}: images without a lesion group")
            d = paired_difference(p, rp, y, groups=g, n_resamples=plan.n_resamples)
            paired.append({"model": r["model"], "seed": r["seed"], "dataset": key, "reference": REFERENCE,
                           **d.summary()})
    summary = []
    for name in MODELS:
        mine = [r for r in rows if r["model"] == name]
        entry = {"model": name, "seeds": [r["seed"] for r in mine]}
        for key in ("ham10000", "ph2"):
            values = [r[key]["auroc"] for r in mine]
            entry[key] = {"mean_auroc": sum(values) / len(values), "min": min(values), "max": max(values)}
            diffs = [d["difference"] for d in paired if d["model"] == name and d["dataset"] == key]
            if diffs:
                entry[key]["mean_difference"] = sum(diffs) / len(diffs)
                entry[key]["differences"] = diffs
        summary.append(entry)
    result = {"plan": asdict(plan), "machine": machine(), "seed_summary": summary, "started": record["started"],
              "total_seconds": record["total_seconds"], "command": record["command"], "rows": rows, "paired": paired}
    (out / "backbone_study.json").write_text(json.dumps(result, indent=2, default=str))
    return result


# --- output -------------------------------------------------------------------------------------

def machine() -> dict:
    import timm
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version()}


def _ci(v: float, ci) -> str:
    from melanoma.evaluation.bootstrap import format_ci

    return format_ci(v, ci)


def _diff(d: dict | None) -> str:
    if d is None:
        return "—"
    lo, hi = d["interval"]
    return f"{d['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def tables(result: dict) -> str:
    rows, paired = result["rows"], result["paired"]
    find = {(d["model"], d["seed"], d["dataset"]): d for d in paired}
    lines = ["| model | seed | backbone params | HAM10000 test AUROC [95% CI] | PH2 external AUROC [95% CI] | "
             f"HAM10000: AUROC - {REFERENCE} [paired 95% CI] | PH2: AUROC - {REFERENCE} [paired 95% CI] | "
             "GFLOPs / image (fwd) | best val AUROC | train + report (s) |",
             "|---|---:|---:|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        k = (r["model"], r["seed"])
        val = "n/a" if r["best_val_auroc"] is None else f"{r['best_val_auroc']:.3f}"
        lines.append(
            f"| {r['model']} ({r['backbone']}) | {r['seed']} | {r['backbone_params'] / 1e6:.2f} M "
            f"| {_ci(r['ham10000']['auroc'], r['ham10000']['auroc_ci'])} | {_ci(r['ph2']['auroc'], r['ph2']['auroc_ci'])} "
            f"| {_diff(find.get((*k, 'ham10000')))} | {_diff(find.get((*k, 'ph2')))} "
            f"| {r['forward_gflops']:.3f} | {val} "
            f"| {r['train_and_report_seconds']:.0f} |")
    share = ["", "Share of paired resamples in which the model's AUROC was at or below our ViT's "
             "(how often it did not win):", "",
             "| model | seed | HAM10000 | PH2 |", "|---|---:|---:|---:|"]
    for r in rows:
        if r["model"] == REFERENCE:
            continue
        k = (r["model"], r["seed"])
        share.append(f"| {r['model']} | {r['seed']} | {find[(*k, 'ham10000')]['share_at_or_below_zero']:.3f} "
                     f"| {find[(*k, 'ph2')]['share_at_or_below_zero']:.3f} |")
    seeds = []
    if len(result["plan"]["seeds"]) > 1:
        seeds = ["", f"Over the seeds {result['plan']['seeds']}: mean AUROC (lowest, highest) and the mean of the "
                 f"per-seed differences to {REFERENCE} (each seed's model against the same seed's ViT):", "",
                 f"| model | HAM10000 mean (min, max) | PH2 mean (min, max) | HAM10000 mean difference | PH2 mean difference |",
                 "|---|---|---|---:|---:|"]
        for e in result["seed_summary"]:
            h, p = e["ham10000"], e["ph2"]
            dh = "—" if "mean_difference" not in h else f"{h['mean_difference']:+.3f}"
            dp = "—" if "mean_difference" not in p else f"{p['mean_difference']:+.3f}"
            seeds.append(f"| {e['model']} | {h['mean_auroc']:.3f} ({h['min']:.3f}, {h['max']:.3f}) "
                         f"| {p['mean_auroc']:.3f} ({p['min']:.3f}, {p['max']:.3f}) | {dh} | {dp} |")
    return "\n".join(lines + share + seeds)


def figure(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 * len(rows) + 1.6), sharey=True, sharex=True)
    for ax, key, title in zip(axes, ("ham10000", "ph2"), ("HAM10000 test (lesion-grouped)", "PH2 (external)")):
        for i, r in enumerate(rows):
            v, (lo, hi) = r[key]["auroc"], r[key]["auroc_ci"]
            ax.errorbar(v, i, xerr=[[v - lo], [hi - v]], fmt="o", capsize=4,
                        color="tab:blue" if r["model"] == REFERENCE else "tab:orange")
        ax.set_title(f"{title}, n = {rows[0][key]['n']} ({rows[0][key]['n_melanoma']} melanomas)", fontsize=9)
        ax.axvline(0.5, color="k", lw=0.5, ls=":")
        ax.set_xlabel("melanoma AUROC (95% bootstrap CI)")
    axes[0].set_yticks(range(len(rows)), [f"{r['model']}\n{r['backbone_params'] / 1e6:.1f} M, seed {r['seed']}" for r in rows])
    axes[0].invert_yaxis()
    lowest = min(r[k]["auroc_ci"][0] for r in rows for k in ("ham10000", "ph2"))
    axes[0].set_xlim(min(0.45, lowest - 0.02), 1.0)
    fig.suptitle(f"From scratch, {result['plan']['epochs']} epoch(s) at {result['plan']['image_size']} px on a CPU", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(result: dict) -> str:
    plan, m = result["plan"], result["machine"]
    rows = result["rows"]
    ratio = max(r["backbone_params"] for r in rows) / min(r["backbone_params"] for r in rows)
    sizes = ", ".join(f"{r['model']} `{r['backbone']}` {r['backbone_params']:,} backbone / {r['total_params']:,} total"
                      for r in rows if r["seed"] == plan["seeds"][0])
    return "\n\n".join([
        "# Backbone study: our ViT, a ResNet and an EfficientNet from scratch (issue 22, point 6)",
        f"- Date: {result['started']} UTC, {result['total_seconds'] / 60:.1f} min wall in all.\n"
        f"- Machine: {m['cpu']}, {m['cores']} cores shared with other developers' work, CPU only; torch {m['torch']}, "
        f"timm {m['timm']}, Python {m['python']}. One torch thread per run, {plan['parallel']} runs at a time.\n"
        f"- Command: `{result['command']}` (`--quick` is a smoke version).",
        "## What ran",
        f"- Data: the real HAM10000 (10,015 dermoscopic images at 200x150), melanoma vs rest, the HAM10000 "
        f"DataModule's split (seed 42, 70/15/15, stratified, grouped by lesion_id and by near-duplicate "
        f"content). PH2 (200 images) as an external test set: every image, scored with the calibration fitted on "
        f"HAM10000 val (`melanoma evaluate CKPT dataset=ph2 --external`).\n"
        f"- Models, all from random initialisation (`model.pretrained=null`): {sizes}. Our ViT is the DeiT-tiny "
        f"width (192, 3 heads) at depth 6 and patch 8; the CNNs are timm's `resnet10t` and `efficientnet_b0` "
        f"through `model=timm`. Backbone parameter counts are within {ratio:.2f}x of each other; forward GFLOPs per "
        f"image at {plan['image_size']} px (torch's counter): "
        + ", ".join(f"{r['model']} {r['forward_gflops']:.3f}" for r in rows if r["seed"] == plan["seeds"][0]) + ".\n"
        f"- Shared recipe: {plan['image_size']} px, {plan['epochs']} epoch(s)"
        + (f" of {plan['limit_train_batches']} batches" if plan['limit_train_batches'] else " (every train image per epoch)")
        + f", batch {plan['batch_size']}, AdamW lr {plan['lr']:g} (head the same), weight decay 0.05 (not on norms and "
        f"biases), 1 warmup epoch then cosine (`recipe=full_finetune`), cross-entropy with label smoothing 0.1, no "
        f"class weights, the default augmentation, drop path 0, fp32. The checkpoint kept is the epoch with the best "
        f"val AUROC (HAM10000 val split; test never used to choose). Seeds: {plan['seeds']} (the split is fixed; the "
        f"seed sets initialisation and batch order).\n"
        f"- What differs: the architecture only. Mean/std are ImageNet's for all three (timm's config for the CNNs, "
        f"the ViT's default). Compute per image differs a lot at similar parameter count (the GFLOPs above: the ViT "
        f"runs {(plan['image_size'] // 8) ** 2} tokens through 6 blocks). The wall times below are not a speed "
        f"comparison: a shared, loaded machine, two runs at a time.",
        "## Results",
        "AUROC: melanoma vs rest on the calibrated melanoma probability (the reports' number). Marginal 95% intervals: "
        "the reports' percentile bootstrap (1,000 resamples, whole lesions resampled). Paired differences: "
        f"`melanoma.evaluation.bootstrap.paired_difference`, {plan['n_resamples']:,} resamples, the same resampled "
        "lesions for both models.",
        tables(result),
        "![AUROC with 95% intervals per model, both test sets](backbone_study.png)",
        "## What this design can and cannot show",
        "- It compares three architectures **trained from scratch** on ~7,000 HAM10000 images for a few CPU minutes "
        f"each ({plan['epochs']} epoch(s) at {plan['image_size']} px). Every model here is far from converged and far "
        "below what pretrained models reach; the ranking at this budget need not hold at a longer one, at a larger "
        "resolution, or with other recipes (the rates were not tuned per architecture: one AdamW recipe for all).\n"
        "- **No pretrained weights** were used (none can be downloaded on this machine). It says nothing about "
        "ImageNet-pretrained CNNs or ViTs, nor about the dermatology foundation models of the issue (DermLIP, "
        "DermFM-Zero, MAKE, PanDerm, BiomedCLIP): those are compared through their own weights, which the user brings.\n"
        "- PH2 has 200 images (40 melanomas): its intervals are wide, and it differs from HAM10000 in acquisition "
        "(one clinic in Portugal; here 384x288 JPEGs of the ~768x560 originals, resized to the same input). A difference on PH2 is a statement about transfer to "
        "one small external set.\n"
        f"- {len(plan['seeds'])} seed(s) per model: the seed-to-seed spread of from-scratch training is part of the "
        "uncertainty and is not in the bootstrap intervals (those cover the choice of test images only).\n"
        "- Similar size means similar parameter count, not similar compute: per image the networks differ in FLOPs "
        "(table), and on this CPU in speed.",
    ]) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 32 px, 1 epoch of 5 batches (3-7 min, mostly data set-up)")
    p.add_argument("--epochs", type=int, help="override the plan's epochs")
    p.add_argument("--image-size", type=int, help="override the plan's image size")
    p.add_argument("--seeds", type=int, nargs="+", help="override the plan's seeds (e.g. 42 43)")
    p.add_argument("--out", type=Path, default=Path("/tmp/backbone_study"))
    p.add_argument("--results", type=Path, default=None, help="write backbone_study.{md,json,png} here")
    p.add_argument("--analyse", type=Path, default=None, help="only analyse a finished run folder")
    p.add_argument("--into", type=Path, default=None,
                   help="continue in this run folder (an interrupted run): with --jobs and --adopt")
    p.add_argument("--jobs", nargs="*", default=None, metavar="MODEL:SEED", help="with --into: train and score these")
    p.add_argument("--adopt", nargs="*", default=[], metavar="MODEL:SEED",
                   help="with --into: runs started earlier (maybe still training): wait for them, then score PH2")
    a = p.parse_args()
    missing = [d for d in (DATA / "HAM10000" / "HAM10000_metadata.csv", DATA / "PH2" / "PH2_dataset.txt") if not d.exists()]
    if missing:
        print(f"backbone study skipped: the real data is not here ({', '.join(map(str, missing))} missing); "
              f"put HAM10000 and PH2 under {DATA} or set MELANOMA_SHARED_DATA")
        return
    if a.analyse:
        out = a.analyse
        plan = Plan(**json.loads((out / "runs.json").read_text())["plan"])
    else:
        plan = QUICK if a.quick else Plan()
        if a.epochs:
            plan.epochs = a.epochs
        if a.image_size:
            plan.image_size = a.image_size
        if a.seeds:
            plan.seeds = a.seeds
        if a.into:
            out = a.into
            began = datetime.datetime.strptime(out.name, "%Y%m%d_%H%M%S").replace(tzinfo=datetime.timezone.utc)
        else:
            out = a.out / ("quick" if a.quick else "full") / time.strftime("%Y%m%d_%H%M%S")
            out.mkdir(parents=True)
            began = datetime.datetime.now(datetime.timezone.utc)
        started = began.strftime("%Y-%m-%d %H:%M")
        print(f"plan: {plan}\nruns in {out}", flush=True)
        t0 = time.perf_counter()
        # the longest runs first, so that the two workers finish together
        jobs = [(name, seed) for name in (REFERENCE, "EfficientNet-B0") for seed in plan.seeds]
        jobs += [("ResNet-10-T", seed) for seed in plan.seeds]
        def parse(spec: str) -> tuple[str, int]:
            name, seed = spec.rsplit(":", 1)
            if name not in MODELS:
                raise SystemExit(f"unknown model {name!r} in {spec!r}; choose from {list(MODELS)}")
            return name, int(seed)

        if a.into:
            jobs = [parse(j) for j in a.jobs or []]
        adopted = [parse(j) for j in a.adopt]
        with ThreadPoolExecutor(plan.parallel + len(adopted)) as pool:
            futures = [pool.submit(adopt, n, s, out) for n, s in adopted]
            futures += [pool.submit(train_and_score, n, s, plan, out, a.out / "cache") for n, s in jobs]
            runs = [f.result() for f in futures]
        order = list(MODELS)
        runs.sort(key=lambda r: (r["seed"], order.index(r["model"])))
        command = "python experiments/backbone_study.py " + " ".join(sys.argv[1:])
        total = (datetime.datetime.now(datetime.timezone.utc) - began).total_seconds() if a.into else time.perf_counter() - t0
        if a.into and (out / "runs.json").exists():
            earlier = json.loads((out / "runs.json").read_text())
            runs = [r for r in earlier["runs"] if (r["model"], r["seed"]) not in {(x["model"], x["seed"]) for x in runs}] + runs
            command = f"{earlier['command']}; then {command}"
        runs.sort(key=lambda r: (r["seed"], order.index(r["model"])))
        (out / "runs.json").write_text(json.dumps({"plan": asdict(plan), "runs": runs, "started": started,
                                                   "total_seconds": total, "command": command},
                                                  indent=2))
    result = analyse(out, plan)
    text = markdown(result)
    print("\n" + tables(result), flush=True)
    (out / "backbone_study.md").write_text(text)
    figure(result, out / "backbone_study.png")
    if a.results:
        a.results.mkdir(parents=True, exist_ok=True)
        (a.results / "backbone_study.json").write_text(json.dumps(result, indent=2, default=str))
        (a.results / "backbone_study.md").write_text(text)
        figure(result, a.results / "backbone_study.png")
        print(f"written to {a.results}/backbone_study.{{md,json,png}}", flush=True)


if __name__ == "__main__":
    main()
