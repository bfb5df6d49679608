"""Backbones (a from-scratch ViT with timm's parameter names), heads and pretrained loading."""

from melanoma.models.vit import VisionTransformer, vit_base, vit_small, vit_tiny

BACKBONES = {"vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base}


def build_backbone(name: str, **kw) -> VisionTransformer:
    """Build a DeiT-configured ViT by preset name; keyword arguments override the preset, and a
    None argument keeps the preset's value (how conf/model/vit.yaml leaves the DeiT dims here)."""
    try:
        factory = BACKBONES[name]
    except KeyError:
        raise ValueError(
            f"unknown backbone {name!r}; expected one of {sorted(BACKBONES)}"
        ) from None
    return factory(**{k: v for k, v in kw.items() if v is not None})


__all__ = ["BACKBONES", "VisionTransformer", "build_backbone", "vit_base", "vit_small", "vit_tiny"]
