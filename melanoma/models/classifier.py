"""Backbone + per-dataset heads, and loading it back from a Lightning checkpoint alone.

The training module keeps this as ``self.model``, so Lightning state-dict keys are
``model.backbone.*`` and ``model.heads.<dataset>.*``; its ``on_save_checkpoint`` stores the META
(``ckpt["melanoma"]``: backbone name/kwargs, head specs, image size, mean/std, calibration, ...)
that ``from_checkpoint`` needs to rebuild the network without any config file or dataset.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from melanoma.models import build_backbone
from melanoma.models.heads import DatasetHeads
from melanoma.models.pretrained import state_dict_mismatch
from melanoma.models.vit import VisionTransformer

__all__ = ["CheckpointError", "Classifier", "checkpoint_meta"]

STATE_PREFIX = "model."
META_KEY = "melanoma"


def checkpoint_meta(
    model: "Classifier",
    backbone: str,
    backbone_kwargs: dict,
    *,
    image_size: int,
    mean,
    std,
    active_head: str | None = None,
    calibration: dict | None = None,
    operating_point: dict | None = None,
    config: dict | None = None,
) -> dict:
    """The ckpt[META_KEY] entry that ``Classifier.from_checkpoint`` reads back: everything needed
    to rebuild and use the model without a config file or dataset."""
    specs = model.heads.specs()
    return {
        "backbone": {"name": backbone, "kwargs": dict(backbone_kwargs)},
        "heads": specs,
        "active_head": active_head or next(iter(specs)),
        "image_size": int(image_size),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "calibration": dict(calibration or {}),
        "operating_point": dict(operating_point or {}),
        "config": dict(config or {}),
    }


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be turned back into a Classifier."""


class Classifier(nn.Module):
    def __init__(self, backbone: VisionTransformer, heads: DatasetHeads):
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
        self, x: torch.Tensor, head: str, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        classifier = self._head(head)
        if return_attention:
            tokens, attentions = self.backbone.forward_features(x, return_attention=True)
            return classifier(self.backbone.forward_head(tokens, pre_logits=True)), attentions
        return classifier(self.features(x))

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location="cpu") -> tuple[Classifier, dict]:
        """Rebuild the model from a Lightning ``.ckpt`` (weights loaded strictly), in eval mode.

        Returns ``(classifier, meta)`` where ``meta`` is ``ckpt["melanoma"]``.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"{path} holds objects that torch.load(weights_only=True) refuses to unpickle "
                f"({e}). Checkpoints must contain only tensors and plain Python values; "
                f"re-save it with plain dicts (e.g. OmegaConf.to_container for configs)."
            ) from e
        if not isinstance(ckpt, dict) or META_KEY not in ckpt or "state_dict" not in ckpt:
            found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
            raise CheckpointError(
                f"{path} is not a melanoma training checkpoint: expected a dict with "
                f"'state_dict' and '{META_KEY}' (written by the training module's "
                f"on_save_checkpoint), found {found}"
            )
        meta = ckpt[META_KEY]
        for key in ("backbone", "heads"):
            if key not in meta:
                raise CheckpointError(f"{path}: META ckpt['{META_KEY}'] lacks '{key}'; has {sorted(meta)}")
        backbone = build_backbone(meta["backbone"]["name"], **meta["backbone"].get("kwargs", {}))
        model = cls(backbone, DatasetHeads.from_specs(meta["heads"]))
        state = {k[len(STATE_PREFIX):]: v for k, v in ckpt["state_dict"].items() if k.startswith(STATE_PREFIX)}
        problems = state_dict_mismatch(model.state_dict(), state)
        if problems:
            raise CheckpointError(
                f"{path}: weights under '{STATE_PREFIX}' do not match the model described by its "
                f"META (backbone {meta['backbone']}, heads {list(meta['heads'])}): {problems}"
            )
        model.load_state_dict(state, strict=True)
        if isinstance(map_location, (str, torch.device)):
            model.to(map_location)
        return model.eval(), meta

