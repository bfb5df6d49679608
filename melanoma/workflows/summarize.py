"""Sum up a Hydra multirun: k-fold cross-validation, or a sweep grouped by what it swept.

    python train.py -m dataset=ph2 dataset.num_folds=5 'dataset.fold=range(5)'
    melanoma summarize runs/train/multirun/<stamp>

Each job folder (``<multirun>/<job number>/``, conf/hydra/default.yaml) holds
``.hydra/overrides.yaml``, ``splits.csv``, ``test/metrics.json`` (the Lightning test loop's
``test/...`` scalars) and ``report/`` (metrics.json, predictions.csv, val_predictions.csv;
melanoma.workflows.evaluate). ``summarize`` writes into the multirun folder (or ``out_dir``):

- summary.json: ``runs`` (per job: its overrides and metrics, ``report/<key>`` from the report,
  ``test/<key>`` from the test loop, and the report's intervals under ``ci95``), ``swept_keys`` (the overrides that differ between jobs),
  and for one group of jobs ``metrics`` (mean and sample sd over the jobs); several groups (a
  sweep over settings) go under ``groups``, one entry per combination of swept settings.
- When the jobs of a group differ in ``dataset.fold`` (k-fold): ``oof``, the pooled out-of-fold
  validation predictions (each non-test image predicted once, by the fold that held it out;
  raw softmax, uncalibrated) with AUROC and sensitivity/specificity at the threshold reaching
  95% sensitivity *chosen on these pooled predictions themselves* (so those two are optimistic),
  and ``ensemble_test``, the fixed test split predicted by the mean of the folds' (calibrated)
  probabilities, at the mean of the folds' operating points. Both carry 95% bootstrap intervals
  resampled by lesion/patient (splits.csv's groups). oof_predictions.csv and
  ensemble_test_predictions.csv hold the rows.
- summary.md (tables) and the figures: per-job metric dots with mean +- sd per group, and for
  k-fold the pooled out-of-fold ROC over the per-fold curves.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from melanoma.conventions import DEFAULT_TARGET_SENSITIVITY, RUN_REPORT_DIR, RUN_SPLITS_FILE, RUN_TEST_METRICS_FILE, positive_index
from melanoma.evaluation.bootstrap import format_ci, metrics_with_intervals
from melanoma.evaluation.figures import save_figure
from melanoma.evaluation.metrics import AUROC, binary_auroc, roc_curve
from melanoma.evaluation.operating_point import threshold_for_sensitivity
from melanoma.workflows.report import METRICS_FILE, PREDICTIONS_FILE, VAL_PREDICTIONS_FILE, jsonable

log = logging.getLogger(__name__)

#: metrics about calibration, which pooled out-of-fold / ensemble probabilities do not share
POOLED_DROPPED = ("nll", "ece")

__all__ = ["summarize", "FoldCoverageError", "SUMMARY_JSON", "SUMMARY_MD", "OOF_PREDICTIONS_FILE",
           "ENSEMBLE_PREDICTIONS_FILE", "FOLD_KEY", "REPLICATE_KEYS"]

# what summarize writes
SUMMARY_JSON, SUMMARY_MD = "summary.json", "summary.md"
OOF_PREDICTIONS_FILE, ENSEMBLE_PREDICTIONS_FILE = "oof_predictions.csv", "ensemble_test_predictions.csv"
OOF_ROC_FIGURE, METRIC_DOTS_FIGURE = "oof_roc.png", "metrics_per_job.png"

# what a training run folder holds (written by melanoma/workflows/training_run.py)
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"

#: the override that picks the k-fold fold; jobs differing in it are folds of one setting
FOLD_KEY = "dataset.fold"
#: swept keys that repeat a setting rather than change it: jobs are grouped by the other swept keys
#: (when folds are swept, only the fold: each seed's folds are pooled apart)
REPLICATE_KEYS = (FOLD_KEY, "seed")
#: the report's metrics compared across jobs in summary.md and the figure (all are in summary.json)
SHOWN = [f"report/{AUROC}", "report/balanced_accuracy", "report/sensitivity_at_threshold",
         "report/specificity_at_threshold", f"test/{AUROC}"]


class FoldCoverageError(ValueError):
    """The folds' validation splits overlap or leave non-test images unpredicted."""


@dataclass
class Job:
    name: str
    dir: Path
    overrides: dict[str, str]
    metrics: dict[str, float]  # report/<key> and test/<key>
    intervals: dict[str, list]  # report/<key> -> the report's 95% bootstrap interval

    @property
    def report_dir(self) -> Path:
        return self.dir / RUN_REPORT_DIR


def _parse_overrides(path: Path) -> dict[str, str]:
    out = {}
    for item in yaml.safe_load(path.read_text()) or []:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


def _scalars(d: dict, prefix: str) -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in d.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def load_jobs(multirun_dir: Path) -> list[Job]:
    dirs = sorted((p for p in multirun_dir.iterdir() if (p / OVERRIDES_FILE).is_file()),
                  key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))
    if not dirs:
        raise FileNotFoundError(
            f"no multirun jobs in {multirun_dir}: expected job folders <number>/ each with {OVERRIDES_FILE.as_posix()}; "
            f"pass the folder a `python train.py -m ...` sweep wrote (runs/<task>/multirun/<stamp>)"
        )
    jobs = []
    for d in dirs:
        metrics, intervals = {}, {}
        report = d / RUN_REPORT_DIR / METRICS_FILE
        if report.is_file():
            report = json.loads(report.read_text())
            metrics.update(_scalars(report, "report/"))
            intervals = {f"report/{k}": v for k, v in (report.get("ci95") or {}).items()}
        else:
            log.warning("job %s has no %s (run with evaluate=true): its report metrics are missing", d.name, report)
        if (d / RUN_TEST_METRICS_FILE).is_file():
            # the test loop's keys already read test/...
            metrics.update(_scalars(json.loads((d / RUN_TEST_METRICS_FILE).read_text()), ""))
        jobs.append(Job(d.name, d, _parse_overrides(d / OVERRIDES_FILE), metrics, intervals))
    return jobs


def swept_keys(jobs: list[Job]) -> list[str]:
    """Override keys whose value differs between jobs (or that some jobs lack), in first-seen order."""
    keys = list(dict.fromkeys(k for j in jobs for k in j.overrides))
    return [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1]


def mean_sd(jobs: list[Job]) -> dict[str, dict]:
    """Per metric: mean, sample standard deviation (ddof 1; None for one job) and n jobs it has."""
    out = {}
    for key in dict.fromkeys(k for j in jobs for k in j.metrics):
        values = np.array([j.metrics[key] for j in jobs if key in j.metrics], dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size:
            out[key] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if values.size > 1 else None,
                        "n": int(values.size)}
    return out


# --- k-fold -------------------------------------------------------------------------------------

def _read_report_csv(job: Job, name: str) -> pd.DataFrame:
    path = job.report_dir / name
    if not path.is_file():
        raise FileNotFoundError(
            f"job {job.name}: {path} is missing; k-fold summaries need each fold's report "
            f"(train with evaluate=true, or `melanoma evaluate {job.dir}/checkpoints/best.ckpt --out {job.report_dir}`)"
        )
    return pd.read_csv(path)


def _splits(job: Job) -> pd.DataFrame:
    path = job.dir / RUN_SPLITS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"job {job.name}: {path} is missing; every training run writes it")
    return pd.read_csv(path)


def _class_names(job: Job) -> list[str]:
    report = json.loads((job.report_dir / METRICS_FILE).read_text())
    return list(report["class_names"])


def _few(items, k=5) -> str:
    items = list(items)
    return ", ".join(map(str, items[:k])) + (f" and {len(items) - k} more" if len(items) > k else "")


def pool_out_of_fold(jobs: list[Job]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(pooled validation predictions with a fold_job column, the shared splits table). Every
    non-test image must be predicted exactly once; the folds must share one test split."""
    splits = [_splits(j) for j in jobs]
    test_sets = [frozenset(s.loc[s["split"] == "test", "path"]) for s in splits]
    all_sets = [frozenset(s["path"]) for s in splits]
    for j, t, a in zip(jobs[1:], test_sets[1:], all_sets[1:]):
        if t != test_sets[0] or a != all_sets[0]:
            raise FoldCoverageError(
                f"jobs {jobs[0].name} and {j.name} do not split the same images with one fixed test split "
                f"({len(t ^ test_sets[0])} test images differ); folds of one cross-validation share "
                f"dataset.seed, fractions and data: run them as one `-m ... 'dataset.fold=range(k)'` sweep"
            )
    tables = []
    for job in jobs:
        t = _read_report_csv(job, VAL_PREDICTIONS_FILE)
        t.insert(0, "fold_job", job.name)
        tables.append(t)
    oof = pd.concat(tables, ignore_index=True)
    counts = oof.groupby("path")["fold_job"].agg(list)
    repeated = counts[counts.map(len) > 1]
    if len(repeated):
        where = "; ".join(f"{p} (jobs {', '.join(js)})" for p, js in list(repeated.items())[:5])
        raise FoldCoverageError(
            f"{len(repeated)} image(s) are in the validation split of more than one fold: {where}. "
            f"Out-of-fold predictions need disjoint folds: run the folds with the same dataset.seed and "
            f"dataset.num_folds, one job per dataset.fold"
        )
    base = splits[0]
    non_test = base.loc[base["split"] != "test", "path"]
    missing = sorted(set(non_test) - set(oof["path"]))
    if missing:
        raise FoldCoverageError(
            f"{len(missing)} non-test image(s) are in no fold's validation split: {_few(missing)}. "
            f"Is a fold missing (found jobs {', '.join(j.name for j in jobs)})? Run every "
            f"dataset.fold in range(dataset.num_folds)"
        )
    extra = sorted(set(oof["path"]) - set(non_test))
    if extra:
        raise FoldCoverageError(f"{len(extra)} validation image(s) are test images or not in splits.csv: {_few(extra)}")
    return oof, base


def _arrays(table: pd.DataFrame, class_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    probs = table[[f"prob_{c}" for c in class_names]].to_numpy(np.float64)
    index = {c: i for i, c in enumerate(class_names)}
    return probs, table["true_label"].map(index).to_numpy()


def kfold_summary(jobs: list[Job], out_dir: Path, target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY,
                  prefix: str = "") -> tuple[dict, dict, dict]:
    """(oof, ensemble_test, figures) of the folds `jobs`; writes the pooled tables."""
    class_names = _class_names(jobs[0])
    pos = positive_index(class_names)
    if pos is None:
        raise ValueError(f"k-fold summaries report melanoma vs rest, but the classes {class_names} have no melanoma")
    oof, splits = pool_out_of_fold(jobs)
    group_of = dict(zip(splits["path"], splits["group"].astype(str)))
    probs, labels = _arrays(oof, class_names)
    op = threshold_for_sensitivity(probs[:, pos], labels == pos, target_sensitivity)
    oof_metrics = {
        "n": int(len(oof)), "folds": [j.name for j in jobs],
        "probabilities": "raw softmax (uncalibrated) of the fold that held each image out",
        "threshold_chosen_on": "these pooled out-of-fold predictions (sensitivity/specificity at it are optimistic)",
        "target_sensitivity": float(target_sensitivity),
        **metrics_with_intervals(probs, labels, pos, op["threshold"], oof["path"].map(group_of).to_numpy(), drop=POOLED_DROPPED),
    }
    oof.to_csv(out_dir / f"{prefix}{OOF_PREDICTIONS_FILE}", index=False)

    tests = [_read_report_csv(j, PREDICTIONS_FILE).set_index("path") for j in jobs]
    paths = sorted(tests[0].index)
    for j, t in zip(jobs, tests):
        if sorted(t.index) != paths:
            raise FoldCoverageError(f"job {j.name}'s test predictions cover other images than job {jobs[0].name}'s; "
                                    f"the folds must share one test split")
    first = tests[0].loc[paths]
    ens = pd.DataFrame({"path": paths, "true_label": first["true_label"].to_numpy()})
    for c in class_names:
        ens[f"prob_{c}"] = np.mean([t.loc[paths, f"prob_{c}"].to_numpy() for t in tests], axis=0)
    ens["melanoma_probability"] = np.mean([t.loc[paths, "melanoma_probability"].to_numpy() for t in tests], axis=0)
    for j, t in zip(jobs, tests):
        ens[f"melanoma_probability_job{j.name}"] = t.loc[paths, "melanoma_probability"].to_numpy()
    thresholds = [j.metrics.get("report/threshold") for j in jobs]
    threshold = float(np.mean(thresholds)) if all(t is not None for t in thresholds) else None
    e_probs, e_labels = _arrays(ens, class_names)
    ensemble = {
        "n": int(len(ens)), "folds": [j.name for j in jobs],
        "probabilities": "mean over the folds of each fold's calibrated probabilities",
        "threshold_rule": "mean of the folds' operating points (each chosen on its own val)",
        **metrics_with_intervals(e_probs, e_labels, pos, threshold, ens["path"].map(group_of).to_numpy(), drop=POOLED_DROPPED),
    }
    ens.to_csv(out_dir / f"{prefix}{ENSEMBLE_PREDICTIONS_FILE}", index=False)
    figures = {f"{prefix}{OOF_ROC_FIGURE}": _oof_roc_figure(oof, probs[:, pos], labels == pos, pos, class_names)}
    return oof_metrics, ensemble, figures


def _oof_roc_figure(oof: pd.DataFrame, p_mel, is_mel, pos, class_names):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 6.5), layout="constrained")
    ax = fig.subplots()
    for job, rows in oof.groupby("fold_job", sort=False):
        y = (rows["true_label"] == class_names[pos]).to_numpy()
        p = rows[f"prob_{class_names[pos]}"].to_numpy()
        fpr, tpr, _ = roc_curve(p, y)
        ax.plot(fpr, tpr, lw=1, alpha=0.6, label=f"fold job {job} (AUROC {binary_auroc(p, y):.3f})")
    fpr, tpr, _ = roc_curve(p_mel, is_mel)
    ax.plot(fpr, tpr, lw=2.5, color="black", label=f"pooled out-of-fold (AUROC {binary_auroc(p_mel, is_mel):.3f})")
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("melanoma vs rest, out-of-fold validation\n(every threshold: no decision rule applied)", fontsize=10)
    from melanoma.evaluation.figures import legend_below

    legend_below(fig, ax, ncols=1)
    return fig


def _dots_figure(groups: list[dict], jobs_by_name: dict[str, Job]):
    from matplotlib.figure import Figure

    keys = [k for k in SHOWN if any(k in j.metrics for j in jobs_by_name.values())]
    fig = Figure(figsize=(max(4.0, 1.2 * len(groups) + 2) * max(1, len(keys)) / 2 + 1, 4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, max(1, len(keys)), squeeze=False)[0])
    for ax, key in zip(axes, keys):
        for x, g in enumerate(groups):
            values = [jobs_by_name[n].metrics.get(key, np.nan) for n in g["jobs"]]
            ax.plot(np.full(len(values), x), values, "o", alpha=0.6, color="tab:blue")
            m = g["metrics"].get(key)
            if m is not None:
                ax.errorbar([x + 0.15], [m["mean"]], yerr=[m["sd"] or 0.0], fmt="s", color="black", capsize=4)
        ax.set_xlim(-0.5, len(groups) - 0.4)
        ax.set_xticks(range(len(groups)), [_label(g["values"]) or "all jobs" for g in groups], rotation=30, ha="right")
        ax.set_title(key, fontsize=9)
    fig.suptitle("per job (dots) and mean +- sd (squares)", fontsize=9)
    return fig


def _label(values: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items())


# --- the whole summary --------------------------------------------------------------------------

def summarize(multirun_dir, out_dir=None, target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY) -> dict:
    """Write summary.json, summary.md, the pooled tables and figures; return summary.json's dict."""
    multirun_dir = Path(multirun_dir)
    out_dir = Path(out_dir) if out_dir is not None else multirun_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = load_jobs(multirun_dir)
    swept = swept_keys(jobs)
    # folds pool only within one setting: with folds swept, a swept seed is a setting of its own
    replicates = (FOLD_KEY,) if FOLD_KEY in swept else REPLICATE_KEYS
    grouped_by = [k for k in swept if k not in replicates]
    by_setting: dict[tuple, list[Job]] = {}
    for j in jobs:
        by_setting.setdefault(tuple(j.overrides.get(k) for k in grouped_by), []).append(j)
    groups, figures = [], {}
    for n, (values, members) in enumerate(by_setting.items()):
        group = {"values": dict(zip(grouped_by, values)), "jobs": [j.name for j in members],
                 "metrics": mean_sd(members)}
        if len({j.overrides.get(FOLD_KEY) for j in members}) > 1:
            prefix = "" if len(by_setting) == 1 else f"group{n}_"
            group["oof"], group["ensemble_test"], figs = kfold_summary(members, out_dir, target_sensitivity, prefix)
            figures.update(figs)
        groups.append(group)
    summary = {
        "multirun_dir": str(multirun_dir), "n_jobs": len(jobs), "swept_keys": swept, "grouped_by": grouped_by,
        "kfold": any("oof" in g for g in groups),
        "runs": [{"job": j.name, "overrides": j.overrides, "metrics": j.metrics, "ci95": j.intervals} for j in jobs],
    }
    if len(groups) == 1:
        summary.update({k: v for k, v in groups[0].items() if k not in ("values", "jobs")})
    else:
        summary["groups"] = groups
    figures[METRIC_DOTS_FIGURE] = _dots_figure(groups, {j.name: j for j in jobs})
    summary = jsonable(summary)
    (out_dir / SUMMARY_JSON).write_text(json.dumps(summary, indent=2))
    (out_dir / SUMMARY_MD).write_text(_markdown(summary, groups))
    for name, fig in figures.items():
        save_figure(fig, out_dir / name)
    log.info("summary of %d jobs written to %s", len(jobs), out_dir)
    return summary


def _markdown(summary: dict, groups: list[dict]) -> str:
    swept = summary["swept_keys"]
    lines = [f"# Summary of {summary['multirun_dir']}", "",
             f"{summary['n_jobs']} jobs; swept: {', '.join(swept) or 'nothing'}; grouped by: "
             f"{', '.join(summary['grouped_by']) or 'nothing (one group)'}.", "", "## Jobs", "",
             "| job | " + " | ".join([*swept, *SHOWN]) + " |", "|---" * (1 + len(swept) + len(SHOWN)) + "|"]
    for r in summary["runs"]:
        cells = [r["overrides"].get(k, "") for k in swept] + [
            format_ci(r["metrics"][k], r["ci95"].get(k)) if r["metrics"].get(k) is not None else "n/a" for k in SHOWN]
        lines.append(f"| {r['job']} | " + " | ".join(cells) + " |")
    lines += ["", "## Mean ± sd over jobs (sample sd)", "", "| group | metric | mean ± sd | jobs |", "|---|---|---|---|"]
    for g in groups:
        for key, m in g["metrics"].items():
            sd = "" if m["sd"] is None else f" ± {m['sd']:.4f}"
            lines.append(f"| {_label(g['values']) or 'all'} | {key} | {m['mean']:.4f}{sd} | {m['n']} |")
    for g in groups:
        if "oof" not in g:
            continue
        title = f" ({_label(g['values'])})" if g["values"] else ""
        for name, part, note in (("Out-of-fold validation, pooled", g["oof"],
                                  "Raw softmax of the fold that held each image out; the threshold is chosen on "
                                  "these pooled predictions themselves, so sensitivity/specificity at it are optimistic."),
                                 ("Fold ensemble on the fixed test split", g["ensemble_test"],
                                  "Mean of the folds' calibrated probabilities, at the mean of their operating points.")):
            lines += ["", f"## {name}{title}", "", note, "", f"n = {part['n']}", ""]
            ci = part.get("ci95") or {}
            for key in ("auroc", "average_precision", "balanced_accuracy", "threshold", "sensitivity_at_threshold",
                        "specificity_at_threshold"):
                v = part.get(key)
                if v is not None:
                    lines.append(f"- {key}: {format_ci(v, ci.get(key))}")
    return "\n".join(lines) + "\n"
