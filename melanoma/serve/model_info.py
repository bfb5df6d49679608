"""What `GET /api/model` says about a checkpoint: the only place `serve` reads the checkpoint
contract (melanoma.models.checkpoint)."""

from __future__ import annotations

import dataclasses

from melanoma.models.checkpoint import Calibration, CheckpointMeta


def calibration_summary(cal: Calibration | None) -> dict | None:
    return None if cal is None else {k: v for k, v in dataclasses.asdict(cal).items() if k != "fitted_on"}


def describe_model(meta: CheckpointMeta) -> dict:
    """Heads with their classes, positive class, operating point and calibration state (plain
    and TTA); image size and preprocessing."""
    heads = {}
    for name, rec in meta.heads.items():
        cal = rec.calibration
        heads[name] = {
            "class_names": rec.class_names,
            "positive_index": rec.positive_index,
            "calibrated": cal is not None,
            "uncalibrated_reason": None if cal is not None else rec.calibration_for(tta=False)[1],
            "operating_point": None if cal is None or cal.threshold is None else {
                "threshold": cal.threshold, "target_sensitivity": cal.target_sensitivity},
            "calibration": calibration_summary(cal),
            "calibration_tta": calibration_summary(rec.calibration_tta),
            "trained_on": None if rec.data is None else rec.data.dataset,
            "data_warning": rec.data_warning(name),
            # the patient-metadata schema the head fuses (melanoma.metadata), or None: the image alone
            "metadata": rec.metadata_schema,
        }
    return {
        "backbone": meta.backbone,
        # family, name and the weights' source and licence (the checkpoint's provenance record)
        "backbone_record": meta.backbone_record(),
        "active_head": meta.active_head,
        "image_size": meta.preprocessing.image_size,
        "preprocessing": dataclasses.asdict(meta.preprocessing),
        "heads": heads,
    }
