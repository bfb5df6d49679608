"""Backbones (a from-scratch ViT with timm's parameter names, any timm model, or an open_clip
image tower), heads and pretrained loading."""

from melanoma.models.vit import VisionTransformer, vit_base, vit_small, vit_tiny

BACKBONES = {"vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base}

#: backbone families: our DeiT-configured ViT (model=vit_tiny|vit_small|vit_base) and timm models
#: (model=timm model.backbone.name=<any timm model>)
FAMILY_VIT = "vit"
FAMILY_TIMM = "timm"
#: (model=open_clip model.backbone.name=<open_clip architecture> model.pretrained=<file or folder>)
FAMILY_OPEN_CLIP = "open_clip"
FAMILIES = (FAMILY_VIT, FAMILY_TIMM, FAMILY_OPEN_CLIP)


def build_backbone(name: str, family: str = FAMILY_VIT, **kw):
    """Build a backbone. Family ``vit``: a DeiT-configured ViT by preset name; keyword arguments
    override the preset, and a None argument keeps the preset's value (how conf/model/vit.yaml
    leaves the DeiT dims here). Family ``timm``: ``timm.create_model(name, num_classes=0, **kw)``
    (``img_size`` only where the model takes it). Family ``open_clip``: the image tower of the
    open_clip model config ``kw["model_cfg"]`` (melanoma.models.open_clip_backbone)."""
    if family == FAMILY_OPEN_CLIP:
        from melanoma.models.open_clip_backbone import OpenClipBackbone

        return OpenClipBackbone(name, **kw)
    if family == FAMILY_TIMM:
        from melanoma.models.timm_backbone import TimmBackbone

        return TimmBackbone(name, **kw)
    if family != FAMILY_VIT:
        raise ValueError(f"unknown backbone family {family!r}; expected one of {FAMILIES}")
    try:
        factory = BACKBONES[name]
    except KeyError:
        raise ValueError(
            f"unknown backbone {name!r}; expected one of {sorted(BACKBONES)} (any timm model: "
            f"model=timm model.backbone.name={name})"
        ) from None
    return factory(**{k: v for k, v in kw.items() if v is not None})


__all__ = ["BACKBONES", "FAMILIES", "FAMILY_OPEN_CLIP", "FAMILY_TIMM", "FAMILY_VIT", "VisionTransformer", "build_backbone",
           "vit_base", "vit_small", "vit_tiny"]
