"""One training run from a composed config: fit, the test loop's scalar metrics, then the test
report of the best checkpoint (calibrated, with intervals and figures, sent to the loggers).

``train.py`` (Hydra) calls ``run(cfg)``; tests call it with configs from Hydra's compose API.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from melanoma.config import hydra_run_dir, remove_unused_run_dir
from melanoma.conventions import RUN_REPORT_DIR, RUN_SPLITS_FILE, RUN_TEST_METRICS_FILE
from melanoma.models.checkpoint import CheckpointError
from melanoma.models.pretrained import PretrainedWeightsError
from melanoma.precision import AUTO, resolve_precision
from melanoma.training.callbacks import SaveSplit, build_callbacks
from melanoma.training.launch import hydra_ddp_launch, strategy_for
from melanoma.training.loggers import build_loggers, finish_wandb, wandb_sync_hint
from melanoma.training.module import LesionClassifier
from melanoma.training.noise import quiet_third_party
from melanoma.workflows.datasets import instantiate_dataset
from melanoma.workflows.preflight import check_data, check_paths
from melanoma.workflows.records import TrainingRecords, members_of

log = logging.getLogger(__name__)

__all__ = ["USER_ERRORS", "run"]

#: errors that mean the run was asked for something that cannot be (a path, a value, the data):
#: train.py prints their message without a traceback
USER_ERRORS = (FileNotFoundError, ValueError, PretrainedWeightsError, CheckpointError)


def _metadata_schema(dm) -> dict | None:
    """The patient-metadata schema record (dataset.metadata) of the first member that has one."""
    schema = next((m.metadata_schema for m in members_of(dm).values() if getattr(m, "metadata_schema", None)), None)
    return None if schema is None else schema.to_dict()


def run(cfg: DictConfig) -> float | None:
    """Train, test and report as ``cfg`` says; return the best ``cfg.optimized_metric``."""
    threads = torch.get_num_threads()
    last_words: list[str] = []  # the test report: printed after the loggers' own summaries
    try:
        with hydra_ddp_launch(cfg.trainer, Path(cfg.paths.output_dir)):
            return _run(cfg, last_words)
    except BaseException:
        # a run that failed before training wrote anything leaves no runs/<task>/<stamp> folder
        if hydra_run_dir(cfg) and remove_unused_run_dir(hydra_run_dir(cfg), Path(cfg.paths.log_dir)):
            log.info("removed the unused run folder %s", hydra_run_dir(cfg))
        raise
    finally:
        finish_wandb()
        torch.set_num_threads(threads)  # num_threads is this run's setting, not the process's
        for text in last_words:
            print(text, flush=True)


def _run(cfg: DictConfig, last_words: list[str]) -> float | None:
    quiet_third_party()
    if logging.getLogger().handlers:  # Hydra's; lightning adds its own stderr one: lines twice
        top = logging.getLogger("lightning")
        top.handlers = [h for h in top.handlers if type(h) is not logging.StreamHandler]
    pl.seed_everything(int(cfg.seed), workers=True)
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):  # Lightning knows no "auto": the config stored with the run says what ran
        _fill_timm_normalisation(cfg)
        _fill_open_clip(cfg)
        cfg.trainer.precision = resolve_precision(cfg.trainer.get("precision", AUTO), str(cfg.trainer.accelerator),
                                                  embed_dim=_model_width(cfg.model))
    resolved = OmegaConf.to_container(cfg, resolve=True)

    check_paths(cfg)  # what is cheap first: paths, then the data, then model and weights
    dm = instantiate_dataset(cfg.dataset, mean=list(cfg.model.mean), std=list(cfg.model.std))
    check_data(dm)
    # model: a partial LesionClassifier (conf/model/vit.yaml); not recursive, so the optimizer and
    # scheduler stay configs that configure_optimizers builds once the trainer is known
    make_module = hydra.utils.instantiate(cfg.model, _recursive_=False, _convert_="all")
    # one head per training dataset (a single dataset: one member)
    heads = {name: list(member.class_names) for name, member in members_of(dm).items()}
    first = next(iter(heads))
    module: LesionClassifier = make_module(
        dataset_name=first, class_names=heads[first], joint_heads=heads,
        image_size=dm.image_size, interpolation=dm.augment["interpolation"],
        metadata_schema=_metadata_schema(dm),
    )
    if cfg.get("ckpt_path"):
        log.info("resuming from %s (pretrained / init_from weights are not reloaded)", cfg.ckpt_path)
        from melanoma.models.checkpoint import read_meta

        resumed = read_meta(cfg.ckpt_path)
        lineage = [r for r in resumed.seen or [] if r.model != resumed.model_id]
    else:
        module.load_initial_weights()
        lineage = module.inherited_seen
    if lineage:
        _keep_seen_out_of_evaluation(dm, lineage)

    callbacks = build_callbacks(cfg.get("callbacks"), progress_bar=cfg.trainer.get("enable_progress_bar", True))
    callbacks.append(SaveSplit(run_dir / RUN_SPLITS_FILE))
    # the data description goes into the checkpoints from here, not through the model's arguments
    callbacks.append(TrainingRecords(dataset_config=resolved["dataset"], run_config=resolved))
    loggers, wandb_mode = build_loggers(cfg.get("logger"))
    for logger in loggers:  # the module takes no config: the run's config reaches the dashboards from here
        logger.log_hyperparams(resolved)
    freezing = any(getattr(c, "freezes_layers", False) for c in callbacks)
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, strategy=strategy_for(cfg.trainer, freezing or len(heads) > 1))
    wandb = next((lg for lg in loggers if isinstance(lg, WandbLogger)), None)
    if trainer.is_global_zero and wandb is not None and wandb_sync_hint(wandb, wandb_mode):
        log.info("W&B is offline; upload this run later with: %s", wandb_sync_hint(wandb, wandb_mode))

    trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
    best = next((cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.monitor
                 and cb.best_model_path), None)
    best_ckpt = best.best_model_path if best else None
    if trainer.is_global_zero:
        score = None if best is None or best.best_model_score is None else float(best.best_model_score)
        log.info("best checkpoint %s (%s = %s)", best_ckpt, cfg.optimized_metric,
                 "n/a" if score is None else f"{score:.4f}")

    if cfg.get("test", True):
        _test_loop(trainer, module, dm, best_ckpt, run_dir, report_follows=bool(cfg.get("evaluate", True) and best_ckpt))
    if cfg.get("evaluate", True) and best_ckpt and trainer.is_global_zero:
        wandb_run = wandb if wandb_mode not in (None, "disabled") else None
        # each head on its own dataset's split; several heads: report/<head>/
        for name in heads:
            member = dm.evaluation_member(name) if len(heads) > 1 else dm
            out = run_dir / RUN_REPORT_DIR / name if len(heads) > 1 else run_dir / RUN_REPORT_DIR
            _report(best_ckpt, member, out, wandb_run, cfg.get("print_report", False), head=name,
                    last_words=last_words)

    if best is not None and best.best_model_score is not None:
        return float(best.best_model_score)
    value = trainer.callback_metrics.get(cfg.optimized_metric)
    return None if value is None else float(value)


def _test_loop(trainer: pl.Trainer, module, dm, best_ckpt: str | None, run_dir: Path, report_follows: bool) -> None:
    """The test loop's scalar metrics (test/...) of the best checkpoint, written to the run
    folder; fast_dev_run writes no checkpoint: the weights in memory are tested then. Lightning's
    table holds argmax metrics on uncalibrated probabilities: beside the calibrated report it
    would read as a second, different answer, so it is printed only without one."""
    if trainer.is_global_zero and not report_follows:
        log.info("test loop metrics below: at argmax on UNCALIBRATED probabilities (evaluate=false: no "
                 "calibrated report; `melanoma evaluate CKPT` writes one)")
    results = trainer.test(module, datamodule=dm, ckpt_path=best_ckpt, verbose=not report_follows)
    if trainer.is_global_zero:
        (run_dir / RUN_TEST_METRICS_FILE).parent.mkdir(exist_ok=True)
        # one dict per test loader (several heads: per head, keys already name it)
        metrics = {k: float(v) for r in results or [] for k, v in r.items()}
        (run_dir / RUN_TEST_METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True))
        if report_follows:
            log.info("test loop metrics (argmax, uncalibrated) written to %s; the calibrated test report "
                     "follows", run_dir / RUN_TEST_METRICS_FILE)


def _keep_seen_out_of_evaluation(dm, seen) -> None:
    """Images the init_from lineage trained or was calibrated on leave this run's val and test
    splits for train (by ISIC id and by content); the checkpoint records which, so `melanoma
    evaluate` rebuilds the same split."""
    for name, member in members_of(dm).items():
        moved = member.held_out_seen_by(seen)
        if moved:
            log.warning("%s: %d val/test image(s) were seen by the init_from checkpoint's lineage (by id or "
                        "content); moved to train so they are never tested on", name, len(moved))
        member.move_to_train(moved)


def _fill_timm_normalisation(cfg: DictConfig) -> None:
    """model=timm with model.mean/std null: the normalisation of timm's pretrained config (of the
    model.pretrained hub name when it is one, else of the architecture's default weights)."""
    model = cfg.model
    backbone = model.get("backbone") or {}
    if backbone.get("family") != "timm" or (model.get("mean") is not None and model.get("std") is not None):
        return
    from melanoma.models.timm_backbone import timm_data_config

    pretrained = model.get("pretrained")
    name = pretrained if pretrained and not Path(str(pretrained)).is_file() else backbone.get("name")
    data = timm_data_config(str(name))
    if model.get("mean") is None:
        model.mean = data["mean"]
    if model.get("std") is None:
        model.std = data["std"]
    interpolation = (cfg.dataset.get("augment") or {}).get("interpolation")
    log.info("model=timm: mean %s, std %s from timm's pretrained config of %s", list(model.mean), list(model.std), name)
    if interpolation and interpolation != data["interpolation"]:
        log.info("timm's %s was pretrained with %s resizing; this run resizes with %s "
                 "(dataset.augment.interpolation=%s to match)", name, data["interpolation"], interpolation,
                 data["interpolation"])


def _fill_open_clip(cfg: DictConfig) -> None:
    """model=open_clip: the architecture config and preprocessing resolved from backbone.name and
    model.pretrained (melanoma.models.open_clip_backbone), written into the run's config so that the
    module, the datamodule and the stored config agree."""
    model = cfg.model
    backbone = model.get("backbone") or {}
    if backbone.get("family") != "open_clip":
        return
    from melanoma.models.open_clip_backbone import open_clip_settings

    settings = open_clip_settings(str(backbone.get("name")), model.get("pretrained"))
    if (backbone.get("kwargs") or {}).get("model_cfg") is None:
        model.backbone.kwargs.model_cfg = settings["model_cfg"]
    if model.get("mean") is None:
        model.mean = settings["mean"]
    if model.get("std") is None:
        model.std = settings["std"]
    augment = cfg.dataset.get("augment")
    if augment is not None:
        if augment.get("interpolation") not in (None, settings["interpolation"]):
            log.info("model=open_clip: resizing with %s (the model's preprocessing) instead of %s",
                     settings["interpolation"], augment.get("interpolation"))
        augment.interpolation = settings["interpolation"]
    log.info("model=open_clip: mean %s, std %s, %s resize from %s's config (pretrained at %s px; this run: %s px)",
             list(model.mean), list(model.std), settings["interpolation"], backbone.get("name"), settings["size"],
             cfg.dataset.get("image_size"))


def _model_width(model_cfg) -> int | None:
    """The backbone's embed_dim as configured (or its preset's): what decides whether bf16 pays on a CPU."""
    from melanoma.models.vit import PRESETS

    backbone = model_cfg.get("backbone") or {}
    kwargs = backbone.get("kwargs") or {}
    # an open_clip tower: the width of its vision config
    width = kwargs.get("embed_dim") or ((kwargs.get("model_cfg") or {}).get("vision_cfg") or {}).get("width")
    return int(width) if width is not None else PRESETS.get(backbone.get("name"), {}).get("embed_dim")


def _report(ckpt: str, dm, out: Path, wandb: WandbLogger | None, show: bool, head: str | None = None,
            last_words: list[str] | None = None) -> None:
    """The one test report: calibrate on val, report test with intervals; figures to W&B. With
    ``show`` its table goes to ``last_words``, printed when the run (and W&B) has finished."""
    from melanoma.workflows.evaluate import evaluate_checkpoint
    from melanoma.workflows.report import format_metrics

    metrics = evaluate_checkpoint(ckpt, dm, out, wandb_run=None if wandb is None else wandb.experiment,
                                  head=head)
    if show:
        # the test loop's table above is uncalibrated: auroc / average_precision agree with this
        # report, accuracy-type numbers may not (the calibrated map can move the argmax)
        text = (f"Test report ({dm.name}; {ckpt}; written to {out}; calibrated, so its auroc and average_precision "
                f"equal the test table's and its argmax metrics may differ)\n{format_metrics(metrics)}")
        if last_words is None:
            print(text, flush=True)
        else:
            last_words.append(text)
