"""Parameter groups and LR schedules (melanoma.training.optim)."""

import math

import pytest
import torch

from melanoma.models import build_backbone
from melanoma.models.heads import LinearHead
from melanoma.training import optim


def tiny_vit(depth=3):
    return build_backbone("vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2)


def layer_names(depth):
    return tiny_vit(depth).layer_groups()


def test_the_backbone_owns_its_layer_groups():
    vit = tiny_vit()
    assert vit.layer_groups() == ["patch_embed", "pos_cls", "block0", "block1", "block2", "norm"]
    assert {vit.layer_of(n) for n, _ in vit.named_parameters()} == set(vit.layer_groups())
    assert vit.layer_of("blocks.2.attn.qkv.weight") == "block2"
    with pytest.raises(ValueError, match="no known layer"):
        vit.layer_of("fc.weight")
    # the forward stages below the lowest trainable layer
    assert vit.frozen_prefix(None) == 0 and vit.frozen_prefix({"head", "pos_cls"}) == 0
    assert vit.frozen_prefix({"head", "norm", "block1"}) == 2
    assert vit.frozen_prefix({"head", "norm"}) == 4 and vit.frozen_prefix({"head"}) == 5


def test_param_groups_cover_each_parameter_once_without_decay_on_norms_biases_embeddings():
    vit, head = tiny_vit(), LinearHead(32, ["a", "melanoma"])
    lrs = optim.layer_lrs(layer_names(3), lr=1e-3, head_lr=1e-2)
    groups = optim.param_groups(vit, head, lrs, weight_decay=0.05)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(vit.parameters())) + len(list(head.parameters()))
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(vit.named_parameters())
    for name in ("pos_embed", "cls_token", "norm.weight", "norm.bias", "blocks.0.norm1.weight",
                 "blocks.1.attn.qkv.bias", "patch_embed.proj.bias"):
        assert by_param[id(named[name])]["weight_decay"] == 0.0, name
    for name in ("blocks.0.attn.qkv.weight", "blocks.2.mlp.fc1.weight", "patch_embed.proj.weight"):
        assert by_param[id(named[name])]["weight_decay"] == 0.05, name
    assert by_param[id(next(head.parameters()))]["lr"] == 1e-2
    # head first, then norm, top block ... bottom block, pos/cls, patch embed: the thaw order
    layers = list(dict.fromkeys(g["layer"] for g in groups))
    assert layers == ["head", "norm", "block2", "block1", "block0", "pos_cls", "patch_embed"]


def test_layer_decay_and_group_overrides():
    lrs = optim.layer_lrs(layer_names(3), lr=1.0, head_lr=5.0, layer_decay=0.5)
    assert lrs["head"] == 5.0 and lrs["norm"] == 1.0
    assert lrs["block2"] == 0.5 and lrs["block1"] == 0.25 and lrs["block0"] == 0.125
    assert lrs["pos_cls"] == lrs["patch_embed"] == 0.0625
    lrs = optim.layer_lrs(layer_names(3), lr=1.0, group_lr={"blocks": 1e-5, "block2": 2e-5, "pos_cls": 1e-7,
                                               "head": None})
    assert lrs["block0"] == 1e-5 and lrs["block2"] == 2e-5 and lrs["pos_cls"] == 1e-7
    assert lrs["head"] == 1.0  # null means "not overridden"
    with pytest.raises(ValueError, match="unknown layers"):
        optim.layer_lrs(layer_names(3), lr=1.0, group_lr={"block7": 1e-3})


def test_warmup_cosine_multiplier():
    fn = optim.WarmupCosine(warmup_steps=4, total_steps=24, min_ratio=0.1)
    values = [fn(s) for s in range(25)]
    assert values[0] == pytest.approx(0.2) and values[3] == pytest.approx(0.8)
    assert values[4] == pytest.approx(1.0)
    assert values[24] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[4:], values[5:]))
    assert values[14] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_adamw_leaves_parameters_without_grad_untouched_including_weight_decay():
    vit, head = tiny_vit(1), LinearHead(32, ["a", "melanoma"])
    groups = optim.param_groups(vit, head, optim.layer_lrs(layer_names(1), lr=0.1), weight_decay=0.5)
    opt = optim.build_optimizer(groups, {"_target_": "torch.optim.AdamW", "weight_decay": 0.5, "head_lr": None,
                                         "layer_decay": None, "group_lr": {}})
    assert type(opt) is torch.optim.AdamW and opt.defaults["weight_decay"] == 0.5
    before = {n: p.detach().clone() for n, p in vit.named_parameters()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = vit.forward_head(vit.forward_features(x), pre_logits=True)
    head(feats).sum().backward()
    opt.step()
    for n, p in vit.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p not in opt.state or not opt.state[p]


# --- the plateau schedule that keeps the per-layer recipe ---------------------------------------

# the reference recipe's rates: head 1e-4, blocks 1e-5, norm/patch_embed 1e-6, pos_cls 1e-7
REFERENCE_LRS = {"head": 1e-4, "norm": 1e-6, "block0": 1e-5, "pos_cls": 1e-7, "patch_embed": 1e-6}


def reference_optimizer():
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr, "layer": layer}
              for layer, lr in REFERENCE_LRS.items()]
    return torch.optim.AdamW(groups)


def lrs_of(opt):
    return {g["layer"]: g["lr"] for g in opt.param_groups}


def test_plateau_cuts_every_group_by_one_factor_and_keeps_the_ratios():
    opt = reference_optimizer()
    sched = optim.LayerwisePlateauLR(opt, mode="min", factor=0.1, patience=0, min_scale=0.0)
    sched.step(1.0)  # the first value is the best so far: no cut
    for _ in range(3):
        sched.step(2.0)  # no improvement, patience 0: one cut each
    assert sched.scale == pytest.approx(1e-3)
    # torch's ReduceLROnPlateau (eps=1e-8) would leave pos_cls at 1e-8 after the second cut while head
    # keeps falling; here every group is its configured rate times the one shared factor
    assert lrs_of(opt) == pytest.approx({k: v * 1e-3 for k, v in REFERENCE_LRS.items()}, rel=1e-12, abs=0)
    assert sched.get_last_lr() == pytest.approx([v * 1e-3 for v in REFERENCE_LRS.values()], rel=1e-12, abs=0)
    head = lrs_of(opt)["head"]
    for layer, lr in lrs_of(opt).items():
        assert lr / head == pytest.approx(REFERENCE_LRS[layer] / REFERENCE_LRS["head"], rel=1e-12)


def test_plateau_floor_is_a_factor_and_holds_for_every_group():
    opt = reference_optimizer()
    sched = optim.LayerwisePlateauLR(opt, factor=0.5, patience=0, min_scale=0.2)
    sched.step(1.0)
    for _ in range(5):
        sched.step(2.0)
    assert sched.scale == pytest.approx(0.2)
    assert lrs_of(opt) == pytest.approx({k: v * 0.2 for k, v in REFERENCE_LRS.items()}, rel=1e-12, abs=0)
    with pytest.raises(ValueError, match="factor"):
        optim.LayerwisePlateauLR(opt, factor=1.5)


def test_plateau_patience_threshold_and_cooldown_follow_torch():
    opt = reference_optimizer()
    sched = optim.LayerwisePlateauLR(opt, mode="max", factor=0.1, patience=1, cooldown=1, min_scale=0.0)
    scales = []
    for metric in [0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]:
        sched.step(metric)
        scales.append(sched.scale)
    # best 0.6 at epoch 1; two bad epochs (2, 3) > patience 1 -> cut; one cooldown epoch (4), then
    # bad epochs 5, 6 -> second cut
    assert scales == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1, 0.01])


def test_plateau_holds_while_stages_are_still_frozen():
    opt = reference_optimizer()
    sched = optim.LayerwisePlateauLR(opt, factor=0.1, patience=0, hold_while_frozen=True)
    sched.set_thawing(True)  # GradualUnfreezing says so at each epoch start
    for metric in [1.0, 2.0, 3.0, 4.0, 0.5]:
        sched.step(metric)
    assert sched.scale == 1.0 and lrs_of(opt) == pytest.approx(REFERENCE_LRS)
    assert sched.best == 0.5 and sched.num_bad_epochs == 0  # improvements still count
    sched.set_thawing(False)
    sched.step(0.7)
    assert sched.scale == pytest.approx(0.1)
    # without hold_while_frozen the frozen stages do not stop it
    opt = reference_optimizer()
    sched = optim.LayerwisePlateauLR(opt, factor=0.1, patience=0, hold_while_frozen=False)
    sched.set_thawing(True)
    sched.step(1.0)
    sched.step(2.0)
    assert sched.scale == pytest.approx(0.1)


def test_plateau_state_round_trips():
    opt = reference_optimizer()
    sched = optim.LayerwisePlateauLR(opt, factor=0.1, patience=0)
    sched.step(1.0)
    sched.step(2.0)
    state = sched.state_dict()
    fresh_opt = reference_optimizer()
    fresh = optim.LayerwisePlateauLR(fresh_opt, factor=0.1, patience=0)
    fresh.load_state_dict(state)
    assert fresh.scale == pytest.approx(0.1) and fresh.best == 1.0
    assert fresh.get_last_lr() == pytest.approx([v * 0.1 for v in REFERENCE_LRS.values()])


def test_thaw_warmup_factor_rises_from_about_zero():
    f = [optim.thaw_warmup_factor(step, thaw_step=10, warmup_steps=4) for step in range(8, 17)]
    assert f == pytest.approx([0.0, 0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0])
    # trained from the first step (the main schedule warms it up), or warmup off
    assert optim.thaw_warmup_factor(0, thaw_step=0, warmup_steps=4) == 1.0
    assert optim.thaw_warmup_factor(10, thaw_step=10, warmup_steps=0) == 1.0


def test_fused_auto_is_fused_on_gpu_parameters_only():
    from types import SimpleNamespace

    from melanoma.training.optim import build_optimizer, resolve_fused

    on = lambda kind: [SimpleNamespace(device=torch.device(kind)) for _ in range(3)]  # noqa: E731
    assert resolve_fused(torch.optim.AdamW, on("cuda")) is True
    assert resolve_fused(torch.optim.SGD, on("cuda")) is True
    assert resolve_fused(torch.optim.AdamW, on("cpu")) is None
    assert resolve_fused(torch.optim.AdamW, on("cuda") + on("cpu")) is None
    with pytest.raises(ValueError, match="takes no `fused`"):
        resolve_fused(torch.optim.Rprop, on("cuda"))
    # through the composed config: auto reaches torch as its own default on a CPU
    w = torch.nn.Parameter(torch.ones(2))
    opt = build_optimizer([{"params": [w], "lr": 0.1, "weight_decay": 0.0}],
                          {"_target_": "torch.optim.AdamW", "fused": "auto"})
    assert opt.defaults["fused"] is None
