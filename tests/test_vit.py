import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT

from melanoma.models import build_backbone
from melanoma.models.vit import DropPath, VisionTransformer, vit_base, vit_small, vit_tiny

SMALL_CFG = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def _pair(num_classes=5, **kw):
    """Our model and timm's with the same tiny config and the same weights."""
    cfg = {**SMALL_CFG, **kw}
    torch.manual_seed(0)
    ref = TimmViT(num_classes=num_classes, **cfg).eval()
    ours = VisionTransformer(num_classes=num_classes, **cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.mark.parametrize(
    "factory, timm_name, dims",
    [(vit_tiny, "deit_tiny_patch16_224", (192, 12, 3)),
     (vit_small, "deit_small_patch16_224", (384, 12, 6)),
     (vit_base, "deit_base_patch16_224", (768, 12, 12))],
)
def test_presets_have_timm_deit_keys_and_shapes(factory, timm_name, dims):
    ours = factory(num_classes=1000)
    ref = timm.create_model(timm_name, pretrained=False)
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert list(ours_sd) == list(ref_sd)
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in ref_sd.items()}
    assert (ours.embed_dim, ours.depth, ours.num_heads) == dims
    assert ours.patch_size == 16 and ours.grid_size == (14, 14) and ours.num_patches == 196
    assert ours.num_prefix_tokens == 1
    blk = ours.blocks[0]
    assert blk.norm1.eps == 1e-6 and blk.norm2.eps == 1e-6 and ours.norm.eps == 1e-6
    assert blk.attn.qkv.bias is not None
    assert blk.mlp.fc1.out_features == 4 * dims[0]
    assert isinstance(blk.mlp.act, torch.nn.GELU) and blk.mlp.act.approximate == "none"


def test_build_backbone_names_and_kwargs():
    m = build_backbone("vit_tiny", img_size=32, depth=1)
    assert (m.embed_dim, m.depth, m.img_size, m.grid_size) == (192, 1, 32, (2, 2))
    assert isinstance(m.head, torch.nn.Identity)
    with pytest.raises(ValueError, match="vit_tiny"):
        build_backbone("resnet50")


def test_same_outputs_as_timm_with_same_weights():
    ours, ref = _pair()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours.forward_features(x), ref.forward_features(x), atol=1e-5)
        assert torch.allclose(ours(x), ref(x), atol=1e-5)
        assert torch.allclose(ours.prepare_tokens(x), ref._pos_embed(ref.patch_embed(x)), atol=1e-6)


def test_token_shapes_and_head():
    ours, _ = _pair(num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    tokens = ours.forward_features(x)
    assert tokens.shape == (2, 1 + 16, 32)
    assert torch.equal(ours.forward_head(tokens, pre_logits=True), tokens[:, 0])
    assert ours.forward_head(tokens).shape == (2, 5)
    headless = VisionTransformer(**SMALL_CFG)
    assert headless(x).shape == (2, 32)


def test_explicit_attention_path_matches_fused_and_rows_sum_to_one():
    ours, _ = _pair()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = ours(x)
        logits, attentions = ours(x, return_attention=True)
    assert (logits - fused).abs().max() < 1e-5
    assert len(attentions) == 2
    for a in attentions:
        assert a.shape == (2, 2, 17, 17)
        assert torch.allclose(a.sum(-1), torch.ones(2, 2, 17), atol=1e-5)
        assert (a >= 0).all()
    feats, atts = ours.forward_features(x, return_attention=True)
    assert torch.allclose(feats, ours.forward_features(x), atol=1e-5) and len(atts) == 2


def test_returned_attention_stays_in_autograd_graph():
    ours, _ = _pair()
    x = torch.randn(1, 3, 32, 32)
    logits, attentions = ours(x, return_attention=True)
    assert all(a.requires_grad and a.grad_fn is not None for a in attentions)
    for a in attentions:
        a.retain_grad()
    logits[0, 1].backward()
    for a in attentions:
        assert a.grad is not None and a.grad.abs().sum() > 0


def test_block_returns_attention_only_when_asked():
    ours, _ = _pair()
    tokens = torch.randn(2, 17, 32)
    out = ours.blocks[0](tokens)
    assert isinstance(out, torch.Tensor)
    y, attn = ours.blocks[0](tokens, return_attention=True)
    assert torch.allclose(y, out, atol=1e-5) and attn.shape == (2, 2, 17, 17)


def test_timm_style_init():
    torch.manual_seed(0)
    m = vit_small(num_classes=10)
    assert 1e-7 < m.cls_token.std() < 1e-5
    assert abs(m.pos_embed.std().item() - 0.02) < 0.002 and m.pos_embed.abs().max() <= 2.0
    for lin in [m.blocks[3].attn.qkv, m.blocks[7].mlp.fc2, m.head]:
        assert abs(lin.weight.std().item() - 0.02) < 0.002  # truncated at +-2 absolute (~4 sigma)
        assert torch.count_nonzero(lin.bias) == 0
    assert torch.equal(m.norm.weight, torch.ones(384)) and torch.count_nonzero(m.blocks[0].norm1.bias) == 0


def test_dropout_and_drop_path_arguments():
    m = VisionTransformer(**SMALL_CFG, drop_rate=0.1, attn_drop_rate=0.2, drop_path_rate=0.3)
    assert m.pos_drop.p == 0.1 and m.blocks[0].attn.proj_drop.p == 0.1 and m.blocks[0].mlp.drop1.p == 0.1
    assert m.blocks[1].attn.attn_drop.p == 0.2
    assert m.blocks[0].drop_path.drop_prob == 0.0  # stochastic depth grows from 0 at the first block
    assert m.blocks[1].drop_path.drop_prob == pytest.approx(0.3)
    x = torch.randn(4, 3, 32, 32)
    m.train()
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(2)
    b = m(x)
    assert not torch.allclose(a, b)
    m.eval()
    assert torch.equal(m(x), m(x))


def test_drop_path_drops_whole_samples_and_rescales():
    dp = DropPath(0.5).train()
    torch.manual_seed(0)
    x = torch.ones(1000, 4, 8)
    y = dp(x)
    per_sample = y.flatten(1)
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert (per_sample == per_sample[:, :1]).all()
    assert 0.4 < (per_sample[:, 0] == 0).float().mean() < 0.6
    assert torch.equal(dp.eval()(x), x)


def test_wrong_image_size_is_refused_with_advice():
    m = VisionTransformer(**SMALL_CFG)
    with pytest.raises(ValueError, match=r"expected images of 32x32 px, got 48x48.*img_size=48"):
        m(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        VisionTransformer(img_size=30, patch_size=8, embed_dim=32, depth=1, num_heads=2)


def test_zero_rates_make_train_mode_deterministic():
    ours, ref = _pair()
    ours.train(), ref.train()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    a = ours(x)
    assert torch.equal(a, ours(x))
    assert (a - ref(x)).abs().max() < 1e-5
