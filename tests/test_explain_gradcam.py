"""Where a timm backbone looked: Grad-CAM (grad-cam package) for CNNs, attention rollout for timm
ViTs; the method names follow the backbone in `melanoma predict --attention-method` and serve."""

import numpy as np
import pytest
import torch

from helpers import lesion_bytes

from melanoma.cli import main
from melanoma.models.checkpoint_io import build_classifier, save_classifier_checkpoint
from melanoma.explain.attention import compute_attention_maps
from melanoma.explain.gradcam import compute_gradcam_maps, default_method, methods_for

pytest.importorskip("pytorch_grad_cam")

SIZE, SIDE = 128, 24
VIT_KW = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def planted(row: int, col: int) -> torch.Tensor:
    """A faint noise background (the same for every image) with one bright square at (row, col)."""
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 0.1
    x[:, :, row:row + SIDE, col:col + SIDE] = torch.tensor([2.0, -1.0, 1.5]).view(1, 3, 1, 1)
    return x


def cnn_classifier():
    torch.manual_seed(0)
    model = build_classifier("resnet10t", {}, {"d": ["not_melanoma", "melanoma"]}, family="timm").eval()
    with torch.no_grad():  # the melanoma logit is the sum of the pooled features: it grows with activation
        weight, bias = list(model.heads["d"].parameters())
        weight.zero_()
        weight[1] = 1.0
        bias.zero_()
    return model


def quadrant_mass(map2d: np.ndarray) -> np.ndarray:
    h, w = map2d.shape
    return np.array([map2d[:h // 2, :w // 2].sum(), map2d[:h // 2, w // 2:].sum(),
                     map2d[h // 2:, :w // 2].sum(), map2d[h // 2:, w // 2:].sum()])


def test_gradcam_map_moves_with_a_planted_object():
    model = cnn_classifier()
    places = {0: (8, 8), 1: (8, 96), 2: (96, 8), 3: (96, 96)}  # quadrant -> top-left corner of the square
    x = torch.cat([planted(*rc) for rc in places.values()])
    maps = compute_gradcam_maps(lambda t: model(t, "d"), x, model.backbone.gradcam_layer(),
                                target=torch.ones(4, dtype=torch.long))
    assert maps.maps["gradcam"].shape == (4, SIZE, SIZE)
    with torch.no_grad():
        np.testing.assert_allclose(maps.logits, model(x, "d").numpy(), rtol=1e-5, atol=1e-5)
    for i, quadrant in enumerate(places):
        mass = quadrant_mass(maps.maps["gradcam"][i])
        assert mass.argmax() == quadrant, (i, mass)
        assert mass[quadrant] > 0.4 * mass.sum()
    # without the object the map has nowhere in particular to go
    empty = compute_gradcam_maps(lambda t: model(t, "d"), planted(0, 0) * 0, model.backbone.gradcam_layer())
    assert empty.maps["gradcam"].max() - empty.maps["gradcam"].min() < 1e-6


def test_methods_follow_the_backbone():
    cnn = cnn_classifier()
    vit = build_classifier("vit_tiny_patch16_224", VIT_KW, {"d": ["a", "melanoma"]}, family="timm").eval()
    ours = build_classifier("vit_tiny", VIT_KW, {"d": ["a", "melanoma"]}).eval()
    assert methods_for(cnn.backbone) == ("gradcam",) and default_method(cnn.backbone) == "gradcam"
    assert methods_for(vit.backbone) == methods_for(ours.backbone) == ("last_layer", "rollout", "grad_rollout")
    assert default_method(vit.backbone) == "rollout"
    # timm ViT: the attention weights read from its explicit softmax path, rows summing to 1; the
    # fused path is back on afterwards and the logits are the plain forward's
    x = torch.randn(2, 3, 32, 32)
    fused = [b.attn.fused_attn for b in vit.backbone.net.blocks]
    maps = compute_attention_maps(lambda t, return_attention: vit(t, "d", return_attention=return_attention),
                                  x, vit.backbone.grid_size, num_prefix_tokens=vit.backbone.num_prefix_tokens,
                                  methods=("last_layer", "rollout", "grad_rollout"))
    assert maps.maps["rollout"].shape == (2, 4, 4) and maps.last_layer_heads.shape == (2, 2, 4, 4)
    with torch.no_grad():
        np.testing.assert_allclose(maps.logits, vit(x, "d").numpy(), rtol=1e-4, atol=1e-5)
        _, attentions = vit.backbone.forward_features(x, return_attention=True)
    assert len(attentions) == 2 and torch.allclose(attentions[0].sum(-1), torch.ones(2, 2, 17))
    assert [b.attn.fused_attn for b in vit.backbone.net.blocks] == fused
    with pytest.raises(ValueError, match="no attention weights"):
        cnn.backbone.forward_features(x, return_attention=True)


def test_predict_draws_the_backbones_maps_and_refuses_the_others(tmp_path, capsys):
    model = cnn_classifier()
    ckpt = save_classifier_checkpoint(tmp_path / "cnn.ckpt", model, "resnet10t", {}, image_size=64, family="timm")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(lesion_bytes(0, size=64))
    out = tmp_path / "maps"
    assert main(["predict", str(ckpt), str(tmp_path / "imgs"), "--attention", str(out),
                 "--out", str(tmp_path / "p.csv")]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a_gradcam.png"]
    code = main(["predict", str(ckpt), str(tmp_path / "imgs"), "--attention", str(out),
                 "--attention-method", "rollout"])
    assert code != 0
    assert "is a CNN" in capsys.readouterr().err

    vit = build_classifier("vit_tiny_patch16_224", VIT_KW, {"d": ["a", "melanoma"]}, family="timm")
    ckpt = save_classifier_checkpoint(tmp_path / "vit.ckpt", vit, "vit_tiny_patch16_224", VIT_KW, image_size=32,
                                      family="timm")
    out = tmp_path / "vit_maps"
    assert main(["predict", str(ckpt), str(tmp_path / "imgs"), "--attention", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a_heads.png", "a_rollout.png"]


def test_serve_offers_the_backbones_overlays(tmp_path):
    pytest.importorskip("fastapi")
    from melanoma.serve.engine import ModelService, ServeError, Upload

    ckpt = save_classifier_checkpoint(tmp_path / "cnn.ckpt", cnn_classifier(), "resnet10t", {}, image_size=64,
                                      family="timm")
    service = ModelService(ckpt)
    assert service.overlay_methods == ("gradcam", "none") and service.default_overlay == "gradcam"
    result = service.predict([Upload("a.jpg", lesion_bytes(0, size=64))])
    assert result["overlay"] == "gradcam" and result["predictions"][0]["overlay_png"]
    with pytest.raises(ServeError, match="choose one of \\['gradcam', 'none'\\]"):
        service.predict([Upload("a.jpg", lesion_bytes(0, size=64))], overlay="rollout")
