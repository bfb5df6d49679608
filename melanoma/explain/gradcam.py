"""Where did a CNN look? Grad-CAM (Selvaraju et al. 2017) through the maintained `grad-cam`
package (pytorch-grad-cam): the last feature stage's activations weighted by the explained
logit's mean gradient per channel, summed, clamped at 0, upsampled to the input and scaled to
[0, 1] per image. Class-specific (the predicted class unless a target is given).

Attention-based maps (melanoma.explain.attention) need attention weights, which CNNs do not have;
``methods_for`` says which maps a backbone offers.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from melanoma.conventions import CNN_MAP_METHODS
from melanoma.explain.attention import METHODS as ATTENTION_METHODS
from melanoma.explain.attention import AttentionMaps

__all__ = ["CNN_METHODS", "GRADCAM", "check_methods", "compute_gradcam_maps", "default_method", "maps_to_draw",
           "methods_for"]

GRADCAM = CNN_MAP_METHODS[0]
CNN_METHODS = CNN_MAP_METHODS
INSTALL_HINT = 'pip install "melanoma[gradcam]" (the grad-cam package)'


def methods_for(backbone: nn.Module) -> tuple[str, ...]:
    """The maps a backbone offers: attention maps where its attention weights can be read (our
    ViT, timm ViTs), Grad-CAM otherwise (CNNs); a backbone that says itself (``map_methods``,
    None: decided here) is taken at its word."""
    own = getattr(backbone, "map_methods", None)
    if own is not None:  # a backbone that says itself (an open_clip tower without either: none)
        return tuple(own)
    return ATTENTION_METHODS if getattr(backbone, "reads_attention", False) else CNN_METHODS


def default_method(backbone: nn.Module) -> str | None:
    """The map drawn unless others are asked for; None when the backbone offers none."""
    offered = methods_for(backbone)
    if not offered:
        return None
    return "rollout" if getattr(backbone, "reads_attention", False) else offered[0]


def maps_to_draw(backbone: nn.Module, asked=None) -> tuple[str, ...]:
    """The map methods to draw: those ``asked`` (checked against the backbone's), else its
    default; refused, saying so, when the backbone offers none."""
    default = default_method(backbone)
    methods = tuple(dict.fromkeys(asked or ((default,) if default else ())))
    check_methods(backbone, methods or ("rollout",))
    return methods


def check_methods(backbone: nn.Module, methods, what: str = "this checkpoint's backbone") -> None:
    offered = methods_for(backbone)
    wrong = [m for m in methods if m not in offered]
    if wrong and not offered:
        raise ValueError(f"map method(s) {wrong} do not apply: {what} offers no map of where it looked; "
                         f"leave out --attention")
    if wrong:
        kind = "reads attention weights" if offered is ATTENTION_METHODS else "is a CNN (no attention weights)"
        raise ValueError(f"map method(s) {wrong} do not apply: {what} {kind}; choose from {list(offered)}")


class _Call(nn.Module):
    """The callable grad-cam runs (it wants a module with parameters, to read their device)."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], layer: nn.Module):
        super().__init__()
        self._forward = forward
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x).float()


def compute_gradcam_maps(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, target_layer: nn.Module,
                         target: torch.Tensor | None = None) -> AttentionMaps:
    """Grad-CAM of ``forward(x) -> logits`` at ``target_layer`` (the last feature stage):
    maps (B, H, W) at the input's size, for the predicted class unless ``target`` is given."""
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError as e:
        raise ImportError(f"Grad-CAM maps need the grad-cam package ({e}); install it: {INSTALL_HINT}") from e
    with torch.enable_grad():
        # a leaf that needs grad keeps the activations in the graph even when the parameters are frozen
        x = x.detach().requires_grad_(True)
        with GradCAM(model=_Call(forward, target_layer), target_layers=[target_layer]) as cam:
            targets = None if target is None else [ClassifierOutputTarget(int(t)) for t in target]
            maps = cam(input_tensor=x, targets=targets)  # None: the predicted class
            logits = cam.outputs.detach()
    if target is None:
        target = logits.argmax(dim=1)
    return AttentionMaps(logits=logits.float().cpu().numpy(), target=target.cpu().numpy(),
                         maps={GRADCAM: np.asarray(maps, dtype=np.float32)})
