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
