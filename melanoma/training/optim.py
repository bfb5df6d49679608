"""Optimizer parameter groups (one per layer, split by weight decay) and the LR schedules, built
from the ``model.optimizer`` / ``model.scheduler`` configs (``_target_`` + arguments).

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
    "LayerwisePlateauLR",
    "WarmupCosine",
    "WarmupCosineLR",
    "build_optimizer",
    "build_scheduler",
    "check_scheduler_config",
    "layer_lrs",
    "optimizer_groups",
    "param_groups",
    "resolve_fused",
    "thaw_warmup_factor",
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


#: keys of ``model.optimizer`` that shape the param groups; every other key (but ``_target_`` and
#: ``_partial_``) is an argument of the optimizer class
LAYERWISE_KEYS = ("head_lr", "layer_decay", "group_lr")
#: keys of ``model.scheduler`` that are Lightning's scheduling settings, not scheduler arguments
LIGHTNING_SCHEDULER_KEYS = ("interval", "frequency", "monitor")


def _required(cfg: Mapping, key: str, where: str):
    if key not in cfg:
        raise KeyError(
            f"{where}.{key} is missing (found keys {sorted(cfg)}); the model configs define it "
            f"(conf/model/vit.yaml): compose the config with Hydra or pass the key"
        )
    return cfg[key]


def optimizer_groups(backbone: nn.Module, head: nn.Module, cfg: Mapping) -> list[dict]:
    """``param_groups`` with the rates of ``layer_lrs``, both from the ``model.optimizer`` config:
    lr, weight_decay, head_lr, layer_decay, group_lr are all required (a missing key is an error,
    never a default here that could disagree with the YAML)."""
    where = "model.optimizer"
    head_lr, decay = _required(cfg, "head_lr", where), _required(cfg, "layer_decay", where)
    lrs = layer_lrs(backbone.layer_groups(), float(_required(cfg, "lr", where)),
                    None if head_lr is None else float(head_lr), None if decay is None else float(decay),
                    _required(cfg, "group_lr", where))
    return param_groups(backbone, head, lrs, float(_required(cfg, "weight_decay", where)))


def build_optimizer(groups: list[dict], cfg: Mapping) -> torch.optim.Optimizer:
    """The ``model.optimizer`` config's class (``_target_``, e.g. torch.optim.AdamW) over
    ``groups``, with every key but the layer-wise ones as its arguments; each group keeps its own
    lr and weight decay. AdamW skips parameters whose grad is None: that is what keeps frozen
    layers (and their weight decay) untouched while they stay registered."""
    from hydra.utils import get_object

    target = _required(cfg, "_target_", "model.optimizer")
    if not target:
        raise ValueError("model.optimizer._target_ is null; expected an optimizer class such as torch.optim.AdamW")
    args = {k: v for k, v in cfg.items() if k not in LAYERWISE_KEYS and k not in ("_target_", "_partial_")}
    cls = get_object(target)
    if args.get("fused") == "auto":
        args["fused"] = resolve_fused(cls, [p for g in groups for p in g["params"]])
    return cls(groups, **args)


def resolve_fused(cls, params) -> bool | None:
    """``fused: auto``: True when every parameter is on a CUDA device and ``cls`` takes ``fused``
    (torch's AdamW, Adam, SGD...); else None, torch's own default (foreach on GPUs, the
    per-tensor loop on CPUs, where the fused kernel is no faster). With one param group per
    layer (30 for a 12-block ViT) the foreach path launches about a dozen kernels per group each
    step, the fused one a single kernel: on host-bound GPU steps that launch time is step time."""
    import inspect

    try:
        takes = "fused" in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        takes = False
    if not takes:
        raise ValueError(f"model.optimizer.fused=auto, but {cls.__name__} takes no `fused` argument; "
                         f"remove the key (~model.optimizer.fused)")
    params = list(params)
    return True if params and all(p.device.type == "cuda" for p in params) else None


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


class WarmupCosineLR(torch.optim.lr_scheduler.LambdaLR):
    """Linear warmup over ``warmup_epochs`` (fractional allowed), then cosine decay to
    ``min_lr_ratio`` of each group's rate, stepped once per optimizer step (``interval: step``).
    Every group follows the same multiplier, frozen ones included, so a layer unfrozen later joins
    at the rate the schedule has reached. ``total_steps``/``max_epochs`` come from the trainer."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_epochs: float, min_lr_ratio: float,
                 total_steps: int, max_epochs: int | None):
        epochs = max(int(max_epochs or 1), 1)
        warmup = int(round(float(warmup_epochs) * total_steps / epochs))
        fn = WarmupCosine(warmup, total_steps, float(min_lr_ratio))
        super().__init__(optimizer, [fn] * len(optimizer.param_groups))


class LayerwisePlateauLR(torch.optim.lr_scheduler.ReduceLROnPlateau):
    """ReduceLROnPlateau that keeps the per-layer recipe: a cut multiplies one shared ``scale`` and
    every group's rate is its configured rate times ``scale``, so the ratios between layers never
    change. The floor is ``min_scale`` (a share of the configured rates, not an absolute lr: an
    absolute floor or torch's ``eps`` stops cutting the small groups while the large ones keep
    falling). ``mode``, ``patience``, ``threshold``, ``threshold_mode`` and ``cooldown`` are torch's.

    With ``hold_while_frozen`` there is no cut while ``set_thawing(True)`` says stages are still to
    thaw (``GradualUnfreezing`` says so at every epoch start; it alone knows the stages): the best
    value is still tracked, bad epochs are not counted, so patience starts when the last stage
    trains. Rates are never read back from the optimizer (a thawing layer's warmup lowers them
    between steps), only written."""

    def __init__(self, optimizer: torch.optim.Optimizer, mode: str = "min", factor: float = 0.1,
                 patience: int = 10, threshold: float = 1e-4, threshold_mode: str = "rel",
                 cooldown: int = 0, min_scale: float = 0.0, hold_while_frozen: bool = True):
        if not 0.0 < float(factor) < 1.0:
            raise ValueError(f"LayerwisePlateauLR: factor must be in (0, 1); got {factor} "
                             f"(model.scheduler.factor, e.g. 0.1)")
        if not 0.0 <= float(min_scale) <= 1.0:
            raise ValueError(f"LayerwisePlateauLR: min_scale is a share of the configured rates, in "
                             f"[0, 1]; got {min_scale} (model.scheduler.min_scale, e.g. 1e-3)")
        super().__init__(optimizer, mode=mode, factor=factor, patience=patience, threshold=threshold,
                         threshold_mode=threshold_mode, cooldown=cooldown, min_lr=0.0, eps=0.0)
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.scale = 1.0
        self.min_scale = float(min_scale)
        self.hold_while_frozen = bool(hold_while_frozen)
        self.thawing = False
        self._last_lr = self.scheduled_lrs()

    def scheduled_lrs(self) -> list[float]:
        return [base * self.scale for base in self.base_lrs]

    def set_thawing(self, thawing: bool) -> None:
        """Whether some unfreezing stage is still frozen (told by ``GradualUnfreezing``)."""
        self.thawing = bool(thawing)

    def step(self, metrics, epoch=None) -> None:  # type: ignore[override]
        if self.hold_while_frozen and self.thawing:
            current = float(metrics)
            self.last_epoch += 1
            if self._is_better(current, self.best):
                self.best = current
            self.num_bad_epochs = 0
        else:
            super().step(metrics)
        self._last_lr = self.scheduled_lrs()

    def _reduce_lr(self, epoch) -> None:
        self.scale = max(self.scale * self.factor, self.min_scale)
        for group, lr in zip(self.optimizer.param_groups, self.scheduled_lrs()):
            group["lr"] = lr
        log.info("LayerwisePlateauLR: every group's rate cut to %.3g of its configured value", self.scale)


def thaw_warmup_factor(step: int, thaw_step: int, warmup_steps: int) -> float:
    """Share of its scheduled rate a layer gets at optimizer step ``step``: 0 before it thaws at
    ``thaw_step``, then a linear rise over ``warmup_steps`` steps, ``(s + 1) / (warmup_steps + 1)``
    after ``s`` steps, then 1. A layer trained from step 0 gets 1 (the main schedule warms it up).
    A pure function of the step, so resuming anywhere gives the same rate."""
    if step < thaw_step:
        return 0.0
    since = step - thaw_step
    if thaw_step <= 0 or warmup_steps <= 0 or since >= warmup_steps:
        return 1.0
    return (since + 1) / (warmup_steps + 1)


def check_scheduler_config(cfg: Mapping) -> None:
    """Refuse the scheduler spellings that are gone, saying what to write now."""
    name = cfg.get("name")
    if name is not None:
        raise ValueError(
            f"model.scheduler.name={name} is no longer read: the scheduler is a config group now. "
            f"Write model/scheduler={name} on the command line (cosine | plateau | none), or "
            f"`- override /model/scheduler: {name}` in an experiment's defaults list; its settings "
            f"stay model.scheduler.* (e.g. model.scheduler.patience=5)."
        )
    _required(cfg, "_target_", "model.scheduler")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Mapping, total_steps: int,
                    max_epochs: int | None) -> dict | None:
    """A Lightning ``lr_scheduler`` config dict from ``model.scheduler``, or None for a constant
    rate (``_target_: null``). The scheduler class gets every key but Lightning's scheduling keys
    (interval, frequency, monitor), plus the run lengths (``total_steps``, ``max_epochs``) when its
    ``__init__`` names them."""
    import inspect

    from hydra.utils import get_object

    cfg = dict(cfg)
    check_scheduler_config(cfg)
    if cfg["_target_"] is None:
        return None
    cls = get_object(cfg["_target_"])
    params = inspect.signature(cls).parameters
    run_lengths = {"total_steps": int(total_steps), "max_epochs": max_epochs}
    args = {k: v for k, v in cfg.items()
            if k not in LIGHTNING_SCHEDULER_KEYS and k not in ("_target_", "_partial_", "name")}
    args.update({k: v for k, v in run_lengths.items() if k in params})
    sched = cls(optimizer, **args)
    out = {"scheduler": sched, "name": "lr"}
    for key in LIGHTNING_SCHEDULER_KEYS:
        value = _required(cfg, key, "model.scheduler")
        if value is not None:
            out[key] = value
    if "monitor" in out:
        out["strict"] = True
    return out


def trainable_parameter_count(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in params if p.requires_grad)
