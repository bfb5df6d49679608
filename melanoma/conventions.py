"""Conventions every room of the package shares (the ground floor: imports nothing of ours).

- The positive class is melanoma everywhere: binary label sets, sensitivity, thresholds.
- ImageNet normalisation, which the DeiT weights were trained with.
- The files of a training run folder.
- The resampling filters: dataset configs name OpenCV's (training crops run in OpenCV), while
  evaluation, prediction and ONNX consumers resize with PIL, so that a consumer holding only PIL
  and numpy reproduces the model's input exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

#: class names that mean melanoma (any case)
MELANOMA_NAMES = ("melanoma", "mel")
#: the binary label set every dataset offers: melanoma vs the rest
BINARY_CLASSES = ["not_melanoma", "melanoma"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def positive_index(class_names: Sequence[str]) -> int | None:
    """Index of the melanoma class ("melanoma" or "mel", any case), or None if there is none."""
    for i, name in enumerate(class_names):
        if str(name).strip().lower() in MELANOMA_NAMES:
            return i
    return None

#: a training run folder (melanoma/workflows/training_run.py writes it; `melanoma summarize` reads it)
RUN_SPLITS_FILE = "splits.csv"
RUN_TEST_METRICS_FILE = "test/metrics.json"  # the Lightning test loop's scalar metrics
RUN_REPORT_DIR = "report"  # the calibrated test report (melanoma.workflows.evaluate)

#: PIL resampling filters by the name a checkpoint and an ONNX sidecar record
PIL_RESAMPLING_NAMES = ("nearest", "box", "bilinear", "hamming", "bicubic", "lanczos")

#: a dataset config's interpolation (augment.interpolation) -> the PIL filter of the eval resize
CONFIG_TO_PIL_RESAMPLING = {"nearest": "nearest", "bilinear": "bilinear", "bicubic": "bicubic",
                            "area": "box", "lanczos": "lanczos"}

#: the built-in synthetic dataset's name (its DataModule's and its head's): heads trained on it
#: are demonstrations, and every place that shows their output says so
SYNTHETIC_DATASET = "synthetic"

#: the maps of where a model looked (melanoma.explain), by backbone kind: attention maps where
#: attention weights can be read (ViTs), Grad-CAM for CNNs; `--attention-method` and the web page
#: offer the ones the checkpoint's backbone has
ATTENTION_MAP_METHODS = ("last_layer", "rollout", "grad_rollout")
CNN_MAP_METHODS = ("gradcam",)
ALL_MAP_METHODS = (*ATTENTION_MAP_METHODS, *CNN_MAP_METHODS)

#: the sensitivity the melanoma operating point aims at unless asked otherwise (evaluate,
#: recalibrate, zero-shot, summarize)
DEFAULT_TARGET_SENSITIVITY = 0.95
