"""The evaluation report of a tiny model trained briefly on a synthetic fixture."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import torchmetrics.functional.classification as tmf

from melanoma.data.synthetic import SyntheticDataModule
from melanoma.models.checkpoint_io import build_classifier, save_classifier_checkpoint, training_data
from melanoma.workflows.evaluate import evaluate_checkpoint
from melanoma.predict import Predictor
from melanoma.models.classifier import Classifier

IMAGE_SIZE = 32
BACKBONE_KW = dict(img_size=IMAGE_SIZE, patch_size=8, embed_dim=32, depth=2, num_heads=2)
FIGURES = ("confusion_matrix", "confidence", "roc", "precision_recall", "reliability")


def tiny_datamodule(root):
    return SyntheticDataModule(
        root=root, counts={"train": 40, "val": 30, "test": 30}, generate_size=IMAGE_SIZE,
        image_size=IMAGE_SIZE, batch_size=16, num_workers=0,
    )


def train_tiny_checkpoint(path, datamodule, steps=20, seed=0):
    """A few plain optimizer steps: weights that are not the initial ones, not a real training
    run (test_explain_learned.py trains a model that learns)."""
    torch.manual_seed(seed)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = build_classifier("vit_tiny", BACKBONE_KW, {datamodule.name: datamodule.class_names})
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    batches = iter(())
    for _ in range(steps):
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(datamodule.train_dataloader())
            x, y = next(batches)
        loss = F.cross_entropy(model(x, datamodule.name), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_classifier_checkpoint(
        path, model.eval(), "vit_tiny", BACKBONE_KW, image_size=IMAGE_SIZE,
        mean=datamodule.mean, std=datamodule.std, data={datamodule.name: training_data(datamodule)},
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    dm = tiny_datamodule(tmp / "data")
    ckpt = train_tiny_checkpoint(tmp / "tiny.ckpt", dm)
    out = tmp / "report"
    metrics = evaluate_checkpoint(ckpt, tiny_datamodule(tmp / "data"), out, target_sensitivity=0.9)
    return {"ckpt": ckpt, "out": out, "metrics": metrics, "dm": dm}


def test_every_report_file_exists(report):
    out = report["out"]
    assert (out / "metrics.json").is_file() and (out / "predictions.csv").is_file()
    for name in FIGURES:
        assert (out / f"{name}.png").stat().st_size > 5000, name
    assert json.loads((out / "metrics.json").read_text()) == report["metrics"]


def test_metrics_json_equals_torchmetrics_on_predictions_csv(report):
    m = json.loads((report["out"] / "metrics.json").read_text())
    table = pd.read_csv(report["out"] / "predictions.csv")
    names = m["class_names"]
    assert names == ["not_melanoma", "melanoma"] and len(table) == m["n"] == 60  # 30 per class
    assert set(table["path"]) == set(report["dm"].split_table("test")["path"])
    probs = torch.tensor(table[[f"prob_{c}" for c in names]].to_numpy())
    logits = torch.tensor(table[[f"logit_{c}" for c in names]].to_numpy())
    y = torch.tensor([names.index(c) for c in table["true_label"]])
    assert list(table["predicted_label"]) == [names[i] for i in probs.argmax(1)]
    torch.testing.assert_close(probs, torch.softmax(logits / m["temperature"], 1), rtol=1e-6, atol=1e-7)
    pos = names.index("melanoma")
    p_mel, is_mel = probs[:, pos], (y == pos).long()
    thr = m["threshold"]
    at_thr = (p_mel >= thr).long()
    argmax_mel = (probs.argmax(1) == pos).long()
    expected = {
        "accuracy": tmf.multiclass_accuracy(probs, y, 2, average="micro"),
        "balanced_accuracy": tmf.multiclass_accuracy(probs, y, 2, average="macro"),
        "auroc": tmf.binary_auroc(p_mel, is_mel),
        "average_precision": tmf.binary_average_precision(p_mel, is_mel),
        "sensitivity_argmax": tmf.binary_recall(argmax_mel, is_mel),
        "specificity_argmax": tmf.binary_specificity(argmax_mel, is_mel),
        "sensitivity_at_threshold": tmf.binary_recall(at_thr, is_mel),
        "specificity_at_threshold": tmf.binary_specificity(at_thr, is_mel),
        "ece_after_calibration": tmf.multiclass_calibration_error(probs, y, 2, n_bins=15),
        "ece_before_calibration": tmf.multiclass_calibration_error(torch.softmax(logits, 1), y, 2, n_bins=15),
        "nll_after_calibration": F.cross_entropy(logits / m["temperature"], y),
        "nll_before_calibration": F.cross_entropy(logits, y),
    }
    for key, value in expected.items():
        assert m[key] == pytest.approx(float(value), abs=1e-5), key
    assert list(table["decision"] == "melanoma") == (p_mel >= thr).tolist()
    assert table["melanoma_probability"].tolist() == table["prob_melanoma"].tolist()


def test_calibration_and_operating_point_are_stored_in_the_checkpoint(report):
    m = report["metrics"]
    model, meta = Classifier.from_checkpoint(report["ckpt"])  # still loads strictly
    cal = meta.heads["synthetic"].calibration
    assert cal.temperature == pytest.approx(m["temperature"]) and not cal.tta and cal.method == "temperature"
    assert (cal.threshold, cal.target_sensitivity) == (pytest.approx(m["threshold"]), 0.9)
    assert cal.fitted_on == {"dataset": "synthetic", "split": "val", "fingerprint": report["dm"].split_fingerprint()}
    assert m["val"]["sensitivity_at_threshold"] >= 0.9
    assert m["val"]["nll_after_calibration"] <= m["val"]["nll_before_calibration"] + 1e-9
    # prediction applies both: the same probabilities and decisions as the report
    table = pd.read_csv(report["out"] / "predictions.csv")
    pred = Predictor(report["ckpt"], progress=False)
    assert pred.temperature == pytest.approx(m["temperature"]) and pred.threshold == pytest.approx(m["threshold"])
    records = pred.predict_paths(table["path"][:8])
    np.testing.assert_allclose([r["prob_melanoma"] for r in records], table["prob_melanoma"][:8], atol=1e-5)
    assert [r["decision"] for r in records] == list(table["decision"][:8])


def test_wrong_head_or_label_set_is_refused(report, tmp_path):
    with pytest.raises(ValueError, match="no head named 'other'"):
        evaluate_checkpoint(report["ckpt"], report["dm"], tmp_path, head="other")


def test_figures_and_numbers_go_to_wandb(report):
    import wandb

    from melanoma.workflows.report import _log_wandb

    class FakeRun:
        def __init__(self):
            self.logged, self.summary = {}, {}

        def log(self, data):
            self.logged.update(data)

    run = FakeRun()
    paths = {name: report["out"] / f"{name}.png" for name in FIGURES}
    _log_wandb(run, report["metrics"], paths)
    assert {f"report/{n}" for n in FIGURES} <= set(run.logged)
    assert all(isinstance(run.logged[f"report/{n}"], wandb.Image) for n in FIGURES)
    assert run.logged["report/auroc"] == report["metrics"]["auroc"] == run.summary["report/auroc"]


def test_val_predictions_keep_the_raw_softmax_of_the_validation_split(report):
    """report/val_predictions.csv: the out-of-fold predictions cross-validation pools. Same
    columns as predictions.csv but no decision, and the probabilities are the raw softmax (T = 1):
    the temperature was fitted on these very images, and a decision (made on calibrated
    probabilities) beside raw ones would seem to contradict them."""
    from melanoma.workflows.report import PREDICTIONS_FILE, VAL_PREDICTIONS_FILE

    m = report["metrics"]
    test_table = pd.read_csv(report["out"] / PREDICTIONS_FILE)
    table = pd.read_csv(report["out"] / VAL_PREDICTIONS_FILE)
    assert list(table.columns) == [c for c in test_table.columns if c != "decision"]
    val = report["dm"].split_table("val")
    assert list(table["path"]) == list(val["path"]) and len(table) == m["val"]["n"] == 60
    names = m["class_names"]
    assert list(table["true_label"]) == [names[i] for i in val["label"]]
    logits = torch.tensor(table[[f"logit_{c}" for c in names]].to_numpy())
    probs = torch.tensor(table[[f"prob_{c}" for c in names]].to_numpy())
    assert m["temperature"] != pytest.approx(1.0)  # else raw and calibrated could not be told apart
    torch.testing.assert_close(probs, torch.softmax(logits, 1), rtol=1e-6, atol=1e-7)
    assert table["melanoma_probability"].tolist() == table["prob_melanoma"].tolist()
