"""Metadata fusion in the model (issue 23): a planted task that needs image and metadata together."""

import numpy as np
import pytest
import torch

from melanoma.metadata import MetadataSchema
from melanoma.models.heads import build_head
from melanoma.training.module import LesionClassifier

SCHEMA = MetadataSchema(["age", "sex", "site"])
BACKBONE = {"name": "vit_tiny", "kwargs": {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 1,
                                           "num_heads": 2, "drop_path_rate": 0.0}}


def planted(n: int, seed: int):
    """Melanoma iff (the image is bright) XOR (the patient is male): neither alone says anything."""
    rng = np.random.default_rng(seed)
    bright = rng.integers(0, 2, n).astype(bool)
    male = rng.integers(0, 2, n).astype(bool)
    x = (rng.normal(0, 0.3, (n, 3, 16, 16)) + np.where(bright, 1.0, -1.0)[:, None, None, None]).astype(np.float32)
    rows = [{"age": float(a), "sex": "male" if m else "female", "site": s}
            for a, m, s in zip(rng.integers(20, 80, n), male, rng.choice(["back", "face", None], n))]
    y = (bright ^ male).astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(SCHEMA.encode(rows)), torch.from_numpy(y)


def train_module(fusion: str, steps: int = 150, seed: int = 0):
    torch.manual_seed(seed)
    module = LesionClassifier(BACKBONE, "synthetic", ["not_melanoma", "melanoma"], image_size=16, fusion=fusion,
                              metadata_schema=SCHEMA.to_dict() if fusion != "none" else None,
                              metadata_branch={"hidden": [32, 16], "dropout": 0.0},
                              head={"type": "mlp", "hidden_features": 32})  # XOR needs a non-linear head
    x, m, y = planted(256, seed=1)
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    module.train()
    for step in range(steps):
        idx = torch.randint(0, len(y), (64,))
        batch = [x[idx], m[idx]] if fusion != "none" else x[idx]
        loss = module._loss(module._logits(batch, None), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    module.eval()
    xt, mt, yt = planted(256, seed=2)
    with torch.no_grad():
        logits = module._logits([xt, mt] if fusion != "none" else xt, None)
    return module, float((logits.argmax(-1) == yt).float().mean())


@pytest.mark.parametrize("fusion", ["concat", "metablock"])
def test_fusion_learns_what_neither_image_nor_metadata_alone_can(fusion):
    _, fused = train_module(fusion)
    assert fused > 0.9, f"{fusion} reached only {fused:.2f} on the planted task"


def test_image_alone_cannot_learn_the_planted_task():
    _, alone = train_module("none")
    assert alone < 0.65


def test_fusion_head_spec_rebuilds_and_missing_metadata_uses_the_indicators():
    module, _ = train_module("concat", steps=1)
    head = module.model.heads["synthetic"]
    spec = head.spec()
    assert spec["type"] == "fusion" and spec["metadata"]["fields"] == ["age", "sex", "site"]
    assert spec["metadata"]["encodings"]["age"]["scale"] == 100.0
    rebuilt = build_head(spec)
    rebuilt.load_state_dict(head.state_dict())
    rebuilt.eval(), head.eval()
    f = torch.randn(5, 32)
    missing = torch.from_numpy(SCHEMA.encode(None, 5))
    assert torch.equal(rebuilt(f), head(f, missing))  # no metadata = every field missing
    with pytest.raises(ValueError, match="12"):
        head(f, torch.zeros(5, 3))
    # gradual unfreezing: the metadata branch is part of the head, trainable in the head-only stage
    module.set_trainable_layers({"head"})
    assert all(p.requires_grad for p in head.branch.parameters())
    assert not any(p.requires_grad for p in module.model.backbone.parameters())


def test_fusion_without_metadata_or_with_mixup_is_refused():
    with pytest.raises(ValueError, match="dataset.metadata"):
        LesionClassifier(BACKBONE, "synthetic", ["a", "b"], fusion="concat")
    with pytest.raises(ValueError, match="mixup"):
        LesionClassifier(BACKBONE, "synthetic", ["a", "b"], fusion="concat", metadata_schema=SCHEMA.to_dict(),
                         mixup={"mixup_alpha": 0.8, "cutmix_alpha": 0.0})
    with pytest.raises(ValueError, match="model.fusion must be"):
        LesionClassifier(BACKBONE, "synthetic", ["a", "b"], fusion="gate", metadata_schema=SCHEMA.to_dict())
    plain = LesionClassifier(BACKBONE, "synthetic", ["a", "b"])
    with pytest.raises(ValueError, match="model.fusion=none"):
        plain._logits([torch.zeros(2, 3, 16, 16), torch.zeros(2, 12)], None)


def test_train_py_with_metadata_and_fusion_trains_reports_and_records_the_schema(tmp_path):
    """The issue's line, checked from outside: dataset.metadata='[age,sex,site]' model.fusion=concat,
    with gradual unfreezing (the fusion is in the head, which trains from the first epoch)."""
    import json

    from helpers import compose_cfg, tiny_dataset_overrides, tiny_model_overrides, tiny_trainer_overrides
    from layouts import HAM_LESIONS, write_ham10000_layout
    from melanoma.models.classifier import Classifier
    from melanoma.workflows.training_run import run

    root = write_ham10000_layout(tmp_path / "HAM10000", HAM_LESIONS, images_per_lesion=(1, 2), seed=5)
    cfg = compose_cfg(["dataset=ham10000", "model=vit_tiny", "logger=csv", *tiny_dataset_overrides(root),
                       *tiny_model_overrides(), *tiny_trainer_overrides(2), "evaluate=true",
                       "dataset.metadata=[age,sex,site]", "model.fusion=concat", "callbacks=unfreezing",
                       "callbacks.unfreezing.start_epoch=1"], tmp_path / "run")
    run(cfg)
    metrics = json.loads((tmp_path / "run" / "report" / "metrics.json").read_text())
    model, meta = Classifier.from_checkpoint(metrics["checkpoint"])
    schema = meta.heads["ham10000"].metadata_schema
    assert schema["fields"] == ["age", "sex", "site"] and schema["encodings"]["age"]["scale"] == 100.0
    assert model.heads["ham10000"].fusion == "concat"


def test_joint_member_without_metadata_scores_through_the_missing_indicators():
    module = LesionClassifier(BACKBONE, "ham10000", ["not_melanoma", "melanoma"], image_size=16, fusion="metablock",
                              metadata_schema=SCHEMA.to_dict(), joint_heads={"ham10000": ["not_melanoma", "melanoma"],
                                                                             "ph2": ["a", "b", "melanoma"]})
    module.eval()
    x, m, _ = planted(4, seed=3)
    assert module.model.heads["ph2"].fusion == "metablock"
    with torch.no_grad():
        alone = module._logits(x, "ph2")  # a PH2 batch carries images only
        missing = module._logits([x, torch.from_numpy(SCHEMA.encode(None, 4))], "ph2")
        given = module._logits([x, m], "ph2")
    assert alone.shape == (4, 3) and torch.equal(alone, missing) and not torch.allclose(alone, given)


@pytest.mark.slow
def test_ddp_two_processes_with_metadata_fusion_end_with_identical_parameters(tmp_path):
    """Metadata batches under DDP (2 CPU processes): both ranks train the fusion head and end equal,
    the metadata branch's batch-norm statistics included (DDP broadcasts buffers)."""
    from helpers import run_train_py, tiny_dataset_overrides, tiny_model_overrides, tiny_trainer_overrides
    from layouts import HAM_LESIONS, write_ham10000_layout

    root = write_ham10000_layout(tmp_path / "HAM10000", HAM_LESIONS, images_per_lesion=(1, 2), seed=5)
    run_train_py(["dataset=ham10000", "model=vit_tiny", "logger=csv", *tiny_dataset_overrides(root, batch_size=4),
                  *tiny_model_overrides(), *tiny_trainer_overrides(1), "trainer.devices=2", "test=false",
                  "dataset.metadata=[age,sex,site]", "model.fusion=concat", f"hydra.run.dir={tmp_path / 'run'}",
                  "+callbacks.rec._target_=melanoma.training.debug.RecordTraining",
                  "+callbacks.rec.out_dir=${paths.output_dir}/rec"], cwd=tmp_path, timeout=300)
    rec = tmp_path / "run" / "rec"
    p0, p1 = (torch.load(rec / f"params_rank{r}.pt", weights_only=True) for r in (0, 1))
    start = torch.load(rec / "params_start_rank0.pt", weights_only=True)
    branch = [k for k in p0 if k.startswith("heads.ham10000.") and "fc" not in k.split(".")[-2:]]
    assert branch, sorted(p0)[:20]
    for k in p0:
        assert torch.equal(p0[k], p1[k]), f"{k} differs between ranks"
    assert any(not torch.equal(p0[k], start[k]) for k in branch)  # the metadata branch trained


def test_joint_run_with_one_member_on_metadata_trains_both_heads(ham_root, ph2_flat_root, tmp_path):
    """dataset=joint where HAM10000 brings metadata and PH2 has none: one fusion backbone, PH2's
    head scores through the missing indicators; both heads train and the run reports per member."""
    import json

    from helpers import compose_cfg, tiny_model_overrides, tiny_trainer_overrides
    from melanoma.models.checkpoint import read_meta
    from melanoma.workflows.training_run import run

    cfg = compose_cfg(["dataset=joint", "dataset.members=[ham10000,ph2]", "model=vit_tiny", "logger=csv",
                       "dataset.image_size=32", "dataset.batch_size=8", "dataset.num_workers=0",
                       "dataset.pin_memory=false", "dataset.persistent_workers=false",
                       f"+dataset.member_overrides.ham10000.root={ham_root}",
                       "+dataset.member_overrides.ham10000.metadata=[age,sex,site]",
                       f"+dataset.member_overrides.ph2.root={ph2_flat_root}", "model.fusion=concat",
                       *tiny_model_overrides(), *tiny_trainer_overrides(1)], tmp_path / "run")
    run(cfg)
    metrics = json.loads((tmp_path / "run" / "test" / "metrics.json").read_text())
    assert {"test/ham10000/auroc", "test/ph2/auroc"} <= set(metrics)
    meta = read_meta(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert meta.heads["ham10000"].metadata_schema["fields"] == ["age", "sex", "site"]
