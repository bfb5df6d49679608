"""AdamW parameter groups (one per layer, split by weight decay) and the LR schedules.

Every backbone parameter belongs to one *layer*, as the backbone itself defines them
(``VisionTransformer.layer_groups`` / ``layer_of``: ``patch_embed``, ``pos_cls``, ``block0`` ...
``block{depth-1}``, ``norm``); the active head is ``head``. The optimizer gets one group per layer
(two when the layer has both decayed and non-decayed parameters), each tagged with ``layer``, so
the gradual-unfreezing callback can switch whole layers on and off while every parameter stays
registered with the optimizer from the start.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "WarmupCosine",
    "build_optimizer",
    "build_scheduler",
    "layer_lrs",
    "param_groups",
]

# Parameters named like this are never weight-decayed: decaying a norm's gain, a bias or an
# embedding table pulls it towards zero for no regularising benefit.
NO_DECAY_NAMES = ("pos_embed", "cls_token")


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES or name.endswith(".bias")


def layer_lrs(layers: list[str], lr: float, head_lr: float | None = None, layer_decay: float | None = None,
              group_lr: Mapping[str, float | None] | None = None) -> dict[str, float]:
    """Learning rate per layer; ``layers`` are the backbone's layer groups in forward order.

    ``lr`` is the backbone rate, ``head_lr`` the head's (default ``lr``). With ``layer_decay``
    the rate shrinks geometrically towards the input: norm gets ``lr``, block i gets
    ``lr * decay ** (depth - i)`` and the embeddings ``lr * decay ** (depth + 1)``. ``group_lr``
    overrides single layers (``block11``) or kinds (``head``, ``norm``, ``blocks``, ``pos_cls``,
    ``patch_embed``); a null entry means "not overridden"; a specific layer wins over its kind.
    """
    depth = sum(layer.startswith("block") for layer in layers)
    group_lr = {k: v for k, v in (group_lr or {}).items() if v is not None}
    known = set(layers) | {"head", "blocks"}
    unknown = sorted(set(group_lr) - known)
    if unknown:
        raise ValueError(
            f"model.optimizer.group_lr has unknown layers {unknown}; expected some of head, norm, "
            f"blocks, block0..block{depth - 1}, pos_cls, patch_embed"
        )
    lrs: dict[str, float] = {}
    for layer in layers:
        if layer_decay is None:
            rate = lr
        else:
            # distance from the top: norm 0, block{depth-1} 1, ..., block0 depth, embeddings depth+1
            if layer == "norm":
                steps = 0
            elif layer.startswith("block"):
                steps = depth - int(layer[5:])
            else:
                steps = depth + 1
            rate = lr * layer_decay**steps
        if layer.startswith("block") and "blocks" in group_lr:
            rate = group_lr["blocks"]
        lrs[layer] = float(group_lr.get(layer, rate))
    lrs["head"] = float(group_lr.get("head", head_lr if head_lr is not None else lr))
    return lrs


def param_groups(backbone: nn.Module, head: nn.Module, lrs: Mapping[str, float],
                 weight_decay: float) -> list[dict]:
    """AdamW groups: per layer, decayed and non-decayed parameters apart; empty groups dropped.

    Groups carry ``name`` (``block11`` / ``block11.no_wd``) and ``layer`` (``block11``); the
    list runs from the head down to the patch embedding, the order layers are unfrozen in.
    """
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in backbone.named_parameters():
        buckets.setdefault((backbone.layer_of(name), _no_decay(name, p)), []).append(p)
    for name, p in head.named_parameters():
        buckets.setdefault(("head", _no_decay(name, p)), []).append(p)
    order = ["head", *reversed(backbone.layer_groups())]
    groups = []
    for layer in order:
        for no_wd in (False, True):
            params = buckets.pop((layer, no_wd), [])
            if params:
                groups.append({
                    "params": params,
                    "lr": lrs[layer],
                    "weight_decay": 0.0 if no_wd else weight_decay,
                    "name": f"{layer}.no_wd" if no_wd else layer,
                    "layer": layer,
                })
    if buckets:
        raise ValueError(f"parameters of unexpected layers were not grouped: {sorted(buckets)}")
    return groups


def build_optimizer(groups: list[dict], cfg: Mapping) -> torch.optim.Optimizer:
    """AdamW over ``groups``. AdamW skips parameters whose grad is None: that is what keeps
    frozen layers (and their weight decay) untouched while they stay registered."""
    betas = tuple(cfg.get("betas", (0.9, 0.999)))
    return torch.optim.AdamW(groups, lr=groups[0]["lr"], betas=betas, eps=float(cfg.get("eps", 1e-8)),
                             weight_decay=float(cfg.get("weight_decay", 0.0)))


class WarmupCosine:
    """LR multiplier per step: linear warmup from ~0 to 1, then cosine down to ``min_ratio``.

    A class rather than a closure so LambdaLR can store it in the checkpoint (plain numbers)."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
        self.warmup_steps = int(warmup_steps)
        self.total_steps = max(int(total_steps), 1)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Mapping | None, total_steps: int,
                    max_epochs: int | None) -> dict | None:
    """A Lightning ``lr_scheduler`` config dict, or None for a constant rate.

    cosine: per step, warmup of ``warmup_epochs`` epochs (fractional allowed). plateau:
    ReduceLROnPlateau on ``monitor`` once per epoch. Every group follows the same multiplier,
    frozen ones included, so a layer unfrozen later joins at the rate the schedule has reached.
    """
    cfg = dict(cfg or {})
    name = cfg.get("name", "none") or "none"
    if name == "none":
        return None
    if name == "cosine":
        epochs = max(int(max_epochs or 1), 1)
        warmup = int(round(float(cfg.get("warmup_epochs", 0.0)) * total_steps / epochs))
        fn = WarmupCosine(warmup, total_steps, float(cfg.get("min_lr_ratio", 0.0)))
        sched = torch.optim.lr_scheduler.LambdaLR(optimizer, [fn] * len(optimizer.param_groups))
        return {"scheduler": sched, "interval": "step", "frequency": 1, "name": "lr"}
    if name == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=cfg.get("mode", "min"), factor=float(cfg.get("factor", 0.1)),
            patience=int(cfg.get("patience", 3)),
        )
        return {"scheduler": sched, "interval": "epoch", "frequency": 1,
                "monitor": cfg.get("monitor", "val/loss"), "strict": True, "name": "lr"}
    raise ValueError(f"model.scheduler.name must be cosine, plateau or none, got {name!r}")


def trainable_parameter_count(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in params if p.requires_grad)
