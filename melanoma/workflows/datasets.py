"""The data an evaluation runs on, rebuilt so that it cannot leak.

- ``training_datamodule``: the dataset a head was trained on, rebuilt from the settings the
  checkpoint recorded (only the location and loader settings may be changed), and its split
  checked against the recorded fingerprint. Its test split is then exactly the one held out.
- ``external_datamodule``: a dataset the model never trained on, described like a training run
  (``dataset=ph2 dataset.root=...``); every image of it is a test image.
- ``datamodule_from_overrides``: any dataset described that way (check-data, the duplicates audit).
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from melanoma.config import compose_config
from melanoma.data.joint import JointDataModule, member_override_pairs
from melanoma.models.checkpoint import CheckpointMeta, Preprocessing, TrainingData

log = logging.getLogger(__name__)

#: the ``_target_`` of conf/dataset/joint.yaml
JOINT_TARGET = f"{JointDataModule.__module__}.{JointDataModule.__qualname__}"

__all__ = ["SplitMismatchError", "datamodule_from_overrides", "external_datamodule", "instantiate_dataset",
           "member_configs", "set_up", "training_datamodule"]

EXTERNAL_HINT = ("to test on other data, evaluate it as an external test set: "
                 "melanoma evaluate CKPT dataset=NAME dataset.root=DIR --external")


class SplitMismatchError(ValueError):
    """An evaluation would not run on the split the checkpoint was trained with."""


def set_up(datamodule):
    """``datamodule`` with its table built (the rebuilding functions here and training hand one
    over already set up)."""
    if datamodule.table is None:
        datamodule.prepare_data()
        datamodule.setup("test")
    return datamodule


def _compose_member(name: str, overrides: list[str]):
    """conf/train.yaml with dataset=<name>: through the running Hydra app when there is one (its
    config search path), else through melanoma.config.compose_config."""
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        from hydra import compose

        return compose(config_name="train", overrides=[f"dataset={name}", *overrides])
    return compose_config([f"dataset={name}", *overrides])


def member_configs(members, data_dir: str | None, member_overrides=None) -> dict[str, dict]:
    """Each joint member's dataset config, composed from its own conf/dataset/<name>.yaml with
    ``paths.data_dir`` and its ``member_overrides`` (``{ph2: {root: DIR}}`` or ``["ph2.root=DIR"]``)."""
    pairs = member_override_pairs(member_overrides)
    stray = set(pairs) - {str(m) for m in members}
    if stray:
        raise ValueError(f"dataset.member_overrides names {sorted(stray)}, which are not members {list(members)}")
    configs = {}
    for name in map(str, members):
        overrides = [] if data_dir is None else [f"paths.data_dir={data_dir}"]
        overrides += [f"dataset.{k}={v}" for k, v in pairs.get(name, [])]
        configs[name] = OmegaConf.to_container(_compose_member(name, overrides).dataset, resolve=True)
    return configs


def instantiate_dataset(dataset_cfg, **forced):
    """The DataModule of a ``cfg.dataset``; ``forced`` keyword arguments win over the config. A
    joint config's members are composed here (``member_configs``), each from its own config."""
    cfg = OmegaConf.to_container(dataset_cfg, resolve=True) if isinstance(dataset_cfg, DictConfig) else dict(dataset_cfg)
    if cfg.get("_target_") != JOINT_TARGET:
        return hydra.utils.instantiate(cfg, **forced, _convert_="all")
    data_dir = cfg.pop("data_dir", None)
    if not cfg.get("member_configs"):
        cfg["member_configs"] = member_configs(cfg["members"], data_dir, cfg.pop("member_overrides", None))
    # not recursive: the member configs are configs (with _target_) the joint DataModule builds
    return hydra.utils.instantiate(cfg, **forced, _convert_="all", _recursive_=False)


def datamodule_from_overrides(overrides: list[str], **forced):
    """The DataModule of ``cfg.dataset`` composed from Hydra overrides of conf/ (as for `python
    train.py`); ``forced`` keyword arguments win over the config (the image size and
    normalisation a checkpoint was trained with)."""
    return instantiate_dataset(compose_config(overrides).dataset, **forced)


def _forced(pre: Preprocessing) -> dict:
    # the checkpoint's input size and normalisation, whatever the dataset config says
    return {"image_size": pre.image_size, "mean": list(pre.mean), "std": list(pre.std)}


def _parse(override: str) -> tuple[str, object]:
    key, sep, value = override.partition("=")
    if not sep:
        raise ValueError(f"expected Hydra overrides like dataset.root=PATH, got {override!r}")
    return key.lstrip("+~"), OmegaConf.to_container(OmegaConf.from_dotlist([f"v={value}"]))["v"]


def training_datamodule(data: TrainingData | None, head: str, overrides: list[str], pre: Preprocessing):
    """The DataModule `head` was trained on, with its recorded split; refuses overrides that
    would change the split and data whose split differs from the recorded fingerprint."""
    if data is None or not data.config:
        raise SplitMismatchError(
            f"the checkpoint records no training data for head {head!r}, so the split it was trained "
            f"on cannot be rebuilt; {EXTERNAL_HINT} (only data the model never saw)"
        )
    cfg = OmegaConf.create(data.config)
    differing = []
    for override in overrides:
        key, value = _parse(override)
        if key == "dataset":
            target = compose_config([override]).dataset.get("_target_")
            if target != data.config.get("_target_"):
                differing.append(f"dataset={value} (the head was trained on {data.dataset})")
            continue
        if not key.startswith("dataset."):
            raise ValueError(f"evaluate takes dataset.* overrides (e.g. dataset.root=DIR), got {override!r}")
        sub = key[len("dataset."):]
        top = sub.split(".")[0]
        if top in data.split_settings:
            if value != data.split_settings[top]:
                differing.append(f"dataset.{top}: trained with {data.split_settings[top]!r}, asked for {value!r}")
            continue
        OmegaConf.update(cfg, sub, value, force_add=True)
    if differing:
        raise SplitMismatchError(
            f"these overrides change the split head {head!r} was trained on ({data.dataset}): "
            f"{'; '.join(differing)}. Evaluating on another split would test on training images. "
            f"Drop them (dataset.root=DIR is enough when the data moved), or {EXTERNAL_HINT}"
        )
    if "group_duplicates" not in data.split_settings:  # split before near-duplicates joined groups
        OmegaConf.update(cfg, "group_duplicates", False, force_add=True)
    dm = hydra.utils.instantiate(cfg, **_forced(pre), _convert_="all")
    if data.moved_to_train:  # the images training moved out of val/test (seen by the init_from lineage)
        dm.move_to_train(data.moved_to_train)
    dm.prepare_data()
    dm.setup("test")
    if dm.name != data.dataset:
        raise SplitMismatchError(f"the recorded dataset config builds {dm.name!r}, not {data.dataset!r}; {EXTERNAL_HINT}")
    now = dm.split_description()
    if data.fingerprint and now["fingerprint"] != data.fingerprint:
        raise SplitMismatchError(
            f"the data under {dm.root} splits differently from the split head {head!r} was trained on "
            f"(recorded {data.counts}, found {now['counts']}): the image files or labels differ. Point "
            f"dataset.root at the data it was trained on, or {EXTERNAL_HINT}"
        )
    if not data.fingerprint:
        log.warning("the checkpoint records no split fingerprint for head %r: the rebuilt split (%s) "
                    "cannot be checked against the trained one", head, now["counts"])
    return dm


def external_datamodule(meta: CheckpointMeta, overrides: list[str]):
    """A dataset described by `overrides` (which must name it, `dataset=NAME`), refused when any
    head of the model was trained on it."""
    if not any(_parse(o)[0] == "dataset" for o in overrides):
        raise ValueError("--external needs the dataset named: dataset=NAME dataset.root=DIR")
    dm = datamodule_from_overrides(overrides, **_forced(meta.preprocessing))
    trained_on = {name: rec.data.dataset for name, rec in meta.heads.items() if rec.data is not None}
    hit = [h for h, d in trained_on.items() if d == dm.name]
    if hit:
        raise SplitMismatchError(
            f"{dm.name} is not external to this model: head(s) {hit} were trained on it, so part of it "
            f"is training data. Evaluate its held-out test split instead (melanoma evaluate CKPT "
            f"[dataset.root=DIR]), which rebuilds the trained split"
        )
    dm.prepare_data()
    dm.setup("test")
    return dm
