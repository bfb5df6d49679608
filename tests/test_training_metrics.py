"""What the training module logs: one meaning per metric key, and under DDP every validation and
test image counted exactly once (the numbers equal a single process's)."""

import copy
import json
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from melanoma.data.dermmel import DermMelDataModule
from melanoma.data.ph2 import CLASSES_3
from melanoma.data.samplers import EvalDistributedSampler
from melanoma.data.synthetic import write_dermmel_layout
from melanoma.training.metrics import stage_metrics
from melanoma.training.module import LesionClassifier


def test_auroc_is_melanoma_vs_rest_and_auroc_macro_is_macro_ovr_on_ph2_3class():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, 120)
    logits = rng.normal(size=(120, 3)) + 1.2 * np.eye(3)[labels]
    probs = torch.tensor(logits).softmax(-1).float()
    metrics = stage_metrics(CLASSES_3)
    # split over two updates, as batches arrive
    metrics.update(probs[:50], torch.tensor(labels[:50]))
    metrics.update(probs[50:], torch.tensor(labels[50:]))
    got = {k: float(v) for k, v in metrics.compute().items()}
    mel = CLASSES_3.index("melanoma")
    p = probs.double().numpy()
    assert got["auroc"] == pytest.approx(roc_auc_score(labels == mel, p[:, mel]), abs=1e-6)
    assert got["auroc_macro"] == pytest.approx(roc_auc_score(labels, p, multi_class="ovr", average="macro"),
                                               abs=1e-6)
    assert abs(got["auroc"] - got["auroc_macro"]) > 1e-3  # the two keys really differ here
    assert got["acc"] == pytest.approx(float(np.mean(p.argmax(1) == labels)), abs=1e-6)


def test_auroc_macro_skips_a_class_absent_from_the_labels_and_auroc_needs_both():
    # torchmetrics' own macro average would count the absent class as 0 (giving 2/3 here)
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.3, 0.6], [0.6, 0.2, 0.2], [0.2, 0.7, 0.1]])
    metrics = stage_metrics(CLASSES_3)
    metrics.update(probs, torch.tensor([0, 1, 0, 1]))
    got = metrics.compute()
    assert float(got["auroc_macro"]) == pytest.approx(1.0)
    assert math.isnan(float(got["auroc"]))  # no melanoma among the labels: undefined, not 0
    assert "auroc" not in stage_metrics(["nevus", "bcc"])  # no melanoma class: no auroc key


# odd val and test splits: under torch's DistributedSampler two ranks would see 10 and 8 images
ODD_COUNTS = {"train": 2, "val": {"Melanoma": 4, "NotMelanoma": 5}, "test": {"Melanoma": 3, "NotMelanoma": 4}}


class _CountImages(pl.Callback):
    """Writes <stage>_rank<r>.json: the sampler Lightning used and the images the rank ran on
    (a file per stage: each ddp_fork call runs in fresh child processes)."""

    def __init__(self, out_dir):
        self.out_dir = out_dir
        self.seen = 0

    def _count(self, batch):
        self.seen += len(batch[1])

    def _write(self, trainer, stage, loader):
        record = {"images": self.seen, "sampler": type(loader.sampler).__name__}
        (self.out_dir / f"{stage}_rank{trainer.global_rank}.json").write_text(json.dumps(record))
        self.seen = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._count(batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._count(batch)

    def on_validation_end(self, trainer, pl_module):
        self._write(trainer, "val", trainer.val_dataloaders)

    def on_test_end(self, trainer, pl_module):
        self._write(trainer, "test", trainer.test_dataloaders)


def _evaluate(root, model, devices, out_dir=None):
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp_fork" if devices > 1 else "auto",
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[_CountImages(out_dir)] if out_dir else [])
    dm = DermMelDataModule(root, image_size=32, batch_size=4, num_workers=0)
    val = trainer.validate(model, datamodule=dm, verbose=False)[0]
    test = trainer.test(model, datamodule=dm, verbose=False)[0]
    return {**val, **test}


@pytest.mark.slow
def test_ddp_validate_and_test_count_every_image_once_and_equal_one_process(tmp_path):
    root = write_dermmel_layout(tmp_path / "data", ODD_COUNTS, image_size=32, seed=7)
    torch.manual_seed(0)
    model = LesionClassifier(
        backbone={"name": "vit_tiny", "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2,
                                                  "num_heads": 2, "drop_path_rate": 0.0}},
        dataset_name="dermmel", class_names=["not_melanoma", "melanoma"], image_size=32)
    # an untrained model calls every image the same class: point the head along the difference
    # of the class means of these images' features, so both classes are predicted in each split
    # and sensitivity, specificity and accuracy mean something
    dm = DermMelDataModule(root, image_size=32, batch_size=4, num_workers=0)
    images = [dm.dataset(s)[i] for s in ("val", "test") for i in range(len(dm.dataset(s)))]
    x, y = torch.stack([im for im, _ in images]), torch.tensor([label for _, label in images])
    backbone = model.model.backbone.eval()
    with torch.no_grad():
        f = backbone.forward_head(backbone.forward_features(x), pre_logits=True)
        direction = f[y == 1].mean(0) - f[y == 0].mean(0)
        direction = direction / direction.norm() * 5.0
        model.head.fc.weight.copy_(torch.stack([-direction, direction]) / 2)
        model.head.fc.bias.copy_(torch.tensor([1.0, -1.0]) * (f.mean(0) @ direction) / 2)
    # a copy each: metric states reset under inference mode (one process) cannot be updated under
    # the no_grad Lightning uses with gloo
    single = _evaluate(root, copy.deepcopy(model), devices=1)
    ddp = _evaluate(root, copy.deepcopy(model), devices=2, out_dir=tmp_path)

    seen = {s: [json.loads((tmp_path / f"{s}_rank{r}.json").read_text()) for r in range(2)] for s in ("val", "test")}
    assert [r["images"] for r in seen["val"]] == [5, 4]  # 9 images: no padding to 10
    assert [r["images"] for r in seen["test"]] == [4, 3]  # 7 images: no padding to 8
    # Lightning kept our sampler (no re-wrapping, no re-padding)
    assert {r["sampler"] for s in seen.values() for r in s} == {EvalDistributedSampler.__name__}
    keys = {f"{stage}/{name}" for stage in ("val", "test")
            for name in ("loss", "acc", "bal_acc", "auroc", "auroc_macro", "f1", "sensitivity", "specificity")}
    assert keys <= set(single) and keys <= set(ddp)
    # not degenerate: each split has images called melanoma and images called not melanoma
    for stage in ("val", "test"):
        assert single[f"{stage}/sensitivity"] > 0 and single[f"{stage}/specificity"] > 0, single
        assert 0.5 < single[f"{stage}/acc"] < 1.0, single
    for key in sorted(keys):
        assert ddp[key] == pytest.approx(single[key], abs=1e-6), key


def test_bal_acc_and_average_precision_mean_what_the_report_means():
    """val/bal_acc picks best.ckpt: it must skip a class absent from the split as the report
    does (torchmetrics' macro recall counted it as 0: 0.50 instead of 0.75 here)."""
    from melanoma.evaluation.metrics import balanced_accuracy, binary_average_precision

    probs = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.3, 0.6], [0.6, 0.2, 0.2], [0.2, 0.7, 0.1]])
    labels = torch.tensor([0, 1, 0, 1])  # class 2 (melanoma) absent
    metrics = stage_metrics(CLASSES_3)
    metrics.update(probs, labels)
    got = metrics.compute()
    assert float(got["bal_acc"]) == pytest.approx(0.75) == balanced_accuracy(probs.numpy(), labels.numpy())
    assert math.isnan(float(got["average_precision"]))  # no melanoma: undefined
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 200)
    p = torch.tensor(rng.dirichlet(np.ones(3), 200) + 0.5 * np.eye(3)[labels]).float()
    p = p / p.sum(1, keepdim=True)
    p[:40, 2] = p[40:80, 2]  # ties, where definitions of AP part ways
    metrics = stage_metrics(CLASSES_3)
    metrics.update(p[:90], torch.tensor(labels[:90]))
    metrics.update(p[90:], torch.tensor(labels[90:]))
    got = metrics.compute()
    mel = CLASSES_3.index("melanoma")
    assert float(got["average_precision"]) == pytest.approx(
        binary_average_precision(p[:, mel].double().numpy(), labels == mel), abs=1e-6)
    assert float(got["bal_acc"]) == pytest.approx(balanced_accuracy(p.numpy(), labels), abs=1e-6)
