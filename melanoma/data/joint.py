"""Several datasets trained together: one backbone, one head per member dataset.

Each member is built from its own dataset config (the workflows compose it from
``conf/dataset/<name>.yaml``, so ``paths.data_dir`` finds it as it would alone:
``melanoma.workflows.datasets.instantiate_dataset``) and is an ordinary ``LesionDataModule``. Each training step draws one batch from
one member; which member is a seeded schedule, a function of (seed, epoch) only, so every DDP rank
runs the same head at the same step while taking its own shard within that member. Validation and
test give one loader per member, in ``members`` order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import lightning as L
import numpy as np
from omegaconf import OmegaConf

from .base import LesionDataModule, _plain
from .overlap import cross_dataset_overlap, drop_overlap_from_train

log = logging.getLogger(__name__)

MIXES = ("proportional", "uniform")
#: joint settings every member takes (one backbone sees one image size; loaders alike)
SHARED_KEYS = ("image_size", "batch_size", "eval_batch_size", "num_workers", "pin_memory", "persistent_workers")

__all__ = ["JointDataModule", "ScheduledLoader", "member_schedule", "mix_weights"]


def mix_weights(mix, names: Sequence[str], train_batches: Sequence[int]) -> np.ndarray:
    """Probabilities of drawing each member: ``proportional`` (to its train batches), ``uniform``,
    or a mapping name -> weight (normalised)."""
    if isinstance(mix, str):
        if mix == "proportional":
            w = np.asarray(train_batches, dtype=np.float64)
        elif mix == "uniform":
            w = np.ones(len(names))
        else:
            raise ValueError(f"dataset.mix must be one of {MIXES} or a mapping member -> weight, got {mix!r}")
    else:
        mix = dict(_plain(mix))
        if set(mix) != set(names):
            raise ValueError(f"dataset.mix weights must name every member exactly: members {list(names)}, "
                             f"weights for {sorted(mix)}")
        w = np.asarray([float(mix[n]) for n in names])
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"dataset.mix weights must be >= 0 with a positive sum, got {dict(zip(names, w.tolist()))}")
    return w / w.sum()


def member_schedule(weights: Sequence[float], steps: int, seed: int, epoch: int) -> np.ndarray:
    """Which member each of ``steps`` training steps draws from: counts follow ``weights`` as
    closely as integers allow (largest remainder), in an order shuffled by (seed, epoch) alone, so
    every rank computes the same schedule."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * steps
    counts = np.floor(exact).astype(np.int64)
    rest = steps - counts.sum()
    counts[np.argsort(-(exact - counts), kind="stable")[:rest]] += 1
    order = np.repeat(np.arange(len(w)), counts)
    return np.random.default_rng([int(seed), int(epoch)]).permutation(order)


class ScheduledLoader:
    """Iterates ``(x, y, member name)`` batches following ``member_schedule``; a member whose
    loader runs out starts over (reshuffled by its sampler's next epoch)."""

    def __init__(self, loaders: Mapping, weights: Sequence[float], seed: int):
        self.loaders = dict(loaders)
        self.names = list(self.loaders)
        self.weights = np.asarray(weights)
        self.seed = int(seed)
        self.epoch = 0
        self.sampler = self  # Lightning calls dataloader.sampler.set_epoch(epoch) each epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        # an epoch is as many steps as the members' loaders hold together
        return sum(len(loader) for loader in self.loaders.values())

    def schedule(self) -> np.ndarray:
        return member_schedule(self.weights, len(self), self.seed, self.epoch)

    def _set_member_epoch(self, loader, epoch: int) -> None:
        for attr in ("sampler", "batch_sampler"):
            sampler = getattr(loader, attr, None)
            if callable(getattr(sampler, "set_epoch", None)):
                sampler.set_epoch(epoch)

    def __iter__(self):
        passes = dict.fromkeys(self.names, 0)
        iters = {}
        for i in self.schedule():
            name = self.names[i]
            while True:
                if name not in iters:
                    loader = self.loaders[name]
                    self._set_member_epoch(loader, self.epoch * 1000 + passes[name])
                    iters[name] = iter(loader)
                try:
                    x, y = next(iters[name])
                    break
                except StopIteration:
                    passes[name] += 1
                    del iters[name]
            yield x, y, name


def _flatten(prefix: str, value) -> list[tuple[str, object]]:
    if isinstance(value, Mapping):
        return [kv for k, v in value.items() for kv in _flatten(f"{prefix}.{k}" if prefix else str(k), v)]
    return [(prefix, value)]


def member_override_pairs(member_overrides) -> dict[str, list[tuple[str, object]]]:
    """``member_overrides`` as (member -> [(key, value)]): a mapping ``{ph2: {root: DIR}}`` or a
    list of ``"ph2.root=DIR"`` strings."""
    member_overrides = _plain(member_overrides) or {}
    pairs: dict[str, list] = {}
    if isinstance(member_overrides, Mapping):
        for member, keys in member_overrides.items():
            pairs.setdefault(str(member), []).extend(_flatten("", keys))
        return pairs
    for item in member_overrides:
        key, sep, value = str(item).partition("=")
        member, dot, sub = key.partition(".")
        if not sep or not dot:
            raise ValueError(f"dataset.member_overrides entries look like 'ph2.root=DIR', got {item!r}")
        pairs.setdefault(member, []).append((sub, value))
    return pairs


class JointDataModule(L.LightningDataModule):
    """Members ``members`` (names of conf/dataset/ configs), each built from its config in
    ``member_configs`` (name -> resolved dataset config with ``_target_``; composing them is the
    workflows' job, not data's). ``member_overrides`` change keys of those configs. The joint
    ``image_size``/``batch_size``/... (``SHARED_KEYS``) replace the members' own.
    ``drop_overlap``: remove from every member's train split the ISIC images another member holds
    out for val/test (reported either way)."""

    name = "joint"

    def __init__(self, members: Sequence[str], member_configs: Mapping | None = None, member_overrides=None,
                 mix="proportional", seed: int = 42, drop_overlap: bool = True, mean=None, std=None, **shared):
        super().__init__()
        names = [str(m) for m in _plain(members) or []]
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError(f"dataset.members must name at least two different datasets, got {names}")
        unknown = set(shared) - set(SHARED_KEYS)
        if unknown:
            raise TypeError(f"JointDataModule got unknown settings {sorted(unknown)}; expected {SHARED_KEYS}")
        self.member_names = names
        self.mix = _plain(mix)
        self.seed = int(seed)
        self.drop_overlap = bool(drop_overlap)
        forced = {k: _plain(v) for k, v in shared.items() if v is not None or k == "eval_batch_size"}
        if mean is not None:
            forced["mean"] = list(_plain(mean))
        if std is not None:
            forced["std"] = list(_plain(std))
        given = dict(_plain(member_configs) or {})
        pairs = member_override_pairs(member_overrides)
        stray = set(pairs) - set(names)
        if stray:
            raise ValueError(f"dataset.member_overrides names {sorted(stray)}, which are not members {names}")
        missing = [n for n in names if n not in given]
        if missing:
            raise ValueError(f"no dataset config for member(s) {missing}: build a joint DataModule with "
                             f"melanoma.workflows.datasets.instantiate_dataset, which composes each member's "
                             f"conf/dataset/<name>.yaml (or pass member_configs)")
        self.member_configs: dict[str, dict] = {}
        for name in names:
            node = OmegaConf.create(dict(given[name]))
            for key, value in pairs.get(name, []):
                OmegaConf.update(node, key, value, force_add=True)
            cfg = OmegaConf.to_container(node)
            cfg.update({k: v for k, v in forced.items() if k not in ("mean", "std")})
            self.member_configs[name] = cfg
        import hydra

        self.members: dict[str, LesionDataModule] = {}
        for name, cfg in self.member_configs.items():
            extra = {k: forced[k] for k in ("mean", "std") if k in forced}
            self.members[name] = hydra.utils.instantiate(cfg, **extra, _convert_="all")
        if any(getattr(m, "metadata_schema", None) is not None for m in self.members.values()):
            for m in self.members.values():
                m.feeds_metadata_branch = True
        first = self.members[names[0]]
        self.image_size = first.image_size
        self.augment = first.augment
        sizes = {n: m.image_size for n, m in self.members.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"members must share one image size (one backbone), got {sizes}; set dataset.image_size")
        self.split_descriptions: dict[str, dict] = {}
        self.overlap = None
        self._ready = False

    @property
    def class_names_by_member(self) -> dict[str, list[str]]:
        return {n: list(m.class_names) for n, m in self.members.items()}

    def prepare_data(self) -> None:
        for m in self.members.values():
            m.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        for m in self.members.values():
            m.trainer = getattr(self, "trainer", None)
            m.setup(stage)
        # what each head is recorded to have trained on: the member's own split, as
        # `melanoma evaluate --head` rebuilds it alone (the overlap drop changes train only)
        self.split_descriptions = {n: m.split_description() for n, m in self.members.items()}
        tables = {n: m.table for n, m in self.members.items()}
        self._full_tables = dict(tables)
        # by ISIC id and by content: renamed copies (DermMel's AUG_*) are the same images too
        fingerprints = {n: self.members[n].fingerprints(t["path"].tolist()) for n, t in tables.items()}
        self.overlap = cross_dataset_overlap(tables, fingerprints)
        rank = next(iter(self.members.values()))._world()[1]
        if len(self.overlap) and rank == 0:
            log.warning("joint: %d image(s) held out (val/test) in one member are in another's train split%s:\n%s",
                        len(self.overlap), "; dropped from train" if self.drop_overlap else " (kept: drop_overlap=false)",
                        self.overlap.to_string(index=False, max_rows=20))
        if len(self.overlap) and self.drop_overlap:
            for n, t in drop_overlap_from_train(tables, self.overlap).items():
                self.members[n].table = t
                self.split_descriptions[n]["dropped_from_train"] = int(len(tables[n]) - len(t))
        self._ready = True

    def evaluation_member(self, name: str) -> LesionDataModule:
        """Member ``name`` with its own whole split, as recorded for its head (the overlap drop
        only thinned train): what evaluating that head after fit checks its fingerprint against."""
        import copy

        self.setup()
        member = copy.copy(self.members[name])
        member.table = self._full_tables[name]
        return member

    def train_dataloader(self) -> ScheduledLoader:
        loaders = {n: m.train_dataloader() for n, m in self.members.items()}
        weights = mix_weights(self.mix, self.member_names, [len(v) for v in loaders.values()])
        return ScheduledLoader(loaders, weights, self.seed)

    def val_dataloader(self):
        return [m.val_dataloader() for m in self.members.values()]

    def test_dataloader(self):
        return [m.test_dataloader() for m in self.members.values()]

    def save_split(self, path: str | os.PathLike):
        """One splits file per member: <folder>/splits_<member>.csv beside ``path``."""
        from pathlib import Path

        path = Path(path)
        folder = path if (path.is_dir() or path.suffix == "") else path.parent
        stem = "splits" if path.suffix == "" else path.stem
        return [m.save_split(folder / f"{stem}_{n}.csv") for n, m in self.members.items()]
