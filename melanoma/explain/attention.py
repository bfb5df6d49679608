"""Where did the Vision Transformer look? Three answers, all as arrays over the patch grid.

- last-layer CLS attention: the class token's attention to each patch in the final block, per
  head and averaged over heads. Cheap, but ignores everything the earlier layers mixed in.
- attention rollout (Abnar & Zuidema 2020): heads averaged, the identity added for the residual
  connection, rows renormalised, and the matrices multiplied through the layers, so the class
  token's row says how much of each input patch reaches it. Every row of the result sums to 1.
- gradient-weighted rollout, the rule of Chefer et al. 2021 ("Generic attention-model
  explainability for interpreting bi-modal and encoder-decoder transformers", eqs. 5-6):
  R starts as the identity; for each layer in forward order
      A_bar = mean over heads of (dlogit_t/dA ⊙ A)⁺,   R <- R + A_bar · R,
  where t is the explained class and ⁺ clamps negative values to 0. Nothing is renormalised, so
  the map keeps the gradients' scale (R - I grows with them) and is class-specific, where plain
  rollout is not. Its rows do not sum to 1: read a map's shape, not its absolute values
  (the PNG overlays min-max normalise, mass_inside divides by the map's total).

Every function takes the per-layer attention list that VisionTransformer.forward(x,
return_attention=True) returns: tensors (B, heads, N, N) with N = prefix tokens + patches.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from melanoma.conventions import ATTENTION_MAP_METHODS as METHODS


def _check(attentions: Sequence[torch.Tensor]) -> None:
    if not attentions:
        raise ValueError("expected a non-empty list of per-layer attentions (B, heads, N, N)")
    for i, a in enumerate(attentions):
        if a.ndim != 4 or a.shape[-1] != a.shape[-2]:
            raise ValueError(f"attention of layer {i} must be (B, heads, N, N), got {tuple(a.shape)}")


def _to_grid(cls_row: torch.Tensor, grid_size: tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
    """(..., N) attention of the class token -> (..., h, w) over the patches."""
    patches = cls_row[..., num_prefix_tokens:]
    h, w = grid_size
    if patches.shape[-1] != h * w:
        raise ValueError(
            f"{patches.shape[-1]} patch tokens after {num_prefix_tokens} prefix token(s) do not fill "
            f"a {h}x{w} grid; pass the model's grid_size and num_prefix_tokens"
        )
    return patches.reshape(*patches.shape[:-1], h, w)


def last_layer_cls_attention(
    attentions: Sequence[torch.Tensor], grid_size: tuple[int, int], num_prefix_tokens: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per head (B, heads, h, w), mean over heads (B, h, w)) of the final block's class-token row."""
    _check(attentions)
    per_head = _to_grid(attentions[-1][:, :, 0, :], grid_size, num_prefix_tokens)
    return per_head, per_head.mean(dim=1)


def _roll_out(layer_mats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Add identity, renormalise rows, and multiply layer matrices (B, N, N) from first to last."""
    joint = None
    for a in layer_mats:
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a + eye
        a = a / a.sum(dim=-1, keepdim=True)
        joint = a if joint is None else a @ joint
    return joint


def _roll_out_cls_row(layer_mats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Row 0 of _roll_out(layer_mats), (B, N), without forming any N x N product.

    Row 0 of A_L ... A_1 is e0^T A_L ... A_1: vector-matrix products from the last layer down,
    O(N^2) per layer instead of O(N^3). With A = D^-1 (M + I), D = diag(row sums of M + I),
    r A = (r / d) M + r / d, so the renormalised matrix is never built either."""
    row = None
    for m in reversed(layer_mats):
        if row is None:
            row = torch.zeros(m.shape[0], m.shape[-1], dtype=m.dtype, device=m.device)
            row[:, 0] = 1.0
        scaled = row / (m.sum(dim=-1) + 1.0)
        row = torch.bmm(scaled.unsqueeze(1), m).squeeze(1) + scaled
    return row


def _relevance_layers(attentions: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Chefer et al.'s per-layer A_bar = mean over heads of (grad ⊙ attn)⁺, (B, N, N) each."""
    _check(attentions)
    if len(gradients) != len(attentions):
        raise ValueError(
            f"{len(attentions)} attention layers but {len(gradients)} gradients; pass one gradient per "
            f"attention layer (torch.autograd.grad(score, attentions))"
        )
    for i, (a, g) in enumerate(zip(attentions, gradients)):
        if g.shape != a.shape:
            raise ValueError(
                f"gradient of layer {i} has shape {tuple(g.shape)}, its attention {tuple(a.shape)}; "
                f"pass the gradient of the score with respect to that attention tensor"
            )
    return [(g.detach().float() * a.detach().float()).clamp(min=0).mean(dim=1) for a, g in zip(attentions, gradients)]


def _accumulate(layer_mats: Sequence[torch.Tensor]) -> torch.Tensor:
    """R = (I + A_L) ... (I + A_1), (B, N, N): R <- R + A R from the first layer to the last,
    with no renormalisation (Chefer et al. 2021)."""
    joint = None
    for a in layer_mats:
        if joint is None:
            joint = a + torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        else:
            joint = joint + a @ joint
    return joint


def _accumulate_cls_row(layer_mats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Row 0 of _accumulate(layer_mats), (B, N), without forming any N x N product.

    Row 0 of (I + A_L) ... (I + A_1) is e0^T (I + A_L) ... (I + A_1), computed left to right:
    r <- r + r A, from the last layer down, O(N^2) per layer instead of O(N^3)."""
    row = None
    for m in reversed(layer_mats):
        if row is None:
            row = torch.zeros(m.shape[0], m.shape[-1], dtype=m.dtype, device=m.device)
            row[:, 0] = 1.0
        row = row + torch.bmm(row.unsqueeze(1), m).squeeze(1)
    return row


def cls_rollout(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """The class token's row of attention_rollout, (B, N), at a fraction of its cost."""
    _check(attentions)
    with torch.no_grad():
        return _roll_out_cls_row([a.detach().float().mean(dim=1) for a in attentions])


def cls_gradient_rollout(attentions: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor]) -> torch.Tensor:
    """The class token's row of gradient_weighted_rollout, (B, N), at a fraction of its cost."""
    with torch.no_grad():
        return _accumulate_cls_row(_relevance_layers(attentions, gradients))


def attention_rollout(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Joint attention (B, N, N) from input tokens (columns) to output tokens (rows); every row
    sums to 1."""
    _check(attentions)
    with torch.no_grad():
        return _roll_out([a.detach().float().mean(dim=1) for a in attentions])


def gradient_weighted_rollout(
    attentions: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Relevance R (B, N, N) of input tokens (columns) for output tokens (rows), Chefer et al. 2021:
    R = I, then per layer in forward order R <- R + A_bar R with A_bar = mean over heads of
    (grad ⊙ attn)⁺. Not renormalised: rows do not sum to 1, and R - I scales with the gradients.
    `gradients[i]` is d(explained logit)/d(attentions[i]), same shape."""
    with torch.no_grad():
        return _accumulate(_relevance_layers(attentions, gradients))


def cls_map(joint: torch.Tensor, grid_size: tuple[int, int], num_prefix_tokens: int = 1) -> torch.Tensor:
    """The class token's row of a joint (B, N, N) matrix as a (B, h, w) map over patches."""
    return _to_grid(joint[:, 0, :], grid_size, num_prefix_tokens)


@dataclass
class AttentionMaps:
    """Maps over the patch grid for one batch, as NumPy arrays (float32)."""

    logits: np.ndarray  # (B, C)
    target: np.ndarray  # (B,) class each class-specific map explains
    maps: dict[str, np.ndarray] = field(default_factory=dict)  # method -> (B, h, w)
    last_layer_heads: np.ndarray | None = None  # (B, heads, h, w)


def compute_attention_maps(
    forward: Callable[..., tuple[torch.Tensor, list[torch.Tensor]]],
    x: torch.Tensor,
    grid_size: tuple[int, int],
    *,
    num_prefix_tokens: int = 1,
    methods: Sequence[str] = ("last_layer", "rollout"),
    target: torch.Tensor | None = None,
) -> AttentionMaps:
    """Run `forward(x, return_attention=True) -> (logits, attentions)` once and derive the maps.

    `forward` is VisionTransformer.forward or a functools.partial(Classifier.forward, head=...).
    `target`: class index per image for the gradient-weighted map (default: the predicted class).
    Only "grad_rollout" needs a backward pass; the other methods run without autograd. Its map
    is not normalised (see the module docstring): compare maps by shape, not by absolute value.
    """
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown attention method(s) {sorted(unknown)}; choose from {METHODS}")
    need_grad = "grad_rollout" in methods
    with torch.set_grad_enabled(need_grad):
        if need_grad:
            # a leaf that needs grad keeps the attentions in the graph even when the model's
            # parameters are frozen (requires_grad=False) for inference
            x = x.detach().requires_grad_(True)
        logits, attentions = forward(x, return_attention=True)
    if target is None:
        target = logits.detach().argmax(dim=1)
    out = AttentionMaps(logits=logits.detach().float().cpu().numpy(), target=target.cpu().numpy())
    if "last_layer" in methods:
        heads, mean = last_layer_cls_attention([a.detach() for a in attentions], grid_size, num_prefix_tokens)
        out.last_layer_heads = heads.float().cpu().numpy()
        out.maps["last_layer"] = mean.float().cpu().numpy()
    if "rollout" in methods:
        row = cls_rollout(attentions)
        out.maps["rollout"] = _to_grid(row, grid_size, num_prefix_tokens).cpu().numpy()
    if need_grad:
        score = logits.gather(1, target.view(-1, 1).to(logits.device)).sum()  # images are independent
        # a layer the logit does not depend on (possible in toy models) has zero relevance
        grads = torch.autograd.grad(score, attentions, allow_unused=True)
        grads = [torch.zeros_like(a) if g is None else g for a, g in zip(attentions, grads)]
        row = cls_gradient_rollout(attentions, grads)
        out.maps["grad_rollout"] = _to_grid(row, grid_size, num_prefix_tokens).cpu().numpy()
    return out


def mass_inside(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Share of each map's total mass that falls inside a boolean mask of the same grid shape
    (B, h, w) -> (B,). Compare with masks.mean((1, 2)), the share a uniform map would give."""
    maps = np.clip(np.asarray(maps, dtype=np.float64), 0, None)
    masks = np.asarray(masks, dtype=np.float64)
    return (maps * masks).sum(axis=(1, 2)) / np.maximum(maps.sum(axis=(1, 2)), 1e-12)
