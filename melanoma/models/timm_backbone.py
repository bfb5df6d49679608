"""Any timm model as a backbone, adapted to the interface our ViT offers the rest of the house.

The training module, the optimiser groups, gradual unfreezing and the checkpoint contract talk to
a backbone through: ``layer_groups()`` (layers in forward order), ``layer_of(param name)``,
``frozen_prefix(trainable)``, ``forward_features`` / ``forward_head(..., pre_logits=True)`` and
``embed_dim``. Our ViT defines its layers itself; here they come from timm's own
``group_matcher`` (fine grained: one group per block), named ``stem``, ``block0`` ...
``block{n-1}``, so layer-wise LR decay (``layer_lrs``) and the unfreezing order (top block
first, the stem last) read them exactly as they read the ViT's.

The timm model is built with ``num_classes=0`` (its own classifier removed: our heads are per
dataset) and kept as ``self.net``: the state dict is timm's with a ``net.`` prefix, so timm
weights (a hub name or a local file) load strictly after their classifier is dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from melanoma.models.grouped import GroupedBackbone

log = logging.getLogger(__name__)

__all__ = ["TimmBackbone", "TimmGroupingError", "timm_classifier_keys", "timm_data_config"]

#: the first timm group: stem (patch embedding, position embedding, class token / first convs)
STEM = "stem"


class TimmGroupingError(ValueError):
    """A timm model without the grouping that unfreezing and layer-wise rates need."""


def timm_data_config(name: str) -> dict:
    """timm's pretrained config for ``name`` (an architecture, ``arch.tag``, or hf-hub name's
    architecture): mean, std, interpolation and input size, read without any network access."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name.split("hf-hub:")[-1], allow_unregistered=True)
    if cfg is None:
        raise ValueError(f"timm knows no pretrained config for {name!r}; set model.mean and model.std")
    return {"mean": list(cfg.mean), "std": list(cfg.std), "interpolation": cfg.interpolation,
            "input_size": list(cfg.input_size)}


def timm_classifier_keys(net: nn.Module) -> tuple[str, ...]:
    """Prefixes of the ImageNet classifier in a timm state dict (dropped when loading weights)."""
    cfg = getattr(net, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier") or "head"
    names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    return tuple(f"{n}." for n in names)


class TimmBackbone(GroupedBackbone):
    """A timm model without its classifier; features are its pooled pre-logits (B, num_features)."""

    family = "timm"

    def __init__(self, name: str, img_size: int | None = None, **kwargs):
        super().__init__()
        import timm

        if not timm.is_model(name):
            close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:8]
            raise ValueError(f"model.backbone.name={name!r} is not a timm model (timm {timm.__version__}); "
                             f"similar names: {close or 'none'}. `timm.list_models('*resnet*')` lists them.")
        self.name = name
        self.net = _create(name, img_size, kwargs)
        self.embed_dim = self.num_features = int(self.net.num_features)
        self.img_size = img_size
        self._groups = _layer_map(self.net, name)
        self._layers = list(dict.fromkeys(self._groups.values()))

    @property
    def trunk(self) -> nn.Module:
        return self.net

    # --- where the model looked (melanoma.explain) -----------------------------------------------

    def _attention_modules(self) -> list[nn.Module]:
        """timm ViT attention modules (with the explicit softmax path), in forward order."""
        blocks = getattr(self.net, "blocks", None)
        if blocks is None or not hasattr(self.net, "patch_embed"):
            return []
        found = [getattr(b, "attn", None) for b in blocks]
        ok = all(m is not None and hasattr(m, "fused_attn") and hasattr(m, "attn_drop") for m in found)
        return found if ok and found else []

    @property
    def reads_attention(self) -> bool:
        """Whether attention maps (rollout...) can be read: timm ViTs yes, CNNs no (Grad-CAM)."""
        return bool(self._attention_modules())

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.net.patch_embed.grid_size)

    @property
    def num_prefix_tokens(self) -> int:
        return int(getattr(self.net, "num_prefix_tokens", 1))

    def gradcam_layer(self) -> nn.Module:
        """The last feature stage (timm's feature_info), whose activations Grad-CAM weighs."""
        info = getattr(self.net, "feature_info", None)
        if not info:
            raise ValueError(f"timm's {self.name} lists no feature stages (feature_info): no layer for Grad-CAM")
        return self.net.get_submodule(info[-1]["module"])

    # --- forward ---------------------------------------------------------------------------------

    def forward_features(self, x: torch.Tensor, return_attention: bool = False, frozen_prefix: int = 0):
        """timm's features; with ``return_attention`` (timm ViTs) also each block's attention
        weights (B, heads, N, N), read from the explicit softmax path for this one call."""
        if not return_attention:
            return self.net.forward_features(x)
        modules = self._attention_modules()
        if not modules:
            raise ValueError(f"timm's {self.name} has no attention weights to read (a CNN): use Grad-CAM "
                             f"(--attention-method gradcam)")
        attentions: list[torch.Tensor] = []
        handles = [m.attn_drop.register_forward_hook(lambda _m, _i, out: attentions.append(out)) for m in modules]
        fused = [m.fused_attn for m in modules]
        try:
            for m in modules:
                m.fused_attn = False
            tokens = self.net.forward_features(x)
        finally:
            for m, f in zip(modules, fused):
                m.fused_attn = f
            for h in handles:
                h.remove()
        return tokens, attentions

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.net.forward_head(features, pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x), pre_logits=True)

    # --- weights from elsewhere ------------------------------------------------------------------

    def classifier_prefixes(self) -> tuple[str, ...]:
        return timm_classifier_keys(self.net)

    def load_timm_state_dict(self, state: Mapping[str, torch.Tensor], where: str) -> None:
        """Load a timm state dict (keys without ``net.``) strictly but for the classifier."""
        from melanoma.models.pretrained import PretrainedWeightsError, state_dict_mismatch

        dropped = self.classifier_prefixes()
        state = {k: v for k, v in state.items() if not k.startswith(dropped)}
        if "pos_embed" in state and hasattr(self.net, "pos_embed") and state["pos_embed"].shape != self.net.pos_embed.shape:
            from timm.layers import resample_abs_pos_embed

            prefix = 0 if getattr(self.net, "no_embed_class", False) else self.net.num_prefix_tokens
            state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], self.net.patch_embed.grid_size,
                                                        num_prefix_tokens=prefix)
        expected = {k: v for k, v in self.net.state_dict().items() if not k.startswith(dropped)}
        problems = state_dict_mismatch(expected, state)
        if problems:
            raise PretrainedWeightsError(
                f"weights from {where} do not fit timm's {self.name} (kwargs as configured): {problems}. "
                f"Use the architecture the weights were trained as (model.backbone.name=...).")
        self.net.load_state_dict(state, strict=False)
        log.info("loaded all %d backbone tensors of %s from %s (classifier %s not loaded)",
                 len(state), self.name, where, list(dropped))


def _create(name: str, img_size: int | None, kwargs: dict) -> nn.Module:
    """timm.create_model without the classifier; ``img_size`` goes to models that take it
    (ViTs and other fixed-grid models); CNNs take any input size and refuse the argument."""
    import timm

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if img_size is not None:
        try:
            return timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size, **kwargs)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
            log.debug("%s takes no img_size (any input size works): built without it", name)
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


def _layer_map(net: nn.Module, name: str) -> dict[str, str]:
    """Parameter name (with ``net.``) -> layer group, from timm's fine-grained group_matcher."""
    from timm.models._manipulate import group_with_matcher

    matcher = getattr(net, "group_matcher", None)
    if matcher is None:
        raise TimmGroupingError(
            f"timm's {name} ({type(net).__name__}) defines no group_matcher, so its layers cannot be "
            f"grouped for gradual unfreezing and layer-wise learning rates; choose a timm model that "
            f"has one (ResNets, EfficientNets, ConvNeXts, ViTs do)")
    try:
        grouping = group_with_matcher(net.named_parameters(), matcher(coarse=False), return_values=False)
    except NotImplementedError as e:
        raise TimmGroupingError(f"timm's {name} does not implement group_matcher ({e}); choose a timm model "
                                f"that does (ResNets, EfficientNets, ConvNeXts, ViTs)") from e
    out = {}
    for i, names in enumerate(grouping.values()):
        layer = STEM if i == 0 else f"block{i - 1}"
        out.update({f"net.{n}": layer for n in names})
    return out
