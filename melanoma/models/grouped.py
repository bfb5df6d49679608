"""What a wrapped third-party network (a timm model, an open_clip image tower) shares as a
backbone: named layer groups in forward order (for gradual unfreezing and layer-wise LR decay),
no explicit no-grad prefix, and frozen batch norms that keep their running statistics."""

from __future__ import annotations

from torch import nn

__all__ = ["GroupedBackbone"]


class GroupedBackbone(nn.Module):
    """Subclasses set ``name``, ``_groups`` (parameter name -> layer group), ``_layers`` (the
    groups in forward order) and ``trunk`` (the wrapped network)."""

    name: str
    trunk: nn.Module
    _groups: dict[str, str]
    _layers: list[str]

    def layer_groups(self) -> list[str]:
        """``stem``, ``block0`` ... in forward order."""
        return list(self._layers)

    def layer_of(self, name: str) -> str:
        try:
            return self._groups[name]
        except KeyError:
            raise ValueError(f"backbone parameter {name!r} is not in {self.name}'s layer groups") from None

    def frozen_prefix(self, trainable: set[str] | None) -> int:
        # No stage is run under no_grad explicitly: the input needs no gradient, so autograd
        # records nothing below the lowest trainable parameter and frozen layers already cost no
        # backward pass.
        return 0

    def train(self, mode: bool = True) -> GroupedBackbone:
        """Batch norms of wholly frozen layers stay in eval mode: a frozen layer keeps its running
        statistics as well as its weights (as Lightning's BaseFinetuning does)."""
        super().train(mode)
        if mode:
            for module in self.trunk.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    params = list(module.parameters())
                    if params and not any(p.requires_grad for p in params):
                        module.eval()
        return self
