"""Cross-validation end to end: `train.py -m ... 'dataset.fold=range(3)'` (Hydra's basic sweeper)
on a miniature HAM10000, then `melanoma summarize` on the multirun folder. Slow: three train.py
jobs in a subprocess."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torchmetrics.functional.classification as tmf

from helpers import run_train_py, tiny_dataset_overrides, tiny_model_overrides, tiny_trainer_overrides

from melanoma.cli import EXIT_OK, main
from melanoma.workflows.report import PREDICTIONS_FILE, VAL_PREDICTIONS_FILE
from melanoma.workflows.summarize import ENSEMBLE_PREDICTIONS_FILE, OOF_PREDICTIONS_FILE, SUMMARY_JSON

pytestmark = pytest.mark.slow

K = 3


@pytest.fixture(scope="module")
def kfold_sweep(ham_root, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("cv")
    sweep = tmp / "sweep"
    trainer = [o for o in tiny_trainer_overrides(max_epochs=1) if not o.startswith("evaluate=")]
    run_train_py(["-m", "dataset=ham10000", "model=vit_tiny", "logger=csv", *tiny_dataset_overrides(ham_root),
                  *tiny_model_overrides(), *trainer, "evaluate=true",
                  f"dataset.num_folds={K}", f"dataset.fold=range({K})", f"hydra.sweep.dir={sweep}"],
                 cwd=tmp, timeout=900)
    assert main(["summarize", str(sweep), "-q"]) == EXIT_OK
    return sweep


def test_out_of_fold_predictions_cover_every_non_test_image_once(kfold_sweep):
    s = json.loads((kfold_sweep / SUMMARY_JSON).read_text())
    assert s["kfold"] and s["swept_keys"] == ["dataset.fold"]
    assert [r["overrides"]["dataset.fold"] for r in s["runs"]] == [str(k) for k in range(K)]
    splits = [pd.read_csv(kfold_sweep / str(k) / "splits.csv") for k in range(K)]
    non_test = splits[0].loc[splits[0]["split"] != "test", "path"]
    oof = pd.read_csv(kfold_sweep / OOF_PREDICTIONS_FILE)
    assert oof["path"].is_unique and sorted(oof["path"]) == sorted(non_test)
    assert s["oof"]["n"] == len(non_test)
    for k in range(K):  # each row predicted by the fold whose val split held it
        held_out = set(splits[k].loc[splits[k]["split"] == "val", "path"])
        assert set(oof.loc[oof["fold_job"] == k, "path"]) == held_out
        val = pd.read_csv(kfold_sweep / str(k) / "report" / VAL_PREDICTIONS_FILE)
        assert set(val["path"]) == held_out


def test_pooled_auroc_equals_torchmetrics_on_the_pooled_csv(kfold_sweep):
    s = json.loads((kfold_sweep / SUMMARY_JSON).read_text())
    oof = pd.read_csv(kfold_sweep / OOF_PREDICTIONS_FILE)
    p = torch.tensor(oof["melanoma_probability"].to_numpy())
    y = torch.tensor((oof["true_label"] == "melanoma").to_numpy().astype(int))
    assert s["oof"]["auroc"] == pytest.approx(float(tmf.binary_auroc(p, y)), abs=1e-6)  # torchmetrics: float32
    lo, hi = s["oof"]["ci95"]["auroc"]
    assert lo <= s["oof"]["auroc"] <= hi and s["oof"]["ci95_method"]["grouped"]  # lesions resampled whole
    # per-job metrics and their mean: the reports' and the test loop's
    reports = [json.loads((kfold_sweep / str(k) / "report" / "metrics.json").read_text()) for k in range(K)]
    assert s["metrics"]["report/auroc"]["mean"] == pytest.approx(np.nanmean([r["auroc"] for r in reports]))
    assert "test/auroc" in s["metrics"]


def test_ensemble_test_probabilities_are_the_mean_of_the_folds(kfold_sweep):
    s = json.loads((kfold_sweep / SUMMARY_JSON).read_text())
    ens = pd.read_csv(kfold_sweep / ENSEMBLE_PREDICTIONS_FILE).set_index("path")
    folds = [pd.read_csv(kfold_sweep / str(k) / "report" / PREDICTIONS_FILE).set_index("path") for k in range(K)]
    assert sorted(ens.index) == sorted(folds[0].index) and s["ensemble_test"]["n"] == len(ens)
    expected = np.mean([f.loc[ens.index, "melanoma_probability"].to_numpy() for f in folds], axis=0)
    np.testing.assert_allclose(ens["melanoma_probability"].to_numpy(), expected, rtol=1e-12)
    y = torch.tensor((ens["true_label"] == "melanoma").to_numpy().astype(int))
    auroc = float(tmf.binary_auroc(torch.tensor(ens["melanoma_probability"].to_numpy()), y))
    assert s["ensemble_test"]["auroc"] == pytest.approx(auroc, abs=1e-6)
