"""What a training run checks before it spends time: the paths it was given and its data,
before any pretrained weights are fetched (a wrong dataset.root fails in seconds, naming it)."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["check_paths", "check_data"]


def check_paths(cfg) -> None:
    """ckpt_path and model.init_from must be files; a model.pretrained that names a file (or a
    folder) must exist (a name without a weights suffix is a timm model name, fetched later)."""
    from melanoma.models.pretrained import SAFETENSORS_SUFFIXES, TORCH_SUFFIXES

    model = cfg.get("model") or {}
    for key, value, what in (("ckpt_path", cfg.get("ckpt_path"), "a Lightning checkpoint to resume, e.g. "
                              "runs/train/<stamp>/checkpoints/last.ckpt"),
                             ("model.init_from", model.get("init_from"), "a melanoma checkpoint (.ckpt)")):
        if value and not Path(str(value)).expanduser().is_file():
            raise FileNotFoundError(f"{key}={value}: no such file; expected {what}")
    pretrained = model.get("pretrained")
    if pretrained:
        path = Path(str(pretrained)).expanduser()
        if not path.exists() and (path.suffix.lower() in TORCH_SUFFIXES + SAFETENSORS_SUFFIXES
                                   or "/" in str(pretrained) and not str(pretrained).startswith("hf-hub:")):
            raise FileNotFoundError(
                f"model.pretrained={pretrained}: no such file; pass an existing weights file (or, for "
                f"model=open_clip, a downloaded folder), a timm model name (e.g. deit_base_patch16_224), an "
                f"hf-hub: name or model.pretrained=null")


def check_data(dm) -> None:
    """Read the dataset's label files and list its images now (every member of a joint dataset):
    a wrong root or a missing label file is reported before the model is built."""
    from melanoma.data.check import dataset_image_paths

    for member in (getattr(dm, "members", None) or {dm.name: dm}).values():
        dataset_image_paths(member)
