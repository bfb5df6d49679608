"""Transfer study: does gradual unfreezing help a ViT? At small scale, on real data, on a CPU.

1. Pretrain a small ViT once on the shared HAM10000 (7-class dx, lesion-grouped train split).
2. Fine-tune it on PH2 (melanoma vs rest), k-fold CV with fixed seeds, once per recipe
   (linear_probe, full_finetune, gradual, llrd, lp_ft) through ``model.init_from``, plus a
   from-scratch baseline; then the best recipe again with ``ema=on`` and with mixup/cutmix.
3. Pool each setting's out-of-fold predictions with ``melanoma.workflows.summarize.summarize``:
   AUROC with its 95% bootstrap interval, specificity at the threshold reaching 95% sensitivity
   (chosen on the pooled predictions themselves: optimistic), wall time; a table and a figure.

Every run is ``python train.py -m`` (Hydra multirun over the folds, one process per setting;
two settings at a time, one torch thread each, for a 2-core machine).

    python experiments/transfer_study.py --quick          # < 5 min: tiny, 2 folds, 1 epoch, 2 recipes
    python experiments/transfer_study.py                  # the recorded run (about 30 min on 2 cores)
    python experiments/transfer_study.py --results experiments/results   # also write the figure there
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MELANOMA_SHARED_DATA", REPO.parent.parent / "shared" / "data"))
RECIPES = ["linear_probe", "full_finetune", "gradual", "llrd", "lp_ft"]
MIXUP = ["model.mixup.mixup_alpha=0.8", "model.mixup.cutmix_alpha=1.0"]


@dataclass
class Plan:
    image_size: int = 64
    depth: int = 4
    patch: int = 8
    pretrain_epochs: int = 3
    pretrain_batches: int | None = 60     # per epoch, batch 64: a random subset of the train split each epoch
    folds: int = 5
    epochs: int = 10
    recipes: list[str] = field(default_factory=lambda: list(RECIPES))
    start_epoch: int = 3                   # gradual / lp_ft: head-only epochs before thawing
    ema_decay: float = 0.95                # ~100 optimizer steps per fold: 0.999 would barely move
    parallel: int = 2


QUICK = Plan(image_size=32, depth=2, pretrain_epochs=1, pretrain_batches=5, folds=2, epochs=1,
             recipes=["linear_probe", "lp_ft"], start_epoch=0)


def common(plan: Plan) -> list[str]:
    return [
        "model=vit_tiny", "model.pretrained=null",
        f"model.backbone.kwargs.depth={plan.depth}", f"model.backbone.kwargs.patch_size={plan.patch}",
        "model.backbone.kwargs.drop_path_rate=0.0",
        f"dataset.image_size={plan.image_size}", "dataset.num_workers=0", "dataset.pin_memory=false",
        "dataset.persistent_workers=false", f"dataset.cache_dir={CACHE}",
        "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.enable_progress_bar=false",
        "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=5",
        "callbacks.model_summary=null", "callbacks.progress_bar=null", "logger=csv", "num_threads=1",
    ]


def train_py(args: list[str], log_file: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with open(log_file, "w") as f:
        proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env,
                              stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"train.py failed ({proc.returncode}); see {log_file}")
    return time.perf_counter() - t0


def pretrain(plan: Plan, out: Path) -> tuple[Path, float]:
    run_dir = out / "pretrain_ham10000"
    args = [*common(plan), "dataset=ham10000", f"dataset.root={DATA / 'HAM10000'}", "dataset.label_set=dx",
            "dataset.batch_size=64", "recipe=full_finetune",
            "model.optimizer.lr=1e-3", "model.optimizer.head_lr=1e-3",
            f"trainer.max_epochs={plan.pretrain_epochs}", "test=false", "evaluate=false",
            f"hydra.run.dir={run_dir}"]
    if plan.pretrain_batches:
        args.append(f"trainer.limit_train_batches={plan.pretrain_batches}")
    seconds = train_py(args, out / "pretrain.log")
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    if not ckpt.exists():
        raise RuntimeError(f"pretraining wrote no {ckpt}")
    return ckpt, seconds


def settings(plan: Plan, ckpt: Path) -> dict[str, list[str]]:
    init = [f"model.init_from={ckpt}"]
    thaw = [f"callbacks.unfreezing.start_epoch={plan.start_epoch}", "callbacks.unfreezing.warmup_steps=8"]
    per = {
        "linear_probe": ["recipe=linear_probe", *init],
        "full_finetune": ["recipe=full_finetune", *init],
        "gradual": ["recipe=gradual", *init, *thaw],
        "llrd": ["recipe=llrd", *init],
        "lp_ft": ["recipe=lp_ft", *init, *thaw],
    }
    return {r: per[r] for r in plan.recipes}


def scratch_args() -> list[str]:
    # the same network and schedule with no pretraining, at a from-scratch rate (the fine-tuning
    # rates 5e-5 / 5e-4 barely move random weights in this many steps)
    return ["recipe=full_finetune", "model.optimizer.lr=5e-4", "model.optimizer.head_lr=5e-4"]


def finetune(name: str, args: list[str], plan: Plan, out: Path) -> dict:
    from melanoma.workflows.summarize import summarize

    sweep = out / name
    folds = ",".join(str(k) for k in range(plan.folds))
    seconds = train_py(["-m", *common(plan), *args, "dataset=ph2", f"dataset.root={DATA / 'PH2'}",
                        "dataset.label_set=binary", "dataset.batch_size=16", "seed=42", "dataset.seed=42",
                        f"dataset.num_folds={plan.folds}", f"dataset.fold={folds}",
                        f"trainer.max_epochs={plan.epochs}", "evaluate=true", f"hydra.sweep.dir={sweep}"],
                       out / f"{name}.log")
    summary = summarize(sweep)
    oof = summary["oof"]
    return {"setting": name, "overrides": args, "seconds": seconds, "n": oof["n"], "auroc": oof["auroc"],
            "auroc_ci": oof["ci95"]["auroc"], "spec": oof["specificity_at_threshold"],
            "spec_ci": oof["ci95"]["specificity_at_threshold"], "sens": oof["sensitivity_at_threshold"],
            "ensemble_test_auroc": summary["ensemble_test"]["auroc"],
            "ensemble_test_auroc_ci": summary["ensemble_test"]["ci95"]["auroc"]}


def collect(futures: dict) -> list[dict]:
    rows = []
    for n, f in futures.items():
        rows.append(f.result())
        r = rows[-1]
        print(f"  {n}: AUROC {r['auroc']:.3f} [{r['auroc_ci'][0]:.3f}, {r['auroc_ci'][1]:.3f}] "
              f"({r['seconds']:.0f} s)", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| setting | n OOF | AUROC [95% CI] | spec @ 95% sens [95% CI] (optimistic) | sens | "
             "fold-ensemble test AUROC [95% CI] | wall (s) |", "|---|---:|---|---|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['n']} | {r['auroc']:.3f} [{r['auroc_ci'][0]:.3f}, {r['auroc_ci'][1]:.3f}] "
                     f"| {r['spec']:.3f} [{r['spec_ci'][0]:.3f}, {r['spec_ci'][1]:.3f}] | {r['sens']:.3f} "
                     f"| {r['ensemble_test_auroc']:.3f} [{r['ensemble_test_auroc_ci'][0]:.3f}, "
                     f"{r['ensemble_test_auroc_ci'][1]:.3f}] | {r['seconds']:.0f} |")
    return "\n".join(lines)


def paired_differences(runs_dir: Path, rows: list[dict], reference: str, n_boot: int = 2000) -> list[dict]:
    """AUROC(setting) - AUROC(reference) on the same pooled out-of-fold images, with a paired 95%
    percentile bootstrap (images resampled together for both; PH2 has one image per lesion).
    Marginal intervals that overlap can still hide a paired difference, and vice versa."""
    import numpy as np
    import pandas as pd

    from melanoma.evaluation.metrics import binary_auroc

    def load(name):
        t = pd.read_csv(runs_dir / name / "oof_predictions.csv").set_index("path").sort_index()
        return t["prob_melanoma"].to_numpy(), (t["true_label"] == "melanoma").to_numpy(), t.index

    ref_p, ref_y, ref_i = load(reference)
    rng = np.random.default_rng(0)
    idx = [rng.integers(0, len(ref_y), len(ref_y)) for _ in range(n_boot)]
    out = []
    for r in rows:
        if r["setting"] == reference:
            continue
        p, y, i = load(r["setting"])
        assert (i == ref_i).all() and (y == ref_y).all(), "settings must pool the same images"
        diff = binary_auroc(p, y) - binary_auroc(ref_p, y)
        boots = np.array([binary_auroc(p[b], y[b]) - binary_auroc(ref_p[b], y[b]) for b in idx])
        lo, hi = np.nanpercentile(boots, [2.5, 97.5])
        out.append({"setting": r["setting"], "reference": reference, "diff": float(diff), "ci": [float(lo), float(hi)]})
    return out


def paired_table(diffs: list[dict]) -> str:
    lines = ["| setting | vs | AUROC difference [paired 95% CI] | CI excludes 0 |", "|---|---|---|---|"]
    for d in diffs:
        lines.append(f"| {d['setting']} | {d['reference']} | {d['diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] "
                     f"| {'yes' if d['ci'][0] > 0 or d['ci'][1] < 0 else 'no'} |")
    return "\n".join(lines)


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    for i, r in enumerate(rows):
        lo, hi = r["auroc_ci"]
        ax.errorbar(r["auroc"], i, xerr=[[r["auroc"] - lo], [hi - r["auroc"]]], fmt="o", capsize=4,
                    color="tab:gray" if r["setting"] == "scratch" else "tab:blue")
    ax.set_yticks(range(len(rows)), [r["setting"] for r in rows])
    ax.invert_yaxis()
    ax.axvline(0.5, color="k", lw=0.5, ls=":")
    ax.set_xlabel("pooled out-of-fold AUROC, melanoma vs rest (95% bootstrap CI)")
    ax.set_title("PH2 fine-tuning from a HAM10000-pretrained ViT")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    global CACHE
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny: 32 px, 2 folds, 1 epoch, 2 recipes (< 5 min)")
    p.add_argument("--out", type=Path, default=Path("/tmp/transfer_study"))
    p.add_argument("--results", type=Path, default=None, help="write transfer_study.{png,json} here")
    p.add_argument("--paired", type=Path, default=None,
                   help="only compute paired AUROC differences for a finished run folder (its transfer_study.json)")
    a = p.parse_args()
    if a.paired:
        record = json.loads((a.paired / "transfer_study.json").read_text())
        for ref in (record["best"], "scratch"):
            print(paired_table(paired_differences(a.paired, record["rows"], ref)) + "\n")
        return
    plan = QUICK if a.quick else Plan()
    out = a.out / ("quick" if a.quick else "full") / time.strftime("%Y%m%d_%H%M%S")
    out.mkdir(parents=True)
    CACHE = a.out / "cache"
    t0 = time.perf_counter()
    print(f"plan: {plan}\nruns in {out}", flush=True)

    pool = ThreadPoolExecutor(plan.parallel)
    # the from-scratch baseline needs no checkpoint: it shares the CPUs with pretraining
    futures = {"scratch": pool.submit(finetune, "scratch", scratch_args(), plan, out)}
    ckpt, pre_s = pretrain(plan, out)
    print(f"pretrained on HAM10000 in {pre_s:.0f} s: {ckpt}", flush=True)
    futures.update({n: pool.submit(finetune, n, a, plan, out) for n, a in settings(plan, ckpt).items()})
    rows = collect(futures)
    recipes = [r for r in rows if r["setting"] in RECIPES]
    best = max(recipes, key=lambda r: r["auroc"])
    print(f"best recipe by pooled OOF AUROC: {best['setting']}", flush=True)
    extra = {f"{best['setting']}+ema": [*best["overrides"], "ema=on", f"callbacks.ema.decay={plan.ema_decay}"],
             f"{best['setting']}+mixup": [*best["overrides"], *MIXUP]}
    rows += collect({n: pool.submit(finetune, n, a, plan, out) for n, a in extra.items()})
    pool.shutdown()
    order = [*RECIPES, *extra, "scratch"]
    rows.sort(key=lambda r: order.index(r["setting"]))
    total = time.perf_counter() - t0

    text = table(rows)
    print(f"\n{text}\n\npretraining {pre_s:.0f} s; total {total:.0f} s ({total / 60:.1f} min)", flush=True)
    record = {"plan": plan.__dict__, "pretrain_seconds": pre_s, "pretrain_checkpoint": str(ckpt), "best": best["setting"],
              "total_seconds": total, "rows": rows, "runs_dir": str(out)}
    (out / "transfer_study.json").write_text(json.dumps(record, indent=2))
    (out / "table.md").write_text(text + "\n")
    figure(rows, out / "transfer_study.png")
    if a.results:
        a.results.mkdir(parents=True, exist_ok=True)
        (a.results / "transfer_study.json").write_text(json.dumps(record, indent=2))
        figure(rows, a.results / "transfer_study.png")


CACHE = Path("/tmp/transfer_study/cache")

if __name__ == "__main__":
    main()
