"""Gradual unfreezing that stays correct under DDP and on resume, and saves compute.

Why not Lightning's ``BaseFinetuning``: it adds parameter groups to the optimizer as layers thaw,
so parameters unfrozen after DDP wrapped the model are never all-reduced (replicas silently
diverge), and a resumed run re-freezes. Here instead:

* every parameter is registered with the optimizer from the start, one group per layer
  (``melanoma.training.optim.param_groups``); a frozen layer simply never gets a gradient, and
  AdamW skips parameters whose grad is None (no update, no weight decay, no optimizer state);
* the stage is a pure function of the epoch, applied at every ``on_train_epoch_start``: a run
  resumed from any checkpoint (even mid-epoch) trains exactly the layers it trained before, with
  the optimizer state it had;
* frozen layers below the lowest trainable one run under ``torch.no_grad`` in the module's
  forward (``LesionClassifier.set_trainable_layers``), so they cost no backward pass and no
  stored activations;
* under DDP every parameter requires grad when DDP wraps the model (so it is in DDP's reducer)
  and the strategy is built with ``find_unused_parameters=True`` (``melanoma.workflows.training_run`` does that
  when this callback is used): frozen parameters are then "unused" on every rank and keep grad
  None, unfrozen ones are all-reduced. ``on_fit_start`` refuses a DDP strategy without it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch.optim.lr_scheduler import ReduceLROnPlateau

from melanoma.training.optim import LayerwisePlateauLR, thaw_warmup_factor

log = logging.getLogger(__name__)

__all__ = ["GradualUnfreezing", "default_unfreeze_order"]


def default_unfreeze_order(layer_groups: Sequence[str]) -> list[str]:
    """Top down, the backbone's layer groups reversed: final norm, block{depth-1} ... block0,
    pos_embed/cls_token, patch embedding."""
    return list(reversed(layer_groups))


class GradualUnfreezing(Callback):
    """Train the head alone for ``start_epoch`` epochs, then thaw one more stage every
    ``every_n_epochs`` epochs.

    Args:
        start_epoch: epochs with only the head trainable (0: the first stage thaws at once).
        every_n_epochs: epochs between two stages.
        stage_size: layers per stage when the stages come from ``order``; None: every layer of
            ``order`` in one stage (LP-FT: probe the head, then train everything).
        order: layer names in the order they thaw (default ``default_unfreeze_order``); layers
            left out never thaw. Names: norm, block0..block{depth-1}, pos_cls, patch_embed.
        stages: explicit stages (a list of lists of layer names); overrides order/stage_size.
        warmup_steps: a layer that thaws after the first epoch starts at about 0 and reaches its
            scheduled rate linearly over this many optimizer steps (0: off), on top of whatever
            scheduler runs; the rate is a function of the global step and the thaw step (its
            epoch times the optimizer steps per epoch), so resuming anywhere gives the same rates.

    Each layer's learning rate is set in the optimizer config (``model.optimizer.group_lr``).
    Before every batch this callback writes each group's effective rate: the scheduler's rate
    times ``thaw_warmup_factor`` (0 while the layer is frozen), which is what ``lr/<layer>``
    shows. It also tells a scheduler with ``set_thawing`` (``LayerwisePlateauLR``) whether
    stages are still frozen: this callback alone knows the stages.
    """

    #: layers without gradients under DDP: train.py builds the strategy with find_unused_parameters
    freezes_layers = True

    def __init__(self, start_epoch: int = 1, every_n_epochs: int = 1, stage_size: int | None = 1,
                 order: Sequence[str] | None = None, stages: Sequence[Sequence[str]] | None = None,
                 warmup_steps: int = 0):
        if start_epoch < 0 or every_n_epochs < 1 or (stage_size is not None and stage_size < 1) or warmup_steps < 0:
            raise ValueError(
                f"GradualUnfreezing needs start_epoch >= 0, every_n_epochs >= 1, stage_size >= 1 and "
                f"warmup_steps >= 0; got start_epoch={start_epoch}, every_n_epochs={every_n_epochs}, "
                f"stage_size={stage_size}, warmup_steps={warmup_steps}"
            )
        self.warmup_steps = int(warmup_steps)
        self.start_epoch = int(start_epoch)
        self.every_n_epochs = int(every_n_epochs)
        self.stage_size = None if stage_size is None else int(stage_size)
        self.order = list(order) if order is not None else None
        self.stages = [list(s) for s in stages] if stages is not None else None
        self.current_stage: int | None = None

    # --- the schedule -------------------------------------------------------------------------

    def resolve_stages(self, layer_groups: Sequence[str]) -> list[list[str]]:
        """The stages after the head-only one, each a list of layer names (``layer_groups``: the
        backbone's, in forward order)."""
        valid = set(layer_groups)
        if self.stages is not None:
            stages = self.stages
        else:
            order = self.order if self.order is not None else default_unfreeze_order(layer_groups)
            size = self.stage_size or max(len(order), 1)
            stages = [order[i:i + size] for i in range(0, len(order), size)]
        flat = [layer for stage in stages for layer in stage]
        unknown = [layer for layer in flat if layer not in valid]
        if unknown:
            raise ValueError(
                f"GradualUnfreezing: unknown layers {unknown}; the backbone has {list(layer_groups)}"
            )
        if len(flat) != len(set(flat)):
            raise ValueError(f"GradualUnfreezing: a layer appears in two stages: {stages}")
        return [list(s) for s in stages if s]

    def stage_at(self, epoch: int, num_stages: int) -> int:
        """Number of thawed stages (0 = head only) during ``epoch``; a function of the epoch
        alone, which is what makes resuming exact."""
        if epoch < self.start_epoch:
            return 0
        return min(1 + (epoch - self.start_epoch) // self.every_n_epochs, num_stages)

    def thaw_epochs(self, layer_groups: Sequence[str]) -> dict[str, int]:
        """The epoch each layer starts training in (head 0); layers that never thaw are left out."""
        stages = self.resolve_stages(layer_groups)
        epochs = {"head": 0}
        for i, stage in enumerate(stages):
            for layer in stage:
                epochs[layer] = self.start_epoch + i * self.every_n_epochs
        return epochs

    def trainable_layers(self, epoch: int, layer_groups: Sequence[str]) -> set[str]:
        return self._schedule(epoch, layer_groups)[2]

    def _schedule(self, epoch: int, layer_groups: Sequence[str]) -> tuple[list[list[str]], int, set[str]]:
        """(stages, number thawed during ``epoch``, the layers that train then)."""
        stages = self.resolve_stages(layer_groups)
        n = self.stage_at(epoch, len(stages))
        return stages, n, {"head", *(layer for stage in stages[:n] for layer in stage)}

    # --- hooks ----------------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_strategy(trainer)
        self._check_optimizer(trainer, pl_module)
        # apply at once too, so anything that runs before the first train epoch (e.g. a
        # trainable-parameter summary) sees the right stage
        self._apply(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the loop state (current_epoch) of a resumed run is restored only after on_fit_start,
        # and a run resumed mid-epoch does not call on_train_epoch_start for that epoch
        self._apply(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer, pl_module)

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stages, stage, layers = self._schedule(trainer.current_epoch, pl_module.model.backbone.layer_groups())
        pl_module.set_trainable_layers(layers)
        if stage != self.current_stage:
            newest = "head only" if stage == 0 else ", ".join(stages[stage - 1])
            rank_zero_info(
                f"GradualUnfreezing: epoch {trainer.current_epoch}: stage {stage}/{len(stages)} "
                f"(newest: {newest}); {pl_module.trainable_parameter_count():,} trainable parameters"
            )
        self.current_stage = stage
        for config in trainer.lr_scheduler_configs:
            if hasattr(config.scheduler, "set_thawing"):
                config.scheduler.set_thawing(stage < len(stages))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._set_rates(trainer, pl_module)

    def _set_rates(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Every group's effective rate for the coming optimizer step (module logs it after this)."""
        # optimizer steps per epoch: Lightning steps after every accumulate_grad_batches batches
        # and at the last batch of an epoch
        batches = trainer.num_training_batches
        if not math.isfinite(batches):
            raise ValueError(
                "GradualUnfreezing needs the number of batches per epoch to place each layer's thaw "
                "step (its warmup and its effective rate); the train dataloader has no length. Set "
                "trainer.limit_train_batches to an integer."
            )
        per_epoch = math.ceil(batches / max(trainer.accumulate_grad_batches, 1))
        thaw_epochs = self.thaw_epochs(pl_module.model.backbone.layer_groups())
        step = trainer.global_step
        for opt in trainer.optimizers:
            for group, lr in zip(opt.param_groups, self._scheduled_lrs(trainer, opt)):
                epoch = thaw_epochs.get(group.get("layer", "head"))
                factor = 0.0 if epoch is None else thaw_warmup_factor(step, epoch * per_epoch, self.warmup_steps)
                group["lr"] = lr * factor

    @staticmethod
    def _scheduled_lrs(trainer: pl.Trainer, opt) -> list[float]:
        """The rates the scheduler set last (never read back from the groups, which hold the
        warmed-up rates), or the configured ones without a scheduler."""
        for config in trainer.lr_scheduler_configs:
            sched = config.scheduler
            if sched.optimizer is not opt:
                continue
            if isinstance(sched, ReduceLROnPlateau) and not isinstance(sched, LayerwisePlateauLR):
                raise RuntimeError(
                    "GradualUnfreezing writes each group's effective rate (0 while frozen, then a "
                    "warmup), which torch's ReduceLROnPlateau would read back and cut from; found "
                    f"{type(sched).__name__}. Use model/scheduler=plateau "
                    "(melanoma.training.optim.LayerwisePlateauLR)."
                )
            return list(sched.get_last_lr())
        # a constant rate: torch schedulers' key for the configured rate, kept in the optimizer
        # state so a resumed run reads the same one
        return [group.setdefault("initial_lr", group["lr"]) for group in opt.param_groups]

    def _check_strategy(self, trainer: pl.Trainer) -> None:
        from lightning.pytorch.strategies import DDPStrategy

        strategy = trainer.strategy
        if isinstance(strategy, DDPStrategy) and trainer.world_size > 1:
            if not strategy._ddp_kwargs.get("find_unused_parameters", False):
                raise RuntimeError(
                    "GradualUnfreezing under DDP needs find_unused_parameters=True (frozen layers "
                    "produce no gradients); found a DDP strategy without it. Use "
                    "trainer.strategy=ddp_find_unused_parameters_true (train.py sets it for you "
                    "when trainer.strategy is auto or ddp)."
                )

    def _check_optimizer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        wanted = {layer for stage in self.resolve_stages(pl_module.model.backbone.layer_groups()) for layer in stage}
        for opt in trainer.optimizers:
            have = {g.get("layer") for g in opt.param_groups}
            missing = wanted - have
            if missing:
                raise RuntimeError(
                    f"GradualUnfreezing: the optimizer has no parameter group for layers "
                    f"{sorted(missing)}; every layer must be registered from the start "
                    f"(LesionClassifier.configure_optimizers does this)"
                )

    def state_dict(self) -> dict:
        # kept for inspection; the stage itself is recomputed from the epoch on resume
        return {"start_epoch": self.start_epoch, "every_n_epochs": self.every_n_epochs,
                "stage_size": self.stage_size, "current_stage": self.current_stage}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = {k: state_dict.get(k) for k in ("start_epoch", "every_n_epochs", "stage_size")}
        mine = {"start_epoch": self.start_epoch, "every_n_epochs": self.every_n_epochs,
                "stage_size": self.stage_size}
        if saved != mine:
            log.warning("GradualUnfreezing: resuming with schedule %s, the checkpoint was trained "
                        "with %s; the stage follows the new schedule", mine, saved)
        self.current_stage = None
