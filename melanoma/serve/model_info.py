"""What `GET /api/model` says about a checkpoint. The only place `serve` reads checkpoint
metadata: when the metadata becomes a typed object, only this function changes."""

from __future__ import annotations


def describe_model(meta: dict) -> dict:
    """Heads with their classes, operating point and calibration state; image size."""
    calibration = meta.get("calibration") or {}
    operating_points = meta.get("operating_point") or {}
    heads = {
        name: {
            "class_names": list(spec["class_names"]),
            "operating_point": operating_points.get(name) or None,
            "calibration": calibration.get(name) or None,
        }
        for name, spec in meta["heads"].items()
    }
    return {
        "backbone": (meta.get("backbone") or {}).get("name"),
        "active_head": meta.get("active_head"),
        "image_size": int(meta["image_size"]),
        "heads": heads,
    }
