"""`melanoma summarize` logic on hand-made multirun folders (fast): the out-of-fold pool and its
checks, the fold ensemble, mean/sd over jobs, and the grouping of a sweep that is not k-fold.
The same on a real train.py multirun: tests/test_cv_multirun.py (slow)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torchmetrics.functional.classification as tmf
import yaml

from melanoma.evaluation.bootstrap import format_ci
from melanoma.workflows.report import METRICS_FILE, PREDICTIONS_FILE, VAL_PREDICTIONS_FILE
from melanoma.workflows.summarize import (
    ENSEMBLE_PREDICTIONS_FILE,
    OOF_PREDICTIONS_FILE,
    SUMMARY_JSON,
    SUMMARY_MD,
    FoldCoverageError,
    summarize,
)

CLASSES = ["not_melanoma", "melanoma"]


def _dataset(n=60, n_test=12, seed=0):
    rng = np.random.default_rng(seed)
    table = pd.DataFrame({
        "path": [f"/data/img_{i:03d}.jpg" for i in range(n)],
        "label": rng.permutation(np.arange(n) % 3 == 0).astype(int),  # a third melanoma
        "group": [f"lesion_{i // 2}" for i in range(n)],  # two images per lesion
    })
    table["split"] = "rest"
    table.loc[table.index[-n_test:], "split"] = "test"
    return table


def _predictions(rows: pd.DataFrame, rng) -> pd.DataFrame:
    logits = rng.normal(size=(len(rows), 2)) + np.c_[np.zeros(len(rows)), 1.5 * rows["label"].to_numpy()]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    out = pd.DataFrame({"path": rows["path"].to_numpy(), "true_label": [CLASSES[i] for i in rows["label"]],
                        "predicted_label": [CLASSES[i] for i in probs.argmax(1)]})
    for k, c in enumerate(CLASSES):
        out[f"prob_{c}"] = probs[:, k]
    out["melanoma_probability"] = probs[:, 1]
    out["decision"] = np.where(probs[:, 1] >= 0.5, "melanoma", "not_melanoma")
    for k, c in enumerate(CLASSES):
        out[f"logit_{c}"] = logits[:, k]
    return out


def _write_job(job_dir, overrides, splits, report_metrics, test_metrics, val_rows, test_rows, rng):
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    out = splits.copy()
    out["label"] = [CLASSES[i] for i in out["label"]]
    out.to_csv(job_dir / "splits.csv", index=False)
    (job_dir / "report").mkdir()
    (job_dir / "report" / METRICS_FILE).write_text(json.dumps(
        {"class_names": CLASSES, "positive_class": "melanoma", "dataset": "ham10000", **report_metrics}))
    _predictions(val_rows, rng).to_csv(job_dir / "report" / VAL_PREDICTIONS_FILE, index=False)
    _predictions(test_rows, rng).to_csv(job_dir / "report" / PREDICTIONS_FILE, index=False)
    (job_dir / "test").mkdir()
    (job_dir / "test" / "metrics.json").write_text(json.dumps(test_metrics))


def make_kfold(root, k=3, val_of=None, seed=0, extra=(), first_job=0):
    """A multirun folder of k fold jobs (numbered from first_job, with the `extra` overrides);
    val_of(fold, rest_rows) picks a fold's val rows (default: every k-th lesion)."""
    rng = np.random.default_rng(seed)
    table = _dataset()
    rest = table[table["split"] == "rest"]
    fold_of_group = {g: i % k for i, g in enumerate(dict.fromkeys(rest["group"]))}
    for fold in range(k):
        val = val_of(fold, rest) if val_of else rest[rest["group"].map(fold_of_group) == fold]
        splits = table.copy()
        splits.loc[splits["split"] == "rest", "split"] = "train"
        splits.loc[splits["path"].isin(val["path"]), "split"] = "val"
        _write_job(root / str(first_job + fold), ["dataset=ham10000", *extra, "dataset.num_folds=3",
                                                  f"dataset.fold={fold}"], splits,
                   {"auroc": 0.7 + 0.05 * fold, "accuracy": 0.6 + 0.1 * fold, "threshold": 0.2 + 0.1 * fold,
                    "ci95": {"auroc": [0.5, 0.9]}},
                   {"test/auroc": 0.65 + 0.1 * fold, "test/loss": 0.5},
                   val, table[table["split"] == "test"], rng)
    return table


def test_kfold_pools_out_of_fold_predictions_and_ensembles_the_test_split(tmp_path):
    table = make_kfold(tmp_path)
    s = summarize(tmp_path)
    written = json.loads((tmp_path / SUMMARY_JSON).read_text())
    assert written == s and (tmp_path / SUMMARY_MD).is_file()
    assert s["kfold"] and s["swept_keys"] == ["dataset.fold"] and len(s["runs"]) == 3
    assert s["runs"][1]["overrides"]["dataset.fold"] == "1"
    assert s["runs"][1]["metrics"]["report/auroc"] == pytest.approx(0.75)
    assert s["runs"][1]["metrics"]["test/auroc"] == pytest.approx(0.75)
    assert s["runs"][1]["ci95"] == {"report/auroc": [0.5, 0.9]}
    assert "0.750 [0.500, 0.900]" in (tmp_path / SUMMARY_MD).read_text()
    # mean and (sample) sd over the jobs
    for key, values in (("report/auroc", [0.7, 0.75, 0.8]), ("test/auroc", [0.65, 0.75, 0.85])):
        assert s["metrics"][key]["mean"] == pytest.approx(np.mean(values))
        assert s["metrics"][key]["sd"] == pytest.approx(np.std(values, ddof=1))
        assert s["metrics"][key]["n"] == 3

    oof = pd.read_csv(tmp_path / OOF_PREDICTIONS_FILE)
    non_test = table[table["split"] != "test"]
    assert sorted(oof["path"]) == sorted(non_test["path"]) and oof["path"].is_unique
    for fold in range(3):  # each image predicted by the fold that held it out
        val = pd.read_csv(tmp_path / str(fold) / "report" / VAL_PREDICTIONS_FILE)
        mine = oof[oof["fold_job"].astype(str) == str(fold)].set_index("path").loc[val["path"]]
        np.testing.assert_allclose(mine["melanoma_probability"], val["melanoma_probability"])
    y = torch.tensor((oof["true_label"] == "melanoma").to_numpy().astype(int))
    p = torch.tensor(oof["melanoma_probability"].to_numpy())
    assert s["oof"]["n"] == len(non_test) == 48
    assert s["oof"]["auroc"] == pytest.approx(float(tmf.binary_auroc(p, y)), abs=1e-6)  # torchmetrics: float32
    lo, hi = s["oof"]["ci95"]["auroc"]
    assert lo < s["oof"]["auroc"] < hi and s["oof"]["ci95_method"]["grouped"]
    # the 95%-sensitivity threshold is chosen on the pooled predictions themselves
    thr = s["oof"]["threshold"]
    assert s["oof"]["sensitivity_at_threshold"] == pytest.approx(float(tmf.binary_recall((p >= thr).long(), y)))
    assert s["oof"]["sensitivity_at_threshold"] >= 0.95
    assert s["oof"]["specificity_at_threshold"] == pytest.approx(float(tmf.binary_specificity((p >= thr).long(), y)))

    ens = pd.read_csv(tmp_path / ENSEMBLE_PREDICTIONS_FILE).set_index("path")
    folds = [pd.read_csv(tmp_path / str(f) / "report" / PREDICTIONS_FILE).set_index("path") for f in range(3)]
    test_paths = table.loc[table["split"] == "test", "path"]
    assert sorted(ens.index) == sorted(test_paths)
    expected = sum(f.loc[ens.index, "melanoma_probability"] for f in folds) / 3
    np.testing.assert_allclose(ens["melanoma_probability"], expected, rtol=1e-12)
    ye = torch.tensor((ens["true_label"] == "melanoma").to_numpy().astype(int))
    assert s["ensemble_test"]["n"] == 12
    assert s["ensemble_test"]["auroc"] == pytest.approx(
        float(tmf.binary_auroc(torch.tensor(ens["melanoma_probability"].to_numpy()), ye)), abs=1e-6)
    assert s["ensemble_test"]["threshold"] == pytest.approx(0.3)  # mean of the folds' operating points
    assert "auroc" in s["ensemble_test"]["ci95"]
    assert any(p.suffix == ".png" and p.stat().st_size > 5000 for p in tmp_path.iterdir())


def test_folds_whose_val_splits_overlap_are_refused(tmp_path):
    def overlapping(fold, rest):  # fold 1 also holds fold 0's first image
        val = rest.iloc[fold * 16:(fold + 1) * 16]
        return pd.concat([val, rest.iloc[:1]]) if fold == 1 else val

    make_kfold(tmp_path, val_of=overlapping)
    with pytest.raises(FoldCoverageError, match=r"1 image.* more than one fold.*img_000.*jobs 0, 1"):
        summarize(tmp_path)


def test_folds_that_leave_an_image_unpredicted_are_refused(tmp_path):
    def gappy(fold, rest):  # the last non-test image is in no fold's val
        return rest.iloc[fold * 16:(fold + 1) * 16 - (fold == 2)]

    make_kfold(tmp_path, val_of=gappy)
    with pytest.raises(FoldCoverageError, match=r"1 non-test image.* no fold.*img_047"):
        summarize(tmp_path)


def test_a_sweep_that_is_not_kfold_is_grouped_by_its_swept_keys(tmp_path):
    rng = np.random.default_rng(1)
    table = _dataset()
    table.loc[table["split"] == "rest", "split"] = ["train", "train", "val"] * 16
    aurocs = {("1e-4", "1"): 0.6, ("1e-4", "2"): 0.7, ("3e-4", "1"): 0.8, ("3e-4", "2"): 0.9}
    for job, ((lr, seed), auroc) in enumerate(aurocs.items()):
        _write_job(tmp_path / str(job), ["dataset=ham10000", f"model.optimizer.lr={lr}", f"seed={seed}"], table,
                   {"auroc": auroc}, {"test/auroc": auroc - 0.1}, table[table["split"] == "val"],
                   table[table["split"] == "test"], rng)
    s = summarize(tmp_path)
    assert not s["kfold"] and s["swept_keys"] == ["model.optimizer.lr", "seed"]
    assert s["grouped_by"] == ["model.optimizer.lr"]  # seed is a replicate, not a setting
    assert "oof" not in s and "ensemble_test" not in s and "metrics" not in s
    assert not (tmp_path / OOF_PREDICTIONS_FILE).exists()
    groups = {g["values"]["model.optimizer.lr"]: g for g in s["groups"]}
    assert sorted(groups) == ["1e-4", "3e-4"]
    assert groups["1e-4"]["jobs"] == ["0", "1"]
    assert groups["1e-4"]["metrics"]["report/auroc"]["mean"] == pytest.approx(0.65)
    assert groups["3e-4"]["metrics"]["report/auroc"]["sd"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert groups["3e-4"]["metrics"]["test/auroc"]["mean"] == pytest.approx(0.75)
    assert "oof" not in groups["1e-4"]


def test_a_folder_without_jobs_says_what_it_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no multirun jobs.*\.hydra/overrides\.yaml.*train\.py -m"):
        summarize(tmp_path)


def test_cli_summarize_writes_the_summary_and_prints_the_pooled_auroc(tmp_path, capsys):
    from melanoma.cli import EXIT_OK, EXIT_USAGE, main

    make_kfold(tmp_path)
    assert main(["summarize", str(tmp_path), "--out", str(tmp_path / "out"), "-q"]) == EXIT_OK
    s = json.loads((tmp_path / "out" / SUMMARY_JSON).read_text())
    shown = capsys.readouterr().out
    assert f"out-of-fold auroc {format_ci(s['oof']['auroc'], s['oof']['ci95']['auroc'])}" in shown
    assert str(tmp_path / "out") in shown
    assert main(["summarize", str(tmp_path / "out")]) == EXIT_USAGE  # no jobs there: one clear line
    assert "no multirun jobs" in capsys.readouterr().err


@pytest.mark.parametrize("key", ["model.optimizer.lr", "seed"])
def test_a_sweep_of_kfolds_pools_each_setting_apart(tmp_path, key):
    make_kfold(tmp_path, extra=[f"{key}=1"], seed=0)
    make_kfold(tmp_path, extra=[f"{key}=3"], seed=1, first_job=3)
    s = summarize(tmp_path)
    assert s["kfold"] and s["grouped_by"] == [key]
    assert [g["jobs"] for g in s["groups"]] == [["0", "1", "2"], ["3", "4", "5"]]
    for n, g in enumerate(s["groups"]):
        oof = pd.read_csv(tmp_path / f"group{n}_{OOF_PREDICTIONS_FILE}")
        assert sorted(oof["fold_job"].astype(str).unique()) == g["jobs"] and g["oof"]["n"] == len(oof) == 48
        y = torch.tensor((oof["true_label"] == "melanoma").to_numpy().astype(int))
        p = torch.tensor(oof["melanoma_probability"].to_numpy())
        assert g["oof"]["auroc"] == pytest.approx(float(tmf.binary_auroc(p, y)), abs=1e-6)
        assert (tmp_path / f"group{n}_{ENSEMBLE_PREDICTIONS_FILE}").is_file()
    assert s["groups"][0]["oof"]["auroc"] != s["groups"][1]["oof"]["auroc"]
