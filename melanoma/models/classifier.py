"""Backbone + per-dataset heads, and loading it back from a checkpoint alone.

The training module keeps this as ``self.model``, so Lightning state-dict keys are
``model.backbone.*`` and ``model.heads.<dataset>.*``. What the weights mean (backbone preset,
head specs, preprocessing, calibration, training data) is the checkpoint contract of
``melanoma.models.checkpoint``; ``from_checkpoint`` rebuilds the network from it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from melanoma.models import build_backbone
from melanoma.models.checkpoint import Checkpoint, CheckpointError, CheckpointMeta
from melanoma.models.heads import DatasetHeads
from melanoma.models.pretrained import state_dict_mismatch
from melanoma.models.timm_backbone import TimmBackbone
from melanoma.models.vit import VisionTransformer

__all__ = ["CheckpointError", "Classifier"]


class Classifier(nn.Module):
    def __init__(self, backbone: VisionTransformer | TimmBackbone, heads: DatasetHeads):
        super().__init__()
        self.backbone = backbone
        self.heads = heads

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Class-token features after the final norm, (B, D)."""
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)

    def _head(self, name: str) -> nn.Module:
        if name not in self.heads:
            raise KeyError(f"no head named {name!r}; this model has heads {list(self.heads)}")
        return self.heads[name]

    def forward(
        self, x: torch.Tensor, head: str, return_attention: bool = False, frozen_prefix: int = 0,
        metadata: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits of ``head``; ``frozen_prefix`` backbone stages run without autograd (training
        with frozen layers, see ``VisionTransformer.frozen_prefix``). ``metadata``: the encoded
        patient metadata for a fusion head (None: all missing); a plain head refuses it."""
        classifier = self._head(head)
        if getattr(classifier, "takes_metadata", False):
            def classify(f):
                return classifier(f, metadata)
        elif metadata is not None:
            raise ValueError(f"head {head!r} was trained on images alone (no model.fusion): it takes no metadata")
        else:
            classify = classifier
        if return_attention:
            tokens, attentions = self.backbone.forward_features(x, return_attention=True)
            return classify(self.backbone.forward_head(tokens, pre_logits=True)), attentions
        tokens = self.backbone.forward_features(x, frozen_prefix=frozen_prefix)
        return classify(self.backbone.forward_head(tokens, pre_logits=True))

    def metadata_schema(self, head: str) -> dict | None:
        """The metadata schema record of ``head`` (melanoma.metadata), or None for an image-only head."""
        return dict(self._head(head).metadata) if getattr(self._head(head), "takes_metadata", False) else None

    @classmethod
    def from_meta(cls, meta: CheckpointMeta) -> Classifier:
        """An untrained network of the shape the metadata describes."""
        return cls(build_backbone(meta.backbone, family=meta.backbone_family, **meta.backbone_kwargs), DatasetHeads.from_specs(meta.head_specs()))

    @classmethod
    def from_checkpoint(cls, path: str | Path | Checkpoint, map_location="cpu") -> tuple[Classifier, CheckpointMeta]:
        """Rebuild the model from a checkpoint file or an already read ``Checkpoint`` (weights
        loaded strictly), in eval mode."""
        checkpoint = Checkpoint.of(path, map_location=map_location)
        state, meta, path = checkpoint.state, checkpoint.meta, checkpoint.path
        model = cls.from_meta(meta)
        problems = state_dict_mismatch(model.state_dict(), state)
        if problems:
            raise CheckpointError(
                f"{path}: its weights do not match the model its metadata describes (backbone "
                f"{meta.backbone_family} {meta.backbone} {meta.backbone_kwargs}, heads {list(meta.heads)}): {problems}"
            )
        model.load_state_dict(state, strict=True)
        if isinstance(map_location, (str, torch.device)):
            model.to(map_location)
        return model.eval(), meta
