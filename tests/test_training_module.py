"""LesionClassifier: checkpoint META, rebuilding heads on load, continuing on another dataset,
and stopping on a non-finite loss before a bad checkpoint exists."""

import math

import pytest
import torch

from melanoma.cli import main
from melanoma.models.checkpoint import Calibration, CheckpointMeta, HeadRecord, read_meta
from melanoma.models.classifier import Classifier
from melanoma.workflows.training_run import run
from melanoma.training.guard import NonFiniteLossError
from melanoma.training.module import LesionClassifier
from helpers import compose_cfg, module_from_cfg, tiny_overrides


@pytest.fixture(scope="module")
def dermmel_run(tiny_dermmel, tmp_path_factory):
    out = tmp_path_factory.mktemp("dermmel_run")
    cfg = compose_cfg([*tiny_overrides(tiny_dermmel, max_epochs=2), "model.head.type=mlp",
                       "model.head.hidden_features=16"], out)
    score = run(cfg)
    return out, cfg, score


def test_run_folder_and_checkpoint_meta(dermmel_run):
    out, cfg, score = dermmel_run
    assert score is not None and 0.0 <= score <= 1.0
    for rel in ("checkpoints/best.ckpt", "checkpoints/last.ckpt", "csv/metrics.csv", "splits.csv",
                "test/metrics.json"):
        assert (out / rel).is_file(), rel
    # the test loop keeps scalars; figures are the report's (evaluate=false here)
    assert not list((out / "test").glob("*.png")) and not (out / "report").exists()
    metrics_csv = (out / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("train/loss_step", "val/bal_acc", "val/auroc", "val/sensitivity", "val/specificity",
                "lr/head", "lr/block1", "lr/patch_embed", "trainable_params", "test/acc"):
        assert key in metrics_csv, key
    ckpt = torch.load(out / "checkpoints" / "best.ckpt", weights_only=True)
    meta = read_meta(out / "checkpoints" / "best.ckpt")
    assert (meta.backbone, meta.backbone_kwargs) == ("vit_tiny", dict(cfg.model.backbone.kwargs))
    head = meta.heads["dermmel"]
    assert head.spec["type"] == "mlp" and head.class_names == ["not_melanoma", "melanoma"]
    assert head.calibration is None and head.uncalibrated_reason is None  # evaluate fits one
    assert meta.active_head == "dermmel" and meta.preprocessing.image_size == 32
    assert meta.preprocessing.mean == pytest.approx((0.485, 0.456, 0.406))
    assert meta.preprocessing.interpolation == "bicubic"
    assert meta.config["model"]["optimizer"]["lr"] == cfg.model.optimizer.lr
    # what evaluate needs to rebuild the split
    assert head.data.dataset == "dermmel" and head.data.config["root"] == cfg.dataset.root
    assert head.data.counts == {"train": 16, "val": 16, "test": 16}
    # each fact once in the file: the split fingerprint in the head's record (no datamodule entry),
    # the run's config in the metadata (not in the module's hyperparameters)
    assert len(head.data.fingerprint) == 40 and "DermMelDataModule" not in ckpt
    assert ckpt["melanoma"]["config"]["seed"] == 42 and "config" not in ckpt["hyper_parameters"]
    model, meta2 = Classifier.from_checkpoint(out / "checkpoints" / "best.ckpt")
    assert list(model.heads) == ["dermmel"]
    sd = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_load_rebuilds_extra_heads_and_training_marks_calibrations_stale(dermmel_run, tmp_path):
    out, _, _ = dermmel_run
    ckpt = torch.load(out / "checkpoints" / "best.ckpt", weights_only=True)
    # a checkpoint with a second head and calibrations, as init_from + evaluation make them
    meta = CheckpointMeta.from_checkpoint(ckpt)
    meta.heads["ph2"] = HeadRecord({"type": "linear", "in_features": 32, "dropout": 0.0,
                                    "class_names": ["common_nevus", "atypical_nevus", "melanoma"]},
                                   calibration=Calibration(1.3, threshold=0.2, target_sensitivity=0.95))
    meta.set_calibration("dermmel", Calibration(1.7, threshold=0.3, target_sensitivity=0.95))
    ckpt["melanoma"] = meta.to_dict()
    ckpt["state_dict"]["model.heads.ph2.fc.weight"] = torch.full((3, 32), 0.5)
    ckpt["state_dict"]["model.heads.ph2.fc.bias"] = torch.arange(3.0)
    path = tmp_path / "two_heads.ckpt"
    torch.save(ckpt, path)
    module = LesionClassifier.load_from_checkpoint(path)
    assert set(module.model.heads) == {"dermmel", "ph2"}
    assert torch.equal(module.model.heads["ph2"].fc.bias, torch.arange(3.0))
    assert not any(p.requires_grad for p in module.model.heads["ph2"].parameters())
    # a checkpoint written by training (resumed here) carries no calibration from before
    saved = {}
    module.on_save_checkpoint(saved)
    again = CheckpointMeta.from_dict(saved["melanoma"])
    assert set(again.heads) == {"dermmel", "ph2"}
    assert again.heads["dermmel"].calibration is None and again.heads["ph2"].calibration is None
    assert "backbone changed" in again.heads["ph2"].uncalibrated_reason
    assert again.heads["dermmel"].data == meta.heads["dermmel"].data


def test_init_from_keeps_old_head_bit_identical_and_adds_new_head(dermmel_run, tmp_path):
    out, _, _ = dermmel_run
    source = tmp_path / "calibrated.ckpt"
    source.write_bytes((out / "checkpoints" / "best.ckpt").read_bytes())
    assert main(["evaluate", str(source), "--out", str(tmp_path / "report"), "-q"]) == 0
    assert read_meta(source).heads["dermmel"].calibration is not None
    old = torch.load(source, weights_only=True)["state_dict"]
    syn_root = tmp_path / "synthetic"
    overrides = [o for o in tiny_overrides(syn_root, max_epochs=1) if not o.startswith("dataset")]
    cfg = compose_cfg([*overrides, "dataset=synthetic", f"dataset.root={syn_root}", "dataset.image_size=32",
                       "dataset.batch_size=8", "dataset.generate_size=32", "dataset.counts.train=8",
                       "dataset.counts.val=4", "dataset.counts.test=4", "model.head.type=mlp",
                       "model.head.hidden_features=16", f"model.init_from={source}"], tmp_path / "run2")
    run(cfg)
    new = torch.load(tmp_path / "run2" / "checkpoints" / "last.ckpt", weights_only=True)
    assert set(new["melanoma"]["heads"]) == {"dermmel", "synthetic"}
    assert new["melanoma"]["active_head"] == "synthetic"
    for k, v in old.items():
        if k.startswith("model.heads.dermmel."):
            assert torch.equal(new["state_dict"][k], v), k
    # the backbone started from the checkpoint and kept training
    assert not torch.equal(new["state_dict"]["model.backbone.blocks.0.attn.qkv.weight"],
                           old["model.backbone.blocks.0.attn.qkv.weight"])
    model, meta = Classifier.from_checkpoint(tmp_path / "run2" / "checkpoints" / "last.ckpt")
    assert model(torch.randn(1, 3, 32, 32), "dermmel").shape == (1, 2)
    # the old head's calibration was fitted on the old backbone: dropped, with the reason
    old_head, new_head = meta.heads["dermmel"], meta.heads["synthetic"]
    assert old_head.calibration is None and "synthetic" in old_head.uncalibrated_reason
    assert old_head.data.dataset == "dermmel" and new_head.data.dataset == "synthetic"
    assert new_head.calibration is None


def test_init_from_with_a_different_head_spec_starts_a_fresh_head(dermmel_run, tmp_path):
    out, _, _ = dermmel_run
    source = out / "checkpoints" / "best.ckpt"  # its dermmel head is an MLP with 16 hidden units
    cfg = compose_cfg([*tiny_overrides(out.parent / "unused", max_epochs=1), f"dataset.root={out.parent}",
                       "model.head.type=linear", f"model.init_from={source}"], tmp_path / "run3")
    module = LesionClassifier(
        backbone=cfg.model.backbone, dataset_name="dermmel", class_names=["not_melanoma", "melanoma"],
        head={"type": "linear"}, image_size=32, init_from=str(source),
    )
    module.load_initial_weights()
    assert module.model.heads["dermmel"].spec()["type"] == "linear"
    src, _ = Classifier.from_checkpoint(source)
    assert torch.equal(module.model.backbone.blocks[0].attn.qkv.weight, src.backbone.blocks[0].attn.qkv.weight)


SAVE_ON_EXCEPTION = ["+callbacks.model_checkpoint.save_on_exception=true",
                     "+callbacks.last_checkpoint.save_on_exception=true"]


@pytest.mark.parametrize("extra", [
    [],
    SAVE_ON_EXCEPTION,
    # a user's own config with Lightning's plain ModelCheckpoint: the module refuses the save
    ["callbacks.model_checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
     "callbacks.last_checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint", *SAVE_ON_EXCEPTION],
], ids=["default", "save_on_exception", "plain_lightning_save_on_exception"])
def test_non_finite_loss_stops_before_a_bad_checkpoint(tiny_dermmel, tmp_path, extra):
    cfg = compose_cfg([*tiny_overrides(tiny_dermmel, max_epochs=3), *extra,
                       "callbacks.last_checkpoint.every_n_train_steps=1",
                       "+callbacks.rec._target_=melanoma.training.debug.RecordTraining",
                       f"+callbacks.rec.out_dir={tmp_path / 'rec'}", "+callbacks.rec.nan_at_step=3"],
                      tmp_path / "run")
    with pytest.raises(NonFiniteLossError, match=r"not finite .* global step 3"):
        run(cfg)
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    assert ckpts
    for path in ckpts:
        ckpt = torch.load(path, weights_only=True)
        assert ckpt["global_step"] <= 3
        assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values()), path
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert math.isfinite(last["state_dict"]["model.heads.dermmel.fc.bias"].sum())
    assert [p.name for p in ckpts] == ["best.ckpt", "last.ckpt"]


def test_a_checkpoint_of_non_finite_weights_is_refused_whoever_saves_it():
    from melanoma.training.module import _refuse_non_finite

    _refuse_non_finite({"w": torch.ones(3), "step": torch.tensor(4)}, 4)
    with pytest.raises(NonFiniteLossError, match=r"global step 7 are not finite \(1 tensors, e.g. \['b'\]\)"):
        _refuse_non_finite({"w": torch.ones(3), "b": torch.tensor([1.0, float("inf")])}, 7)


def test_logged_training_loss_is_the_step_loss_and_the_image_weighted_epoch_mean(tiny_dermmel, tmp_path):
    """train/loss_step on the written steps equals that step's loss; train/loss_epoch is the mean
    over the epoch's images (16 train images in batches of 6, 6 and 4: the plain mean of the
    batch losses differs)."""
    import json

    import pandas as pd

    cfg = compose_cfg([*tiny_overrides(tiny_dermmel, max_epochs=2, batch_size=6), "test=false",
                       "trainer.log_every_n_steps=2",
                       "+callbacks.rec._target_=melanoma.training.debug.RecordTraining",
                       f"+callbacks.rec.out_dir={tmp_path / 'rec'}"], tmp_path / "run")
    run(cfg)
    steps = pd.DataFrame([json.loads(line) for line in (tmp_path / "rec" / "losses_rank0.jsonl").open()])
    assert list(steps["images"]) == [6, 6, 4] * 2
    m = pd.read_csv(tmp_path / "run" / "csv" / "metrics.csv")
    logged = m.dropna(subset=["train/loss_step"]).set_index("step")["train/loss_step"]
    assert list(logged.index) == [1, 3, 5]  # every 2nd step
    for step, value in logged.items():
        assert value == pytest.approx(steps.set_index("step").loc[step, "loss"], rel=1e-6)
    epochs = m.dropna(subset=["train/loss_epoch"]).set_index("epoch")["train/loss_epoch"]
    for epoch, group in steps.groupby("epoch"):
        weighted = (group["loss"] * group["images"]).sum() / group["images"].sum()
        assert epochs.loc[epoch] == pytest.approx(weighted, rel=1e-6)
        assert abs(group["loss"].mean() - weighted) > 1e-6


def test_non_finite_last_step_stops_before_validation_and_any_checkpoint(tiny_dermmel, tmp_path):
    """The guard reads a step's verdict at the next optimizer step; the last step of an epoch has
    none, so the read happens before validation: the poisoned weights are neither validated nor
    written (16 train images, batch 8: steps 0 and 1, the poison before step 1)."""
    cfg = compose_cfg([*tiny_overrides(tiny_dermmel, max_epochs=1), "test=false",
                       "+callbacks.rec._target_=melanoma.training.debug.RecordTraining",
                       f"+callbacks.rec.out_dir={tmp_path / 'rec'}", "+callbacks.rec.nan_at_step=1"],
                      tmp_path / "run")
    with pytest.raises(NonFiniteLossError, match=r"not finite \(nan on this rank\) at epoch 0, global step 1, batch 1"):
        run(cfg)
    assert not list((tmp_path / "run").rglob("*.ckpt"))
    assert not list((tmp_path / "run").rglob("metrics.csv")) or "val/loss" not in (
        next((tmp_path / "run").rglob("metrics.csv")).read_text())


def test_pretrained_local_file_initialises_the_backbone(tiny_dermmel, tmp_path):
    from melanoma.models import build_backbone

    torch.manual_seed(123)
    source = build_backbone("vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    weights = tmp_path / "backbone.pth"
    torch.save(source.state_dict(), weights)
    cfg = compose_cfg([*tiny_overrides(tiny_dermmel, max_epochs=1), f"model.pretrained={weights}",
                       "trainer.fast_dev_run=true",
                       "+callbacks.rec._target_=melanoma.training.debug.RecordTraining",
                       f"+callbacks.rec.out_dir={tmp_path / 'rec'}"], tmp_path / "run")
    from omegaconf import OmegaConf

    module = LesionClassifier(backbone=OmegaConf.to_container(cfg.model.backbone, resolve=True), dataset_name="dermmel",
                              class_names=["not_melanoma", "melanoma"], pretrained=str(weights))
    module.load_initial_weights()
    for k, v in source.state_dict().items():
        assert torch.equal(module.model.backbone.state_dict()[k], v), k
    # the same through the config: the run starts fitting from exactly these weights
    run(cfg)
    start = torch.load(tmp_path / "rec" / "params_start_rank0.pt", weights_only=True)
    backbone = {k.removeprefix("backbone."): v for k, v in start.items() if k.startswith("backbone.")}
    assert backbone.keys() == source.state_dict().keys()
    for k, v in source.state_dict().items():
        assert torch.equal(backbone[k], v), k


def test_non_finite_gradient_stops_before_a_checkpoint_of_its_step(tiny_dermmel, tmp_path):
    cfg = compose_cfg([*tiny_overrides(tiny_dermmel, max_epochs=2), "test=false",
                       "callbacks.last_checkpoint.every_n_train_steps=1",
                       "+callbacks.rec._target_=melanoma.training.debug.RecordTraining",
                       f"+callbacks.rec.out_dir={tmp_path / 'rec'}", "+callbacks.rec.inf_grad_at_step=2"],
                      tmp_path / "run")
    with pytest.raises(NonFiniteLossError, match=r"gradient norm is inf .* global step 2"):
        run(cfg)
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_class_weights_true_weights_the_loss_by_inverse_train_frequency(tmp_path):
    """model.loss.class_weights=true: weights N / (C * n_c) of the train split (12 images, 9 not
    melanoma and 3 melanoma -> 12/18 and 12/6), and the training loss is that weighted
    cross-entropy (not the plain one) of the batch the model saw."""
    import lightning.pytorch as L
    import torch.nn.functional as F

    from melanoma.data.dermmel import DermMelDataModule
    from melanoma.data.synthetic import write_dermmel_layout

    root = tmp_path / "data"
    write_dermmel_layout(root, {"train": {"Melanoma": 3, "NotMelanoma": 9}, "val": 1, "test": 1}, image_size=32,
                         seed=6, masks=False)
    cfg = compose_cfg([*tiny_overrides(root, max_epochs=1, batch_size=12), "model.loss.class_weights=true"],
                      tmp_path / "run")
    dm = DermMelDataModule(root=root, image_size=32, batch_size=12, num_workers=0)
    module = module_from_cfg(cfg, dm.name, dm.class_names)
    seen = {}

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            x, y = batch
            with torch.no_grad():
                seen["logits"], seen["y"] = pl_module(x).float(), y

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen["loss"] = float(outputs["loss"])

    trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[Probe()])
    trainer.fit(module, dm)

    assert dm.class_names == ["not_melanoma", "melanoma"]
    assert module.class_weights["dermmel"].tolist() == pytest.approx([12 / (2 * 9), 12 / (2 * 3)])
    logits, y = seen["logits"], seen["y"]
    assert sorted(y.tolist()) == [0] * 9 + [1] * 3  # the whole train split in one batch
    smoothing = float(cfg.model.loss.label_smoothing)  # the config's, whatever it is
    weighted = F.cross_entropy(logits, y, weight=torch.tensor([12 / 18, 12 / 6]), label_smoothing=smoothing)
    plain = F.cross_entropy(logits, y, label_smoothing=smoothing)
    assert seen["loss"] == pytest.approx(float(weighted), rel=1e-5)
    assert abs(float(weighted) - float(plain)) > 1e-3  # the two differ, so the check can tell them apart
