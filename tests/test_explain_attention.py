"""Attention maps: rollout (Abnar & Zuidema) and gradient-weighted rollout (Chefer et al. 2021,
unnormalised) on hand-built attentions."""

import numpy as np
import pytest
import torch

from melanoma.explain.attention import (
    attention_rollout,
    cls_gradient_rollout,
    cls_map,
    cls_rollout,
    compute_attention_maps,
    gradient_weighted_rollout,
    last_layer_cls_attention,
    mass_inside,
)


def _two_layers():
    # 3 tokens (class token + 2 patches on a 1x2 grid), 2 heads
    eye = torch.eye(3)
    to_token1 = torch.tensor([[0.0, 1, 0], [0, 1, 0], [0, 1, 0]])
    uniform = torch.full((3, 3), 1 / 3)
    layer1 = torch.stack([eye, to_token1])[None]
    layer2 = torch.stack([uniform, uniform])[None]
    return [layer1, layer2]


def test_rollout_of_hand_built_two_layers():
    joint = attention_rollout(_two_layers())
    # layer 1: mean heads + I, rows / 2 -> [[.75,.25,0],[0,1,0],[0,.25,.75]]
    # layer 2: uniform + I, rows / 2 -> 2/3 on the diagonal, 1/6 off it
    a1 = torch.tensor([[0.75, 0.25, 0], [0, 1, 0], [0, 0.25, 0.75]])
    a2 = torch.full((3, 3), 1 / 6) + torch.eye(3) * 0.5
    torch.testing.assert_close(joint[0], a2 @ a1)
    torch.testing.assert_close(joint[0, 0], torch.tensor([0.5, 0.375, 0.125]))
    torch.testing.assert_close(joint.sum(-1), torch.ones(1, 3))
    torch.testing.assert_close(cls_map(joint, (1, 2)), torch.tensor([[[0.375, 0.125]]]))


def test_rollout_rows_sum_to_one_on_random_attention():
    g = torch.Generator().manual_seed(0)
    atts = [torch.softmax(torch.randn(2, 3, 17, 17, generator=g), -1) for _ in range(4)]
    joint = attention_rollout(atts)
    torch.testing.assert_close(joint.sum(-1), torch.ones(2, 17))
    assert cls_map(joint, (4, 4)).shape == (2, 4, 4)


def test_last_layer_cls_attention_per_head_and_mean():
    per_head, mean = last_layer_cls_attention(_two_layers(), (1, 2))
    assert per_head.shape == (1, 2, 1, 2)
    torch.testing.assert_close(mean, torch.full((1, 1, 2), 1 / 3))
    with pytest.raises(ValueError, match="do not fill"):
        last_layer_cls_attention(_two_layers(), (2, 2))


def test_gradient_weighted_rollout_follows_the_chefer_rule_by_hand():
    atts = _two_layers()
    # layer 1: head 0 (identity) x grad 1, head 1 (all to token 1) x grad 2; mean over heads
    #   A1 = [[.5, 1, 0], [0, 1.5, 0], [0, 1, .5]];  R1 = I + A1 = [[1.5, 1, 0], [0, 2.5, 0], [0, 1, 1.5]]
    # layer 2 (uniform 1/3): head 0 x grad 3 = all ones; head 1 x [[3,-3,0],[0,0,0],[0,0,3]] = diag(1, 0, 1)
    #   once the -1 is clamped;  A2 = [[1, .5, .5], [.5, .5, .5], [.5, .5, 1]]
    #   R2 = R1 + A2 R1 = (I + A2) R1, rows by hand:
    #   2[1.5,1,0] + .5[0,2.5,0] + .5[0,1,1.5] = [3, 3.75, .75]
    #   .5[1.5,1,0] + 1.5[0,2.5,0] + .5[0,1,1.5] = [.75, 4.75, .75]
    #   .5[1.5,1,0] + .5[0,2.5,0] + 2[0,1,1.5] = [.75, 3.75, 3]
    grads = [
        torch.stack([torch.ones(3, 3), torch.full((3, 3), 2.0)])[None],
        torch.stack([torch.full((3, 3), 3.0), torch.tensor([[3.0, -3, 0], [0, 0, 0], [0, 0, 3]])])[None],
    ]
    expected = torch.tensor([[3.0, 3.75, 0.75], [0.75, 4.75, 0.75], [0.75, 3.75, 3.0]])
    joint = gradient_weighted_rollout(atts, grads)
    torch.testing.assert_close(joint[0], expected)
    torch.testing.assert_close(cls_map(joint, (1, 2)), torch.tensor([[[3.75, 0.75]]]))
    torch.testing.assert_close(cls_gradient_rollout(atts, grads)[0], expected[0])
    # layer 1 alone: R1 = I + A1, nothing renormalised
    one = gradient_weighted_rollout(atts[:1], grads[:1])[0]
    torch.testing.assert_close(one, torch.tensor([[1.5, 1, 0], [0, 2.5, 0], [0, 1, 1.5]]))


def test_gradient_weighted_rollout_known_cases():
    atts = _two_layers()
    ones = [torch.ones_like(a) for a in atts]
    # unit gradients on row-stochastic attention: every I + A has rows summing to 2, which rollout
    # divides away layer by layer, so the unnormalised product is 2^layers times rollout
    torch.testing.assert_close(gradient_weighted_rollout(atts, ones), 4 * attention_rollout(atts))
    # negative gradients are clamped away: only the residual identity is left
    negative = [-torch.ones_like(a) for a in atts]
    torch.testing.assert_close(gradient_weighted_rollout(atts, negative)[0], torch.eye(3))


def test_gradient_scale_is_kept_not_renormalised():
    # one layer: R = I + mean_h (c g * a)+ = I + c (A_bar), so R - I scales with c exactly
    g = torch.Generator().manual_seed(2)
    att = [torch.softmax(torch.randn(2, 3, 10, 10, generator=g), -1)]
    grad = [torch.randn(2, 3, 10, 10, generator=g)]
    eye = torch.eye(10)
    base = gradient_weighted_rollout(att, grad) - eye
    assert base.abs().max() > 0  # the comparison below is not 0 == 0
    for c in (0.5, 100.0):
        torch.testing.assert_close(gradient_weighted_rollout(att, [c * grad[0]]) - eye, c * base)
        torch.testing.assert_close(cls_gradient_rollout(att, [c * grad[0]]) - eye[0], c * base[:, 0])


def test_gradients_must_match_the_attentions():
    atts = _two_layers()
    with pytest.raises(ValueError, match="2 attention layers but 1 gradients"):
        gradient_weighted_rollout(atts, [torch.ones_like(atts[0])])
    with pytest.raises(ValueError, match="2 attention layers but 1 gradients"):
        cls_gradient_rollout(atts, [torch.ones_like(atts[0])])
    with pytest.raises(ValueError, match="gradient of layer 1 has shape"):
        gradient_weighted_rollout(atts, [torch.ones_like(atts[0]), torch.ones(1, 1, 3, 3)])


def test_compute_attention_maps_takes_gradients_through_the_attentions():
    # a toy "model": attention from a softmax of the input, logit c = class token's attention to
    # patch c in the last layer, averaged over heads
    def forward(x, return_attention=False):
        a1 = torch.softmax(x, -1)
        a2 = torch.softmax(2 * x, -1)
        logits = a2[:, :, 0, 1:].mean(1)
        return (logits, [a1, a2]) if return_attention else logits

    x = torch.randn(2, 2, 3, 3)
    out = compute_attention_maps(forward, x, (1, 2), methods=("last_layer", "rollout", "grad_rollout"))
    assert set(out.maps) == {"last_layer", "rollout", "grad_rollout"}
    a1, a2 = torch.softmax(x, -1), torch.softmax(2 * x, -1)
    target = out.target
    # d logit_t / d a2[h, 0, 1 + t] = 1 / heads, every other gradient is zero
    w2 = torch.zeros(2, 3, 3)
    for b in range(2):
        t = int(target[b])
        w2[b, 0, 1 + t] = a2[b, :, 0, 1 + t].mean() / 2
    # layer 1 gets zero weight (R1 = I), so R = I + w2, not renormalised
    r2 = torch.eye(3) + w2
    expected = r2[:, 0, 1:].reshape(2, 1, 2).numpy()
    np.testing.assert_allclose(out.maps["grad_rollout"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.maps["rollout"], cls_map(attention_rollout([a1, a2]), (1, 2)).numpy(), rtol=1e-6)
    assert out.last_layer_heads.shape == (2, 2, 1, 2)
    with pytest.raises(ValueError, match="unknown attention method"):
        compute_attention_maps(forward, x, (1, 2), methods=("saliency",))


def test_mass_inside_mask():
    maps = np.array([[[1.0, 3.0], [0.0, 0.0]]])
    mask = np.array([[[False, True], [False, False]]])
    assert mass_inside(maps, mask)[0] == pytest.approx(0.75)


def test_class_token_row_shortcut_equals_the_full_product():
    g = torch.Generator().manual_seed(1)
    atts = [torch.softmax(torch.randn(2, 3, 10, 10, generator=g), -1) for _ in range(5)]
    grads = [torch.randn(2, 3, 10, 10, generator=g) for _ in range(5)]
    torch.testing.assert_close(cls_rollout(atts), attention_rollout(atts)[:, 0])
    torch.testing.assert_close(cls_gradient_rollout(atts, grads), gradient_weighted_rollout(atts, grads)[:, 0])
    # large gradients: the unnormalised product grows by orders of magnitude, the two still agree
    big = [100 * g_ for g_ in grads]
    torch.testing.assert_close(cls_gradient_rollout(atts, big), gradient_weighted_rollout(atts, big)[:, 0])
    torch.testing.assert_close(cls_rollout(_two_layers())[0], torch.tensor([0.5, 0.375, 0.125]))
