"""The LightningModule: a backbone with one head per training dataset.

One training mode: a single dataset is a joint run with one member. Every head in ``heads``
trains (each batch trains its own dataset's head); metrics are logged per head, under
``<stage>/<metric>`` when there is one head (``val/bal_acc``) and ``<stage>/<head>/<metric>``
plus the mean over heads (``val/mean/bal_acc``) when there are several.

``self.model`` is a ``melanoma.models.classifier.Classifier`` so checkpoint keys are
``model.backbone.*`` / ``model.heads.<dataset>.*``, and ``on_save_checkpoint`` writes the META
(``ckpt["melanoma"]``) that lets ``Classifier.from_checkpoint`` rebuild the network alone. What
the model was trained on (each head's data description and split, the seen-set, the run's
config) is not the module's to know: the training workflow hands it over
(``set_training_records``) and it is written with the model's own record.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassConfusionMatrix

from melanoma.models import FAMILY_VIT, build_backbone
from melanoma.models.checkpoint import (META_KEY, CheckpointMeta, HeadRecord, SeenImages, TrainingData,
                                        non_finite_tensors, preprocessing_from)
from melanoma.models.classifier import Classifier, state_dict_mismatch
from melanoma.models.compile import DEFAULT_BACKEND, compile_backbone
from melanoma.models.heads import FUSION_KINDS, DatasetHeads, build_head
from melanoma.conventions import IMAGENET_MEAN, IMAGENET_STD, positive_index
from melanoma.evaluation.metrics import melanoma_rates
from melanoma.training import optim
from melanoma.training.guard import FiniteGuard, NonFiniteLossError
from melanoma.training.metrics import TRAIN_LOSS_EPOCH, TRAIN_LOSS_STEP, stage_metrics

log = logging.getLogger(__name__)

__all__ = ["JOINT_MEAN", "LesionClassifier"]

#: the name joint training logs its mean over members under (``val/mean/bal_acc``)
JOINT_MEAN = "mean"


def _head_spec(kind: str, in_features: int, class_names: Sequence[str], cfg: Mapping) -> dict:
    spec = {"type": kind, "in_features": in_features, "class_names": list(class_names),
            "dropout": float(cfg.get("dropout", 0.0))}
    if kind == "mlp":
        spec["hidden_features"] = int(cfg.get("hidden_features", 64))
    elif kind != "linear":
        raise ValueError(f"model.head.type must be linear or mlp, got {kind!r}")
    return spec


def _fused_spec(spec: dict, fusion: str, metadata_schema: Mapping | None, cfg: Mapping | None) -> dict:
    """``spec`` (a plain head) inside a metadata FusionHead when ``model.fusion`` asks for one."""
    if fusion in (None, "none"):
        return spec
    if fusion not in FUSION_KINDS:
        raise ValueError(f"model.fusion must be one of none, {', '.join(FUSION_KINDS)}; got {fusion!r}")
    if not metadata_schema:
        raise ValueError(f"model.fusion={fusion} needs patient metadata with the images: set "
                         f"dataset.metadata='[age,sex,site]' (HAM10000, ISIC), or model.fusion=none")
    inner = {k: v for k, v in spec.items() if k not in ("in_features", "class_names")}
    cfg = dict(cfg or {})
    return {"type": "fusion", "in_features": spec["in_features"], "class_names": spec["class_names"],
            "fusion": fusion, "metadata": dict(metadata_schema), "head": inner,
            "metadata_hidden": list(cfg.get("hidden", (512, 128))), "metadata_dropout": float(cfg.get("dropout", 0.3))}


def _mixes(mixup: Mapping | None) -> bool:
    return mixup is not None and (float(mixup.get("mixup_alpha", 0)) > 0 or float(mixup.get("cutmix_alpha", 0)) > 0)


def _build_heads(head_classes: Mapping[str, Sequence[str]], in_features: int, head_cfg: Mapping, fusion: str,
                 metadata_schema: Mapping | None, metadata_branch: Mapping | None,
                 mixup: Mapping | None) -> DatasetHeads:
    """One head per training dataset (``model.head``; inside a metadata FusionHead when
    ``model.fusion`` asks), refusing mixup where a mixed batch has no one meaning."""
    if fusion != "none" and _mixes(mixup):
        raise ValueError("model.mixup is not supported with model.fusion (a mixed image has no one patient's "
                         "metadata); set model.mixup.mixup_alpha=0 and cutmix_alpha=0")
    if len(head_classes) > 1 and _mixes(mixup):
        raise ValueError("model.mixup is not supported with dataset=joint (heads have different "
                         "classes); set model.mixup.mixup_alpha=0 and cutmix_alpha=0")
    heads = DatasetHeads()
    for name, classes in head_classes.items():
        spec = _head_spec(head_cfg.get("type", "linear"), in_features, classes, head_cfg)
        heads.add(name, build_head(_fused_spec(spec, fusion, metadata_schema, metadata_branch)))
    return heads


#: keys of ``model.mixup`` (timm.data.Mixup's arguments but num_classes and label_smoothing, which
#: come from the dataset and ``model.loss``)
MIXUP_KEYS = ("mixup_alpha", "cutmix_alpha", "prob", "switch_prob", "mode")


def _build_mixup(cfg: Mapping | None, num_classes: int, label_smoothing: float):
    """timm's Mixup when ``cfg`` asks for mixup or cutmix (an alpha > 0), else None."""
    if cfg is None or (float(cfg.get("mixup_alpha", 0.0)) <= 0 and float(cfg.get("cutmix_alpha", 0.0)) <= 0):
        return None
    missing = [k for k in MIXUP_KEYS if k not in cfg]
    if missing:
        raise KeyError(f"model.mixup lacks {missing} (found {sorted(cfg)}); conf/model/vit.yaml defines them")
    from timm.data import Mixup

    return Mixup(**{k: cfg[k] for k in MIXUP_KEYS}, label_smoothing=label_smoothing, num_classes=num_classes)


class LesionClassifier(pl.LightningModule):
    """Backbone + one head per training dataset; ``forward`` uses the head named ``dataset_name``.

    Arguments mirror the ``model`` config group (``conf/model/vit.yaml``, whose ``_target_`` is this
    class, ``_partial_``) plus what the datamodule knows: the heads (``dataset_name`` and its
    ``class_names``; with ``joint_heads``, every member's name and classes, ``dataset_name`` the
    one ``forward`` uses), ``image_size`` and ``interpolation``. ``optimizer`` and ``scheduler``
    are the ``model.optimizer`` / ``model.scheduler`` configs (``_target_`` + arguments); without
    them the module predicts and freezes but cannot train. ``loss`` None is the plain cross-entropy;
    given, its keys are all read (no defaults here that could disagree with the YAML). ``mixup``
    (``model.mixup``: timm's ``Mixup`` arguments) mixes training batches when an alpha is > 0; the
    loss then takes the soft targets (smoothed by ``loss.label_smoothing``) and the metrics still
    the batch's hard labels.
    Backbone kwargs that are None take the preset's value. ``pretrained`` and ``init_from``
    are recorded here but applied by ``load_initial_weights`` (the training workflow calls it for fresh runs
    only, so resuming or ``load_from_checkpoint`` never re-downloads or re-reads them).
    """

    def __init__(
        self,
        backbone: Mapping,
        dataset_name: str,
        class_names: Sequence[str],
        head: Mapping | None = None,
        optimizer: Mapping | None = None,
        scheduler: Mapping | None = None,
        loss: Mapping | None = None,
        image_size: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: str = "bicubic",
        pretrained: str | None = None,
        init_from: str | None = None,
        compile: bool = False,
        compile_backend: str = DEFAULT_BACKEND,
        mixup: Mapping | None = None,
        joint_heads: Mapping[str, Sequence[str]] | None = None,
        weights_license: str | None = None,
        fusion: str = "none",
        metadata_schema: Mapping | None = None,
        metadata_branch: Mapping | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        backbone = dict(backbone)
        self.backbone_name = backbone["name"]
        self.backbone_family = str(backbone.get("family") or FAMILY_VIT)
        # None: the preset's value (conf/model/vit.yaml leaves the DeiT dims to models/vit.py)
        self.backbone_kwargs = {k: v for k, v in dict(backbone.get("kwargs") or {}).items() if v is not None}
        vit = build_backbone(self.backbone_name, family=self.backbone_family, **self.backbone_kwargs)
        if hasattr(vit, "checkpoint_kwargs"):  # an open_clip tower: its resolved architecture config
            self.backbone_kwargs = vit.checkpoint_kwargs()
        # where the initial weights came from (set by load_initial_weights; kept through resume)
        self.weights_license = weights_license
        self.weights: dict | None = None
        # one head per training dataset: a single dataset is a joint run with one member
        head_classes = {str(n): list(c) for n, c in dict(joint_heads or {dataset_name: class_names}).items()}
        if dataset_name not in head_classes:
            raise ValueError(f"dataset_name {dataset_name!r} is not one of the joint heads {list(head_classes)}")
        self.fusion = str(fusion or "none")
        heads = _build_heads(head_classes, vit.embed_dim, dict(head or {"type": "linear"}), self.fusion,
                             metadata_schema, metadata_branch, mixup)
        #: the heads that train, in the order of the datamodule's val/test loaders
        self.head_names: list[str] = list(head_classes)
        if compile:
            # in place: state-dict keys stay plain, so checkpoints load with or without compile
            compile_backbone(vit, backend=compile_backend)
        self.model = Classifier(vit, heads)
        self.active_head = dataset_name
        self.image_size = int(image_size)
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]
        self.preprocessing = preprocessing_from(image_size, mean, std, interpolation)
        self.optimizer_cfg = None if optimizer is None else dict(optimizer)
        self.scheduler_cfg = None if scheduler is None else dict(scheduler)
        # checked in configure_optimizers, not here: load_from_checkpoint of an older checkpoint
        # (its hparams hold the old spellings) must still work for prediction
        self.loss_cfg = {"label_smoothing": 0.0, "class_weights": False} if loss is None else dict(loss)
        missing = {"label_smoothing", "class_weights"} - set(self.loss_cfg)
        if missing:
            raise KeyError(f"model.loss lacks {sorted(missing)} (found {sorted(self.loss_cfg)}); "
                           f"conf/model/vit.yaml defines them")
        # per head: the cross-entropy's class weights (model.loss.class_weights), set in setup
        self.class_weights: dict[str, torch.Tensor] = {}
        self.mixup = _build_mixup(mixup, len(class_names), float(self.loss_cfg["label_smoothing"]))
        self._lr_groups: dict = {}
        # the NaN/Inf guard, read one optimizer step late (melanoma.training.guard)
        self.guard = FiniteGuard()
        # the epoch's running sum of the training loss (train/loss_epoch)
        self._train_loss_sum, self._train_loss_count = torch.zeros(()), 0
        # per (stage, head): the epoch's (probabilities, labels, loss) steps, not yet in the metrics
        self._pending: dict[tuple[str, str | None], list] = {}
        # per head: calibration and training data as the checkpoint contract records them
        # (evaluation writes calibration into the file; init_from and resume bring records along)
        self.head_records: dict[str, HeadRecord] = {}
        # what the model has seen (the checkpoint's seen-set): records inherited through init_from,
        # and this run's own (set_training_records, or kept from the resumed checkpoint)
        self.inherited_seen: list[SeenImages] = []
        self._own_seen: list[SeenImages] | None = None
        # set by the training workflow (set_training_records): each head's data, the run's config
        self._data_records: dict[str, TrainingData] = {}
        self._run_config: dict = {}
        self.model_id = uuid.uuid4().hex[:12]
        # forward stages (embeddings, block0.., norm) below the lowest trainable layer run no_grad
        self._frozen_prefix = 0
        self._trainable_layers: set[str] | None = None
        self._sync_head_flags()

        self._add_metrics(head_classes)

    def _add_metrics(self, head_classes: Mapping[str, Sequence[str]]) -> None:
        """Per stage and head: the metric collection, the confusion matrix (val/test) and the mean
        eval loss, under keys "<stage>_metrics__<head>" (a key "train" would clash with
        nn.Module.train)."""
        self.metrics = torch.nn.ModuleDict({
            self._metric_key(stage, h): stage_metrics(head_classes[h])
            for stage in ("train", "val", "test") for h in self.head_names
        })
        self.confmats = torch.nn.ModuleDict({
            self._metric_key(stage, h, ""): MulticlassConfusionMatrix(len(head_classes[h]))
            for stage in ("val", "test") for h in self.head_names
        })
        # the mean loss over images: weighted by batch size and synced as sums, so under DDP it
        # equals one process's value (self.log's sync_dist would average the per-rank means)
        self.eval_losses = torch.nn.ModuleDict({
            self._metric_key(stage, h, ""): MeanMetric() for stage in ("val", "test") for h in self.head_names
        })

    @staticmethod
    def _metric_key(stage: str, head: str, suffix: str = "_metrics") -> str:
        return f"{stage}{suffix}__{head}"

    def _metric_prefix(self, stage: str, head: str) -> str:
        """Where a head's metrics are logged: ``val`` with one head, ``val/<head>`` with several."""
        return stage if len(self.head_names) == 1 else f"{stage}/{head}"

    # --- heads and freezing -------------------------------------------------------------------

    @property
    def head(self) -> torch.nn.Module:
        return self.model.heads[self.active_head]

    def _sync_head_flags(self) -> None:
        # Heads of other datasets never train in this run. requires_grad False before DDP wraps
        # the model keeps them out of DDP's reducer (they produce no gradient).
        for name, h in self.model.heads.items():
            h.requires_grad_(name in self.head_names)

    def set_trainable_layers(self, layers: set[str] | None) -> None:
        """Train only ``layers`` (the backbone's layer groups and/or ``head``; None = everything).

        Frozen parameters get requires_grad False, so they never receive a gradient and AdamW
        skips them; the backbone runs every stage below the lowest trainable layer without grad."""
        backbone = self.model.backbone
        if layers is not None:
            unknown = set(layers) - set(backbone.layer_groups()) - {"head"}
            if unknown:
                raise ValueError(f"unknown layers {sorted(unknown)}; expected head or {backbone.layer_groups()}")
        self._trainable_layers = None if layers is None else set(layers)
        for name, p in backbone.named_parameters():
            p.requires_grad_(layers is None or backbone.layer_of(name) in layers)
        for name in self.head_names:
            self.model.heads[name].requires_grad_(layers is None or "head" in layers)
        self._frozen_prefix = backbone.frozen_prefix(self._trainable_layers)
        # a timm CNN keeps the batch norms of frozen layers in eval mode (TimmBackbone.train)
        backbone.train(backbone.training)

    def trainable_parameter_count(self) -> int:
        return optim.trainable_parameter_count(self.model.parameters())

    # --- forward --------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(x, self.active_head, frozen_prefix=self._frozen_prefix, metadata=metadata)

    # --- steps ----------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.loss_cfg["class_weights"]:
            dm = self.trainer.datamodule
            members = getattr(dm, "members", None) or ({self.active_head: dm} if dm is not None else {})
            if any(not hasattr(members.get(n), "class_weights") for n in self.head_names):
                raise RuntimeError("model.loss.class_weights=true needs a datamodule with class_weights()")
            self.class_weights = {n: torch.as_tensor(members[n].class_weights(), dtype=torch.float32)
                                  for n in self.head_names}
            for name, weight in self.class_weights.items():
                log.info("class weights of %s: %s", name, dict(zip(self.model.heads[name].class_names, weight.tolist())))

    def _loss(self, logits: torch.Tensor, y: torch.Tensor, head: str | None = None) -> torch.Tensor:
        weight = self.class_weights.get(head or self.active_head)
        weight = weight.to(logits.device) if weight is not None else None
        return F.cross_entropy(logits.float(), y, weight=weight,
                               label_smoothing=float(self.loss_cfg["label_smoothing"]))

    def _soft_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against soft targets; with class weights, each class's share of a target
        weighted as F.cross_entropy weights a hard label (the same value for one-hot targets)."""
        nll = -(target * F.log_softmax(logits.float(), dim=-1))
        weight = self.class_weights.get(self.active_head)  # mixup runs with one head only
        if weight is None:
            return nll.sum(-1).mean()
        weight = weight.to(logits.device)
        return (nll * weight).sum() / (target * weight).sum()

    def _split_batch(self, batch, dataloader_idx: int = 0):
        """(x, y, head): joint training batches carry their member's name; val/test loaders
        come one per head, in ``head_names`` order."""
        if len(batch) == 3:
            return batch[0], batch[1], batch[2]
        x, y = batch
        return x, y, self.head_names[dataloader_idx]

    def _logits(self, x, head: str | None) -> torch.Tensor:
        # a batch with metadata carries (images, metadata) (melanoma.data.base.LesionImageDataset);
        # a fusion head given images alone (a joint member without metadata) encodes all missing
        x, metadata = (x[0], x[1]) if isinstance(x, (list, tuple)) else (x, None)
        if metadata is not None and not getattr(self.model.heads[head or self.active_head], "takes_metadata", False):
            raise ValueError("the batches carry patient metadata (dataset.metadata) but model.fusion=none: set "
                             "model.fusion=concat|metablock to use it, or leave dataset.metadata empty")
        return self.model(x, head or self.active_head, frozen_prefix=self._frozen_prefix, metadata=metadata)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y, head = self._split_batch(batch)
        # timm's Mixup pairs each image with its mirror in the batch: an odd (last) batch trains
        # on hard labels
        if self.mixup is not None and len(x) % 2 == 0:
            x, target = self.mixup(x, y)
            logits = self(x)
            loss = self._soft_loss(logits, target)
        else:
            logits = self._logits(x, head)
            loss = self._loss(logits, y, head)
        # checked on the device before the optimizer step and read one step later, before any
        # checkpoint or validation sees the weights (melanoma.training.guard: no host sync)
        self.guard.loss(loss, batch_idx)
        # train/loss_step on the steps the loggers write, train/loss_epoch (the mean over images)
        # at the epoch's end: Lightning's self.log is costly Python, so it does not run on steps
        # no logger writes (experiments/results/bench_train.md). The progress bar shows the loss
        # the guard carries to the host (melanoma.training.progress.TrainProgressBar).
        self._train_loss_sum = self._train_loss_sum + loss.detach().float() * len(y)
        self._train_loss_count += len(y)
        if self._logging_step():
            self.log(TRAIN_LOSS_STEP, loss, on_step=True, on_epoch=False)
        self._defer("train", head, logits.detach().float().softmax(-1), y)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        # with fp16 loss scaling an overflow is routine: the GradScaler skips that step itself
        scaled = getattr(self.trainer.precision_plugin, "scaler", None) is not None
        norm = self.guard.step(grads, lambda t: self.trainer.strategy.reduce(t, reduce_op="sum"),
                               check_norm=not scaled, epoch=self.current_epoch, global_step=self.global_step)
        if norm is not None and self._logging_step():
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    def _logging_step(self) -> bool:
        """Whether the loggers write this step's on_step values (every trainer.log_every_n_steps).
        A step-only value logged on other steps is never written, yet each ``self.log`` costs
        about a millisecond of Python (Lightning's torchmetrics-based bookkeeping)."""
        connector = getattr(self._trainer, "_logger_connector", None)  # None: no Trainer attached
        return bool(getattr(connector, "should_update_logs", True))

    def on_train_start(self) -> None:
        # computed once: the groups never change after configure_optimizers; a layer's decay and
        # no-decay groups share one rate, so one key per layer
        self._lr_groups = {}
        for group in self.trainer.optimizers[0].param_groups if self.trainer.optimizers else []:
            self._lr_groups.setdefault(f"lr/{group.get('layer', group.get('name'))}", group)
        self.class_weights = {n: w.to(self.device) for n, w in self.class_weights.items()}

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # only on the steps the loggers write: one self.log per layer per step was the largest
        # per-step cost of train.py against a bare loop (experiments/bench_train.py)
        if self._lr_groups and self._logging_step():
            self.log_dict({k: float(g["lr"]) for k, g in self._lr_groups.items()}, on_step=True, on_epoch=False)

    def on_train_epoch_start(self) -> None:
        self._train_loss_sum, self._train_loss_count = torch.zeros((), device=self.device), 0
        self.log("trainable_params", float(self.trainable_parameter_count()), on_step=False, on_epoch=True)

    def on_train_epoch_end(self) -> None:
        if self._train_loss_count:
            # summed over ranks: the mean over every image of the epoch
            reduce = self.trainer.strategy.reduce
            total = reduce(self._train_loss_sum, reduce_op="sum")
            count = reduce(torch.tensor(float(self._train_loss_count), device=self.device), reduce_op="sum")
            self.log(TRAIN_LOSS_EPOCH, total / count, on_step=False, on_epoch=True)
        self._log_metrics("train")

    def on_validation_start(self) -> None:
        self.guard.check()  # the weights about to be validated passed the NaN/Inf guard

    def on_train_end(self) -> None:
        self.guard.check()

    def _eval_step(self, stage: str, batch, dataloader_idx: int = 0) -> None:
        x, y, head = self._split_batch(batch, dataloader_idx)
        logits = self._logits(x, head)
        loss = self._loss(logits, y, head)
        self._defer(stage, head, logits.float().softmax(-1), y, loss.detach())

    def _defer(self, stage: str, head: str | None, probs: torch.Tensor, y: torch.Tensor,
               loss: torch.Tensor | None = None) -> None:
        """Keep a step's probabilities, labels (and eval loss) on the device; the epoch's metrics
        take them in one update (``_flush``). torchmetrics' per-step updates read device values
        on the host (argument checks, bincount's size, the NaN check of the mean): several GPU
        syncs per step."""
        self._pending.setdefault((stage, head), []).append((probs, y, loss))

    def _flush(self, stage: str, head: str | None) -> None:
        steps = self._pending.pop((stage, head), [])
        if not steps:
            return
        probs, y = torch.cat([s[0] for s in steps]), torch.cat([s[1] for s in steps])
        self.metrics[self._metric_key(stage, head)].update(probs, y)
        key = self._metric_key(stage, head, "")
        if key in self.confmats:
            self.confmats[key].update(probs, y)
        if key in self.eval_losses:
            # the mean over images: each step's mean loss weighted by its batch size
            losses = torch.stack([s[2].float() for s in steps])
            sizes = torch.tensor([len(s[1]) for s in steps], dtype=torch.float32, device=losses.device)
            self.eval_losses[key].update(losses, weight=sizes)

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        # scalar metrics only (test/...): the figures, intervals and calibrated numbers are the
        # report's (melanoma.workflows.evaluate), written after fit under report/. At inference
        # precision (full: melanoma.precision.inference_precision), whatever the training
        # autocast, so test/... and the report score the same logits.
        with torch.autocast(self.device.type, enabled=False):
            self._eval_step("test", batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def _log_metrics(self, stage: str) -> None:
        """``<stage>/<metric>`` with one head; with several, ``<stage>/<head>/<metric>`` per head
        and ``<stage>/mean/<metric>``, the plain mean over the heads that have the metric."""
        per_head = [self._log_head_metrics(stage, h) for h in self.head_names]
        per_head = [v for v in per_head if v]
        if len(self.head_names) == 1 or not per_head:
            return
        shared = set.intersection(*(set(v) for v in per_head))
        means = {f"{stage}/{JOINT_MEAN}/{k}": torch.stack([torch.as_tensor(v[k], dtype=torch.float32).cpu()
                                                           for v in per_head]).mean()
                 for k in sorted(shared)}
        self.log_dict(means, sync_dist=True)

    def _log_head_metrics(self, stage: str, head: str) -> dict:
        """Log one head's metrics; return them by metric name (without the prefix)."""
        self._flush(stage, head)
        collection = self.metrics[self._metric_key(stage, head)]
        if not collection[next(iter(collection.keys()))].update_called:
            return {}
        prefix = self._metric_prefix(stage, head)
        values = dict(collection.compute().items())
        collection.reset()
        key = self._metric_key(stage, head, "")
        if key in self.eval_losses and self.eval_losses[key].update_called:
            values["loss"] = self.eval_losses[key].compute().float()
            self.log(f"{prefix}/loss", values["loss"], sync_dist=True, prog_bar=stage == "val" and len(self.head_names) == 1)
            self.eval_losses[key].reset()
        if key in self.confmats and self.confmats[key].update_called:
            cm = self.confmats[key].compute()
            self.confmats[key].reset()
            pos = positive_index(self.model.heads[head].class_names)
            if pos is not None:
                values["sensitivity"], values["specificity"] = melanoma_rates(cm, pos)
        # compute() already synced the states across processes, so every rank holds the same
        # values; sync_dist averages equal numbers (a no-op) and keeps Lightning from warning
        self.log_dict({f"{prefix}/{k}": torch.as_tensor(v, dtype=torch.float32) for k, v in values.items()
                       if k != "loss"}, sync_dist=True)
        return values

    # --- optimisation ---------------------------------------------------------------------------

    def configure_optimizers(self):
        cfg = self.optimizer_cfg
        if cfg is None or self.scheduler_cfg is None:
            raise ValueError(
                "LesionClassifier was built without an optimizer or scheduler config; pass "
                "optimizer= and scheduler= as model.optimizer / model.scheduler of the composed "
                "config (conf/model/vit.yaml) hold them"
            )
        optim.check_scheduler_config(self.scheduler_cfg)  # an old spelling: say the new one first
        backbone = self.model.backbone
        heads = torch.nn.ModuleDict({n: self.model.heads[n] for n in self.head_names})
        optimizer = optim.build_optimizer(optim.optimizer_groups(backbone, heads, cfg), cfg)
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        if not math.isfinite(total) or total <= 0:
            total = 1
        max_epochs = self.trainer.max_epochs if self._trainer is not None else 1
        scheduler = optim.build_scheduler(optimizer, self.scheduler_cfg, total, max_epochs)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    # --- weights from elsewhere -----------------------------------------------------------------

    def load_initial_weights(self) -> None:
        """Apply ``init_from`` (a melanoma checkpoint: backbone + all its heads) or ``pretrained``
        (backbone only). Called for fresh runs, never on resume."""
        init_from, pretrained = self.hparams.get("init_from"), self.hparams.get("pretrained")
        if init_from:
            if pretrained:
                log.info("model.init_from=%s provides the backbone; model.pretrained=%s is not loaded",
                         init_from, pretrained)
            self._init_from_checkpoint(init_from)
        elif pretrained:
            from melanoma.models.pretrained import load_pretrained, weights_provenance

            load_pretrained(self.model.backbone, pretrained)
            # an open_clip folder: the weights file in it that was loaded (its name and sha256)
            self.weights = weights_provenance(getattr(self.model.backbone, "weights_file", None) or pretrained,
                                              self.weights_license)
            log.info("backbone initialised from %s", pretrained)
        else:
            from melanoma.models.pretrained import weights_provenance

            self.weights = weights_provenance(None, self.weights_license)

    def _init_from_checkpoint(self, path: str | Path) -> None:
        source, meta = Classifier.from_checkpoint(path, map_location="cpu")
        problems = state_dict_mismatch(self.model.backbone.state_dict(), source.backbone.state_dict())
        if problems:
            raise ValueError(
                f"model.init_from={path}: its backbone {meta.backbone} {meta.backbone_kwargs} does not fit the "
                f"configured one (name {self.backbone_name}, kwargs {self.backbone_kwargs}): "
                f"{problems}. Use the checkpoint's model and image size (model=..., "
                f"dataset.image_size=...)."
            )
        self.model.backbone.load_state_dict(source.backbone.state_dict(), strict=True)
        # the backbone's weights descend from the init_from checkpoint's
        self.weights = {"source": "init_from", "name": Path(path).name, "sha256": None,
                        "license": self.weights_license or (meta.weights or {}).get("license"),
                        "from": meta.weights}
        for name, head in source.heads.items():
            if name in self.head_names:
                if head.spec() == self.model.heads[name].spec():
                    self.model.heads.add(name, head, replace=True)
                    log.info("init_from: continuing to train the checkpoint's %r head", name)
                else:
                    log.warning("init_from: the checkpoint's %r head (%s) differs from the "
                                "configured one (%s); a fresh head replaces it",
                                name, head.spec(), self.model.heads[name].spec())
                continue
            self.model.heads.add(name, head)
        # their calibration and training data; meta() marks them uncalibrated once training moves on
        self.head_records.update({n: rec for n, rec in meta.heads.items() if n not in self.head_names})
        # everything the backbone saw stays seen (the lineage's records keep their model ids)
        if meta.seen is None:
            log.warning("model.init_from=%s records no seen-set (an older checkpoint): the images its backbone "
                        "trained on cannot be kept out of this run's val/test splits", path)
        self.inherited_seen = list(meta.seen or [])
        self.model.train()
        self._sync_head_flags()
        log.info("init_from %s: backbone and heads %s loaded; training head %r",
                 path, list(source.heads), self.active_head)

    # --- checkpoint META ------------------------------------------------------------------------

    def set_training_records(self, data: Mapping[str, TrainingData], seen: Sequence[SeenImages],
                             config: Mapping | None = None) -> None:
        """What this run trains on, as the training workflow describes it: each head's data
        (dataset config, split and its fingerprint, class balance), the run's own seen-set and
        its resolved config; written into every checkpoint with the model's record."""
        self._data_records = dict(data)
        self._own_seen = list(seen)
        self._run_config = dict(config or {})

    def meta(self) -> CheckpointMeta:
        """The checkpoint contract's metadata of the model being trained."""
        # Training moves the backbone, so no calibration fitted before (init_from, or a resumed
        # checkpoint that was evaluated) still holds: the active head gets a new one from
        # `melanoma evaluate`; the others are marked uncalibrated, with the reason.
        data = self._data_records.get(self.active_head)
        moved = (f"the backbone changed after it was calibrated (training head {self.active_head!r}"
                 f"{'' if data is None else ' on ' + data.dataset})")
        heads = {}
        for name, spec in self.model.heads.specs().items():
            old = self.head_records.get(name) or HeadRecord(spec=spec)
            rec = HeadRecord(spec=spec, data=old.data, uncalibrated_reason=old.uncalibrated_reason)
            if name not in self.head_names and (old.calibration or old.calibration_tta):
                rec.drop_calibration(moved)
            heads[name] = rec
        for name in self.head_names:
            heads[name].data = self._data_records.get(name, heads[name].data)
            heads[name].uncalibrated_reason = None
        return CheckpointMeta(
            backbone=self.backbone_name, backbone_kwargs=self.backbone_kwargs, heads=heads,
            active_head=self.active_head, preprocessing=self.preprocessing, config=dict(self._run_config),
            # None (not recorded) unless this run's own seen-set was handed over (set_training_records,
            # or kept from the resumed checkpoint): an empty list would claim "checked, nothing seen"
            seen=None if self._own_seen is None else self.inherited_seen + list(self._own_seen),
            model_id=self.model_id,
            backbone_family=self.backbone_family, weights=self.weights,
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.guard.check()  # a non-finite last step stops the run before its weights are written
        _refuse_non_finite(checkpoint.get("state_dict") or self.state_dict(), self.global_step)
        checkpoint[META_KEY] = self.meta().to_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Runs before load_state_dict (load_from_checkpoint and trainer resume): rebuild the heads
        # the checkpoint has so its state dict fits.
        if not checkpoint.get(META_KEY):
            return
        meta = CheckpointMeta.from_checkpoint(checkpoint)
        for name, rec in meta.heads.items():
            if name not in self.model.heads or self.model.heads[name].spec() != rec.spec:
                self.model.heads.add(name, build_head(rec.spec), replace=True)
        self.head_records = dict(meta.heads)
        if meta.model_id:  # a resumed run stays the same model: its own records keep their id
            self.model_id = meta.model_id
        if meta.weights is not None:  # resume never reloads pretrained weights: keep their record
            self.weights = meta.weights
        self.inherited_seen = [r for r in meta.seen or [] if r.model != self.model_id]
        self._own_seen = None if meta.seen is None else [r for r in meta.seen if r.model == self.model_id]
        self._run_config = dict(meta.config)
        self._sync_head_flags()
        if self._trainable_layers is not None:
            self.set_trainable_layers(self._trainable_layers)


def _refuse_non_finite(state_dict: dict, global_step: int) -> None:
    """Raise instead of letting weights with NaN/Inf reach a checkpoint file (one host read for
    the whole state dict; checkpoints are written rarely)."""
    bad = non_finite_tensors(state_dict)
    if bad:
        raise NonFiniteLossError(
            f"the weights at global step {global_step} are not finite ({len(bad)} tensors, e.g. {bad[:3]}); "
            f"no checkpoint of them is written and the last good one stays in the checkpoints folder. "
            f"Lower the learning rate, set trainer.gradient_clip_val or use precision 32-true."
        )
