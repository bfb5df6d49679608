"""Zero-shot evaluation of a CLIP-style model: a checkpoint, then the one report.

``melanoma zero-shot model=open_clip model.backbone.name=... model.pretrained=... dataset=...``
builds the zero-shot classifier (melanoma.models.zero_shot: the image tower and a head of class
text embeddings) and writes it as an ordinary melanoma checkpoint. The report is then the one
trained heads get, from the same functions:

- in-domain (default): the head records the dataset and its split as a trained head does, so
  ``evaluate_checkpoint`` fits the calibration and the operating point on val, stores them in the
  checkpoint and reports test, with intervals and figures; ``melanoma evaluate CKPT`` repeats it.
- ``external``: nothing is fitted; every image is a test image (``evaluate_external``), and the
  probabilities are the raw zero-shot softmax (uncalibrated, so no decision is made).

What the foundation model saw in its own pretraining is unknown to the checkpoint (Derm1M and
PMC-15M hold public dermoscopy datasets): its seen-set records only the split used here.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from melanoma.config import compose_config
from melanoma.conventions import DEFAULT_TARGET_SENSITIVITY
from melanoma.workflows.datasets import instantiate_dataset
from melanoma.workflows.evaluate import evaluate_checkpoint, evaluate_external
from melanoma.workflows.records import seen_records
from melanoma.models.checkpoint import CheckpointMeta, HeadRecord, SeenImages, TrainingData, preprocessing_from, save_checkpoint
from melanoma.models.open_clip_backbone import FAMILY_OPEN_CLIP, open_clip_settings
from melanoma.models.pretrained import weights_provenance
from melanoma.models.zero_shot import load_prompts, zero_shot_classifier

log = logging.getLogger(__name__)

__all__ = ["UNCALIBRATED_REASON", "zero_shot"]

UNCALIBRATED_REASON = ("a zero-shot head evaluated as external (nothing fitted): its probabilities are the raw "
                       "zero-shot softmax; `melanoma zero-shot` without --external calibrates it on a val split")


def zero_shot(overrides: list[str], out: str | Path, report_dir: str | Path | None = None, *,
              prompts: str | Path | None = None, external: bool = False, target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY,
              device: str = "cpu", progress: bool = True, precision: str = "auto") -> tuple[Path, dict]:
    """Write the zero-shot checkpoint ``out`` for the dataset the overrides describe and report it
    (in-domain: calibrated on val, test reported; ``external``: every image, nothing fitted).
    Returns (checkpoint, the report's metrics)."""
    cfg = compose_config(list(overrides))
    backbone = cfg.model.get("backbone") or {}
    if backbone.get("family") != FAMILY_OPEN_CLIP:
        raise ValueError(f"zero-shot classification needs a CLIP-style model: model=open_clip model.backbone.name=... "
                         f"model.pretrained=...; got model.backbone.family={backbone.get('family')}")
    name, pretrained = str(backbone.get("name")), cfg.model.get("pretrained")
    if not pretrained:
        raise ValueError("zero-shot needs the model's trained weights: model.pretrained=FILE|DIR|hf-hub:ORG/REPO")
    settings = open_clip_settings(name, pretrained)
    mean = list(cfg.model.mean) if cfg.model.get("mean") is not None else settings["mean"]
    std = list(cfg.model.std) if cfg.model.get("std") is not None else settings["std"]
    with open_dict(cfg):
        cfg.dataset.augment.interpolation = settings["interpolation"]
    dm = instantiate_dataset(cfg.dataset, mean=mean, std=std)
    dm.prepare_data()
    dm.setup("test")

    prompt_set = load_prompts(prompts)
    model, source = zero_shot_classifier(name, pretrained, dm.name, list(dm.class_names), dm.image_size, prompt_set)
    model_id = uuid.uuid4().hex[:12]
    dataset_config = OmegaConf.to_container(cfg.dataset, resolve=True)
    record = HeadRecord(spec=model.heads[dm.name].spec())
    seen: list[SeenImages] = []
    if external:
        record.uncalibrated_reason = UNCALIBRATED_REASON
    else:
        # the split the head is calibrated (val) and tested on, recorded as a trained head's is, so
        # `melanoma evaluate` rebuilds it and nothing of it is ever scored as external
        record.data = TrainingData.from_dict({**dm.split_description(), "config": dataset_config})
        seen = seen_records(dm, model_id, splits=("val", "test"))
    weights = weights_provenance(source.hub or source.weights, cfg.model.get("weights_license"))
    meta = CheckpointMeta(
        backbone=name, backbone_kwargs=model.backbone.checkpoint_kwargs(), heads={dm.name: record},
        active_head=dm.name, preprocessing=preprocessing_from(dm.image_size, mean, std, settings["interpolation"]),
        # what built it (the training config's other parts, trainer and paths, played no part)
        config={"model": OmegaConf.to_container(cfg.model, resolve=True), "dataset": dataset_config,
                "zero_shot": {"prompts": prompt_set["source"]}},
        seen=seen, model_id=model_id, backbone_family=FAMILY_OPEN_CLIP, weights=weights,
    )
    out = save_checkpoint(out, model.state_dict(), meta)
    log.info("zero-shot checkpoint written to %s", out)
    report_dir = Path(report_dir) if report_dir else out.with_name(f"{out.stem}_{'external' if external else 'report'}_{dm.name}")
    if external:
        metrics = evaluate_external(out, dm, report_dir, device=device, progress=progress, precision=precision)
    else:
        metrics = evaluate_checkpoint(out, dm, report_dir, target_sensitivity=target_sensitivity, device=device,
                                      progress=progress, precision=precision)
    return out, {**metrics, "report_dir": str(report_dir)}
