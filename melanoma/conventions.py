"""Conventions every room of the package shares (the ground floor: imports nothing above it).

- The resampling filters: dataset configs name OpenCV's (training crops run in OpenCV), while
  evaluation, prediction and ONNX consumers resize with PIL, so that a consumer holding only PIL
  and numpy reproduces the model's input exactly.
"""

from __future__ import annotations

#: PIL resampling filters by the name a checkpoint and an ONNX sidecar record
PIL_RESAMPLING_NAMES = ("nearest", "box", "bilinear", "hamming", "bicubic", "lanczos")

#: a dataset config's interpolation (augment.interpolation) -> the PIL filter of the eval resize
CONFIG_TO_PIL_RESAMPLING = {"nearest": "nearest", "bilinear": "bilinear", "bicubic": "bicubic",
                            "area": "box", "lanczos": "lanczos"}
