"""The training configs (conf/) composed outside `python train.py`: the CLI describes a dataset
exactly as a training run does (`dataset=ham10000 dataset.root=...`)."""

from __future__ import annotations

from pathlib import Path


def conf_dir() -> Path:
    import melanoma

    return Path(melanoma.__file__).resolve().parents[1] / "conf"


def compose_config(overrides: list[str]):
    """conf/train.yaml with `overrides`, through Hydra's compose API."""
    from hydra import compose, initialize_config_dir

    directory = conf_dir()
    if not (directory / "train.yaml").is_file():
        raise FileNotFoundError(
            f"training configs not found at {directory}; the CLI needs the repository's conf/ folder "
            f"(install the package editable from a clone)"
        )
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"expected Hydra overrides like dataset=ham10000 or dataset.root=PATH, got {bad}")
    with initialize_config_dir(config_dir=str(directory), version_base="1.3", job_name="melanoma_cli"):
        return compose(config_name="train", overrides=list(overrides))
