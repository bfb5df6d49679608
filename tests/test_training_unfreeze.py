"""Gradual unfreezing: schedule, no_grad forward of frozen layers, and a real training run."""

import json

import pytest
import torch

from melanoma.workflows.training_run import run
from melanoma.training.module import LesionClassifier
from melanoma.training.unfreeze import GradualUnfreezing, default_unfreeze_order
from helpers import compose_cfg, tiny_overrides

BACKBONE = {"name": "vit_tiny", "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32,
                                           "depth": 3, "num_heads": 2}}


LAYERS = ["patch_embed", "pos_cls", "block0", "block1", "block2", "norm"]  # depth 3, forward order


def make_module(**kw):
    return LesionClassifier(backbone=BACKBONE, dataset_name="dermmel",
                            class_names=["not_melanoma", "melanoma"], **kw)


def test_schedule_head_only_then_one_stage_per_period():
    cb = GradualUnfreezing(start_epoch=2, every_n_epochs=2)
    stages = cb.resolve_stages(LAYERS)
    assert stages == [["norm"], ["block2"], ["block1"], ["block0"], ["pos_cls"], ["patch_embed"]]
    assert [cb.stage_at(e, len(stages)) for e in range(16)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 6, 6]
    assert cb.trainable_layers(3, LAYERS) == {"head", "norm"}
    assert cb.trainable_layers(4, LAYERS) == {"head", "norm", "block2"}


def test_stage_size_order_and_explicit_stages():
    cb = GradualUnfreezing(start_epoch=0, stage_size=2)
    assert cb.resolve_stages(LAYERS) == [["norm", "block2"], ["block1", "block0"], ["pos_cls", "patch_embed"]]
    cb = GradualUnfreezing(order=["block2", "norm"])
    assert cb.resolve_stages(LAYERS) == [["block2"], ["norm"]]
    cb = GradualUnfreezing(stages=[["norm", "block2", "block1"], ["block0"]])
    assert cb.trainable_layers(1, LAYERS) == {"head", "norm", "block2", "block1"}
    with pytest.raises(ValueError, match="unknown layers"):
        GradualUnfreezing(order=["block9"]).resolve_stages(LAYERS)
    with pytest.raises(ValueError, match="two stages"):
        GradualUnfreezing(stages=[["norm"], ["norm"]]).resolve_stages(LAYERS)
    assert default_unfreeze_order(LAYERS) == ["norm", "block2", "block1", "block0", "pos_cls", "patch_embed"]


@pytest.mark.parametrize("layers", [{"head"}, {"head", "norm"}, {"head", "norm", "block2"},
                                    {"head", "norm", "block2", "block1", "block0", "pos_cls"}])
def test_frozen_layers_get_no_gradient_and_forward_is_unchanged(layers):
    torch.manual_seed(0)
    module = make_module()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    module.eval()
    reference = module.model(x, "dermmel")
    module.set_trainable_layers(layers)
    out = module(x)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    torch.nn.functional.cross_entropy(out, y).backward()
    for name, p in module.model.backbone.named_parameters():
        trainable = module.model.backbone.layer_of(name) in layers
        assert (p.grad is not None) == trainable, name
        assert p.requires_grad == trainable, name
    assert all(p.grad is not None for p in module.head.parameters())


def test_frozen_prefix_runs_without_autograd_graph():
    module = make_module()
    module.set_trainable_layers({"head", "norm", "block2"})
    seen = {}
    blocks = module.model.backbone.blocks
    for i, block in enumerate(blocks):
        block.register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__(i, (torch.is_grad_enabled(), out.requires_grad)))
    module.train()
    module(torch.randn(2, 3, 32, 32))
    # blocks 0, 1 frozen -> no graph (no stored activations, no backward); block 2 trains
    assert seen == {0: (False, False), 1: (False, False), 2: (True, True)}
    assert module.trainable_parameter_count() == sum(
        p.numel() for n, p in module.model.named_parameters()
        if n.startswith(("backbone.norm", "backbone.blocks.2", "heads.dermmel")))


def test_training_run_thaws_one_layer_per_epoch_and_keeps_frozen_weights(tiny_dermmel, tmp_path):
    rec = tmp_path / "rec"
    cfg = compose_cfg([*tiny_overrides(tiny_dermmel, max_epochs=4), "callbacks=unfreezing",
                       "callbacks.unfreezing.start_epoch=1", "model.backbone.kwargs.depth=2",
                       "+callbacks.rec._target_=melanoma.training.debug.RecordTraining",
                       f"+callbacks.rec.out_dir={rec}", "test=false", "model/scheduler=none"],
                      tmp_path / "run")
    run(cfg)
    stages = [json.loads(line) for line in (rec / "stages_rank0.jsonl").read_text().splitlines()]
    assert [s["layers"] for s in stages] == [
        ["head"], ["head", "norm"], ["block1", "head", "norm"], ["block0", "block1", "head", "norm"]]
    counts = [s["trainable_params"] for s in stages]
    assert counts[0] < counts[1] < counts[2] < counts[3]
    start, end = torch.load(rec / "params_start_rank0.pt", weights_only=True), torch.load(rec / "params_rank0.pt", weights_only=True)
    changed = {k for k in start if not torch.equal(start[k], end[k])}
    assert {"backbone.pos_embed", "backbone.cls_token", "backbone.patch_embed.proj.weight"}.isdisjoint(changed)
    assert {"backbone.norm.weight", "backbone.blocks.1.attn.qkv.weight",
            "backbone.blocks.0.mlp.fc1.weight", "heads.dermmel.fc.weight"} <= changed
    # every parameter is in the optimizer from the start; only thawed ones have AdamW state
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    opt = ckpt["optimizer_states"][0]
    layers = [g["layer"] for g in opt["param_groups"]]
    assert {"head", "norm", "block1", "block0", "pos_cls", "patch_embed"} == set(layers)
    with_state = {i for g in opt["param_groups"] for i in g["params"] if i in opt["state"]}
    frozen = {i for g in opt["param_groups"] if g["layer"] in ("pos_cls", "patch_embed") for i in g["params"]}
    assert with_state and not (with_state & frozen)


def lr_rows(run_dir):
    import pandas as pd

    m = pd.read_csv(run_dir / "csv" / "metrics.csv")
    return m[m["lr/head"].notna()].sort_values("step")


LP_FT_PLATEAU = ["callbacks=unfreezing", "callbacks.unfreezing.start_epoch=1",
                 "callbacks.unfreezing.stages=[[norm,block1,block0,pos_cls,patch_embed]]",
                 "callbacks.unfreezing.warmup_steps=3", "model/scheduler=plateau",
                 "model.scheduler.patience=0", "model.scheduler.threshold_mode=abs",
                 "model.scheduler.threshold=1e9", "model.scheduler.hold_while_frozen=true",
                 "model.optimizer.lr=1e-3", "model.optimizer.head_lr=1e-2",
                 "model.optimizer.layer_decay=0.5", "test=false"]


def test_lp_ft_thaw_warms_up_each_group_and_plateau_holds_then_keeps_ratios(tiny_dermmel, tmp_path):
    """Head only for 1 epoch, then every layer (LP-FT as one stage); 2 steps per epoch, warmup 3
    steps. The plateau scheduler sees a bad epoch every epoch (abs threshold 1e9, patience 0): held
    while the backbone is frozen (end of epoch 0), it cuts by 0.1 at the end of epoch 1."""
    cfg = compose_cfg([*tiny_overrides(tiny_dermmel, max_epochs=3), *LP_FT_PLATEAU], tmp_path / "run")
    run(cfg)
    rows = lr_rows(tmp_path / "run")
    assert len(rows) == 6
    base = {"head": 1e-2, "norm": 1e-3, "block1": 5e-4, "block0": 2.5e-4, "pos_cls": 1.25e-4,
            "patch_embed": 1.25e-4}
    # steps 0-1 head only (backbone frozen: effective rate 0); thaw at step 2, warmup (s+1)/4;
    # the cut after epoch 1 (step 4 on) scales every group by 0.1, warmup included
    warm = [0, 0, 1 / 4, 2 / 4, 0.1 * 3 / 4, 0.1]
    head = [1, 1, 1, 1, 0.1, 0.1]
    for layer, lr in base.items():
        expected = [lr * f for f in (head if layer == "head" else warm)]
        assert rows[f"lr/{layer}"].tolist() == pytest.approx(expected, rel=1e-6, abs=0), layer


def test_warmup_and_plateau_state_resume_exactly(tiny_dermmel, tmp_path):
    """Stopped after epoch 1 (mid-warmup, the cut just made), resumed to epoch 3: step 4's rates
    are those of the uninterrupted run (0.1 x 3/4 of the configured rates)."""
    run(compose_cfg([*tiny_overrides(tiny_dermmel, max_epochs=2), *LP_FT_PLATEAU], tmp_path / "first"))
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    run(compose_cfg([*tiny_overrides(tiny_dermmel, max_epochs=3), *LP_FT_PLATEAU, f"ckpt_path={last}"],
                    tmp_path / "resumed"))
    rows = lr_rows(tmp_path / "resumed")
    step4 = rows[rows["step"] == rows["step"].max() - 1].iloc[0]
    assert step4["lr/norm"] == pytest.approx(1e-3 * 0.1 * 3 / 4, rel=1e-6)
    assert step4["lr/block0"] == pytest.approx(2.5e-4 * 0.1 * 3 / 4, rel=1e-6)
    assert step4["lr/head"] == pytest.approx(1e-2 * 0.1, rel=1e-6)


def test_without_hold_the_plateau_cuts_while_frozen(tiny_dermmel, tmp_path):
    cfg = compose_cfg([*tiny_overrides(tiny_dermmel, max_epochs=3), "callbacks=unfreezing",
                       "callbacks.unfreezing.start_epoch=5", "model/scheduler=plateau",
                       "model.scheduler.patience=0", "model.scheduler.threshold_mode=abs",
                       "model.scheduler.threshold=1e9", "model.scheduler.hold_while_frozen=false",
                       "model.optimizer.head_lr=1e-2", "test=false"], tmp_path / "run")
    run(cfg)
    rows = lr_rows(tmp_path / "run")
    # epoch 0 sets the best, epoch 1 is bad: one cut, though nothing has thawed
    assert rows["lr/head"].tolist() == pytest.approx([1e-2] * 4 + [1e-3] * 2, rel=1e-6, abs=0)
    assert rows["lr/norm"].tolist() == [0.0] * 6  # frozen all along: effective rate 0
