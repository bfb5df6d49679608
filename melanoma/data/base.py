"""The DataModule every dataset shares.

A dataset subclass only turns its on-disk layout into a table (path, label, group[, split]);
splitting, transforms, caching, samplers and loaders live here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import DataLoader, DistributedSampler

from melanoma.conventions import BINARY_CLASSES, positive_index
from melanoma.metadata import MetadataSchema, parse_fields

from .cache import CACHE_FORMATS, build_cache, build_eval_cache, default_cache_size
from .dataset import LesionImageDataset, _seed_worker_augmentations
from .fingerprints import connected_labels, fingerprint_files, match, near_duplicate_pairs
from .overlap import image_id, seen_id
from .samplers import BalancedDistributedSampler, EvalDistributedSampler
from .splits import carve_missing_splits, rows_fingerprint
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    ImageTransform,
    build_eval_pipeline,
    build_train_pipeline,
    resolve_augment,
)
from .workers import worker_context

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
#: the columns every table has, first; a subclass may add more (metadata), kept after them
TABLE_COLUMNS = ["path", "label", "group", "split"]


def _plain(value):
    """OmegaConf containers (what Hydra passes) to plain Python values."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


_capped: set[tuple[int, int]] = set()


def cap_workers(requested: int) -> int:
    """At most one loader worker per available CPU: more only compete with the training process
    (and torch warns about each loader). Says so once per setting."""
    cpus = available_cpus()
    if requested <= cpus:
        return requested
    if (requested, cpus) not in _capped:
        _capped.add((requested, cpus))
        log.info("dataset.num_workers=%d but this machine gives the process %d CPU(s): using %d loader workers",
                 requested, cpus, cpus)
    return cpus


class LesionDataModule(L.LightningDataModule):
    """Shared splits/transforms/loaders. Subclasses set ``name`` and ``label_sets`` and
    implement ``build_table()``."""

    name: str = "lesions"
    label_sets: Mapping[str, list[str]] = {"binary": BINARY_CLASSES}
    #: datasets that ship their own train/val/test split ignore the fractions
    has_official_split: bool = False
    #: constructor settings that decide which image lands in which split (recorded in
    #: checkpoints; `melanoma evaluate` refuses to change them)
    split_setting_keys: tuple[str, ...] = ("label_set", "seed", "val_fraction", "test_fraction", "num_folds", "fold",
                                           "group_duplicates")

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int = 4,
        label_set: str = "binary",
        sampler: str = "random",
        seed: int = 42,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        augment: Mapping | None = None,
        cache_dir: str | os.PathLike | None = None,
        cache_size: int | None = None,
        cache_format: str = "jpg",
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        num_folds: int | None = None,
        fold: int | None = None,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        eval_batch_size: int | None = None,
        group_duplicates: bool = True,
        metadata: Sequence[str] | None = None,
    ):
        super().__init__()
        if root is None or str(root) == "":
            raise ValueError(f"{self.name}: dataset.root is not set; point it at the downloaded data")
        self.root = Path(os.path.expanduser(str(root)))
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = cap_workers(int(num_workers))
        if label_set not in self.label_sets:
            raise ValueError(
                f"{self.name}: unknown label_set {label_set!r}; expected one of {sorted(self.label_sets)}"
            )
        self.label_set = label_set
        if sampler not in ("random", "balanced"):
            raise ValueError(f"sampler must be 'random' or 'balanced', got {sampler!r}")
        self.sampler = sampler
        self.seed = int(seed)
        self.mean = tuple(float(m) for m in _plain(mean))
        self.std = tuple(float(s) for s in _plain(std))
        self.augment = resolve_augment(_plain(augment))  # fail on a typo now, not in a worker
        self.cache_dir = Path(os.path.expanduser(str(cache_dir))) if cache_dir else None
        self.cache_size = int(cache_size) if cache_size else default_cache_size(self.image_size)
        if cache_format not in CACHE_FORMATS:
            raise ValueError(f"cache_format must be one of {CACHE_FORMATS}, got {cache_format!r}")
        self.cache_format = cache_format
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1):
            raise ValueError(
                f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in [0, 1) "
                f"and leave something to train on (sum < 1)"
            )
        self.num_folds = int(num_folds) if num_folds else None
        self.fold = None if fold is None else int(fold)
        if self.num_folds and self.has_official_split:
            raise ValueError(
                f"{self.name} comes with official train/val/test splits; k-fold "
                f"(num_folds={self.num_folds}) is not supported for it"
            )
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.class_names: list[str] = list(self.label_sets[label_set])
        #: near-duplicates by content (melanoma.data.fingerprints) join one group, so they land in
        #: the same split and fold; False reproduces splits made before this existed
        self.group_duplicates = bool(group_duplicates)
        self.table: pd.DataFrame | None = None
        self._cached: dict[str, str] = {}  # original -> training cache entry
        self._eval_cached: dict[str, str] = {}  # original -> its eval pixels (val/test images)
        self._fingerprints: dict[str, np.ndarray] = {}
        self._unreadable: set[str] = set()
        #: file names that leave val/test for train (seen by an init_from lineage; see move_to_train)
        self.moved_to_train: tuple[str, ...] = ()
        #: set by joint training when another member brings metadata: this member's batches go
        #: through the model's metadata branch too (melanoma.data.joint)
        self.feeds_metadata_branch = False
        self.duplicate_groups_joined = 0
        #: patient metadata given with each image (dataset.metadata; melanoma.metadata), or None
        fields = parse_fields(_plain(metadata))
        self.metadata_schema: MetadataSchema | None = MetadataSchema(fields) if fields else None

    # --- what a subclass provides -------------------------------------------------------
    def build_table(self) -> pd.DataFrame:
        """DataFrame with columns path (str), label (int), group (str), optionally split, and any
        metadata columns (kept in the table and in splits.csv). Rows whose split is missing
        (no split column, or NA) are split here, around the official splits present."""
        raise NotImplementedError

    # --- classes -------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def positive_index(self) -> int | None:
        return positive_index(self.class_names)

    # --- setup ---------------------------------------------------------------------------
    def _make_table(self) -> pd.DataFrame:
        table = self.build_table()
        missing = {"path", "label", "group"} - set(table.columns)
        if missing:
            raise RuntimeError(f"{type(self).__name__}.build_table() lacks columns {sorted(missing)}")
        if len(table) == 0:
            raise RuntimeError(f"{self.name}: no images found under {self.root}")
        table = table.copy()
        table["path"] = table["path"].astype(str)
        table["label"] = table["label"].astype(np.int64)
        table["group"] = table["group"].astype(str)
        if self.group_duplicates:
            table["group"] = self._join_duplicate_groups(table)
        if "split" not in table.columns:
            table["split"] = None
        table["split"] = table["split"].astype(object)
        unsplit = table["split"].isna().to_numpy()
        if unsplit.any():
            rows = table[unsplit]
            table.loc[unsplit, "split"] = carve_missing_splits(
                rows["label"].to_numpy(),
                rows["group"].to_numpy(),
                set(table["split"][~unsplit]),
                self.val_fraction,
                self.test_fraction,
                self.seed,
                self.num_folds,
                self.fold,
            )
        if self.moved_to_train:
            moved = table["path"].map(os.path.basename).isin(set(self.moved_to_train)) & (table["split"] != "train")
            table.loc[moved, "split"] = "train"
        bad = sorted(set(table["split"]) - set(SPLITS))
        if bad:
            raise RuntimeError(f"{self.name}: unexpected split names {bad}; expected {SPLITS}")
        # Loader order = split, then path: independent of directory listing order.
        order = {s: i for i, s in enumerate(SPLITS)}
        table = table.sort_values(["split", "path"], key=lambda c: c.map(order) if c.name == "split" else c)
        extra = [c for c in table.columns if c not in TABLE_COLUMNS]
        return table.reset_index(drop=True)[TABLE_COLUMNS + extra]

    # --- content: fingerprints, near-duplicates, what a lineage saw ----------------------------
    def fingerprints(self, paths: Sequence[str]) -> np.ndarray:
        """(N, 8, B) content fingerprints of these image files (melanoma.data.fingerprints),
        cached per dataset root and kept in memory for the life of this DataModule."""
        missing = [p for p in paths if p not in self._fingerprints]
        if missing:
            root = self.root if self.root.is_dir() else None
            bad: list[str] = []  # unreadable: decoding names them (check-data, loaders); no match here
            found = fingerprint_files(missing, root=root, progress=True, desc=f"{self.name} fingerprints", unreadable=bad)
            for p, f in zip(missing, found):
                self._fingerprints[p] = f
            self._unreadable.update(bad)
        from .fingerprints import HASH_BYTES

        return np.stack([self._fingerprints[p] for p in paths]) if paths else np.zeros((0, 8, HASH_BYTES), np.uint8)

    def _join_duplicate_groups(self, table: pd.DataFrame) -> np.ndarray:
        """Group labels in which every near-duplicate pair by content shares its group (the
        groups of both images merge, whole), so a copy never sits in another split or fold."""
        paths = table["path"].tolist()
        fingerprints = self.fingerprints(paths)
        readable = np.flatnonzero([p not in self._unreadable for p in paths])
        pairs = near_duplicate_pairs(fingerprints[readable])
        names, code = np.unique(table["group"].to_numpy().astype(str), return_inverse=True)
        # groups are the nodes; a pair of images links their groups; names sort, so each merged
        # group takes the smallest of its names
        labels = connected_labels(len(names), code[readable[pairs[:, :2]]])
        self.duplicate_groups_joined = int(len(names) - len(np.unique(labels)))
        if self.duplicate_groups_joined:
            log.info("%s: %d near-duplicate image pair(s) by content joined %d groups (they share a split)",
                     self.name, len(pairs), self.duplicate_groups_joined)
        return names[labels[code]].astype(object)

    def seen_images(self, split: str | None = None, paths: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
        """(ids, (N, B) fingerprints) of one split, or of these image files: what a checkpoint
        records the model saw. Ids are ``ISIC_xxxxxxx`` where the file has one, else the file stem."""
        paths = self.split_table(split)["path"].tolist() if paths is None else list(paths)
        return [seen_id(p) for p in paths], self.fingerprints(paths)[:, 0]

    def move_to_train(self, names) -> None:
        """File names (basenames) that go to train wherever the split put them: images an
        init_from lineage trained on must not be tested on. Takes effect at the next setup()."""
        names = tuple(sorted(set(names)))
        if self.table is not None and names != self.moved_to_train:
            self.table = None  # set up already (a preflight check): the next setup() splits again
        self.moved_to_train = names

    def held_out_seen_by(self, seen_records) -> list[str]:
        """File names of this dataset's val/test images that ``seen_records`` (SeenImages the
        backbone's lineage trained or was calibrated on) hold, by ISIC id or by content."""
        records = [r for r in seen_records if r.split != "test"]
        if not records:
            return []
        table = self._make_table()
        held = table[table["split"] != "train"]
        if held.empty:
            return []
        paths = held["path"].tolist()
        ids = {i for r in records for i in r.ids if i.startswith("ISIC_")}
        by_id = np.array([image_id(p) in ids for p in paths])
        by_content = match(self.fingerprints(paths), np.concatenate([r.hashes for r in records])).matched
        return sorted({os.path.basename(p) for p, hit in zip(paths, by_id | by_content) if hit})

    def prepare_data(self) -> None:
        # Runs on one process per node before setup(): the place for one-time disk work.
        if self.cache_dir is not None:
            self._build_caches(self._make_table())

    def _build_caches(self, table: pd.DataFrame) -> None:
        """Training entries (short side cache_size) for every image, and for validation and test
        images the exact eval pixels (melanoma.data.cache)."""
        paths = table["path"].tolist()
        threads = max(1, self.num_workers)
        self._cached = dict(zip(paths, build_cache(paths, self.cache_dir, self.cache_size, threads, fmt=self.cache_format)))
        held_out = table.loc[table["split"] != "train", "path"].tolist()
        self._eval_cached = dict(zip(held_out, build_eval_cache(held_out, self.cache_dir, self.eval_transform, threads)))

    def setup(self, stage: str | None = None) -> None:
        if self.table is not None:
            return
        table = self._make_table()
        if len(table[table.split == "train"]) == 0:
            raise RuntimeError(f"{self.name}: the train split is empty ({len(table)} images in all)")
        if self.cache_dir is not None:
            self._build_caches(table)
        self.table = table
        if self.metadata_schema is not None:
            self._check_metadata_columns(table)
        counts = table.groupby(["split", "label"]).size().unstack(fill_value=0)
        if self._world()[1] == 0:  # one summary per run, not one per DDP rank
            log.info("%s (%s): %d images\n%s", self.name, self.label_set, len(table),
                     counts.rename(columns=dict(enumerate(self.class_names))).to_string())

    def _check_metadata_columns(self, table: pd.DataFrame) -> None:
        """Every asked-for field is a column of this dataset; says how many values are missing."""
        absent = [f for f in self.metadata_schema.fields if f not in table.columns]
        if absent:
            raise ValueError(
                f"{self.name}: dataset.metadata asks for {list(self.metadata_schema.fields)} but this dataset has no "
                f"{absent} column(s) (it has {[c for c in table.columns if c not in TABLE_COLUMNS]}). Leave "
                f"dataset.metadata empty for it, or use a dataset that records them (HAM10000, ISIC 2017/2019/2020)."
            )
        vectors = self.metadata_schema.encode_table(table)  # an unreadable value fails here, not in a worker
        missing = self.metadata_schema.missing_counts(vectors)
        if self._world()[1] == 0:
            log.info("%s: metadata %s; missing values (kept, encoded as missing): %s of %d images",
                     self.name, list(self.metadata_schema.fields), missing, len(table))

    def metadata_vectors(self, rows: pd.DataFrame) -> np.ndarray | None:
        """(N, D) encoded metadata of these table rows, or None without dataset.metadata."""
        return None if self.metadata_schema is None else self.metadata_schema.encode_table(rows)

    def _require_table(self) -> pd.DataFrame:
        if self.table is None:
            self.setup()
        return self.table

    def split_table(self, split: str) -> pd.DataFrame:
        """Rows of one split in loader order (columns path, label, group, split, then metadata)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        t = self._require_table()
        return t[t["split"] == split].reset_index(drop=True)

    def save_split(self, path: str | os.PathLike) -> Path:
        """Write splits.csv (path,label,group,split and the metadata columns; label as class
        name). ``path`` may be the
        file or the folder to put splits.csv in. Returns the file written."""
        path = Path(path)
        if path.is_dir() or path.suffix == "":
            path = path / "splits.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        out = self._require_table().copy()
        out["label"] = [self.class_names[i] for i in out["label"]]
        out.to_csv(path, index=False)
        return path

    def class_weights(self) -> torch.Tensor:
        """Inverse-frequency weights N / (C * n_c) from the train split (mean weight over
        samples = 1). A class missing from train gets weight 0 and a warning."""
        labels = self.split_table("train")["label"].to_numpy()
        counts = np.bincount(labels, minlength=self.num_classes).astype(np.float64)
        weights = np.zeros(self.num_classes)
        present = counts > 0
        weights[present] = len(labels) / (self.num_classes * counts[present])
        if not present.all():
            absent = [self.class_names[i] for i in np.flatnonzero(~present)]
            log.warning("%s: classes %s have no training images; their loss weight is 0", self.name, absent)
        return torch.tensor(weights, dtype=torch.float32)

    # --- resume safety -----------------------------------------------------------------------
    def split_fingerprint(self) -> str:
        """Hash of (file name, label, split) over all rows: the same data split the same way
        gives the same fingerprint wherever the dataset folder lives."""
        t = self._require_table()
        return rows_fingerprint(t["path"], t["label"].tolist(), t["split"])

    def split_settings(self) -> dict:
        return {k: _plain(getattr(self, k)) for k in self.split_setting_keys}

    def split_description(self) -> dict:
        """What a checkpoint records about the data a head was trained on."""
        t = self._require_table()
        return {
            "dataset": self.name, "label_set": self.label_set, "class_names": list(self.class_names),
            "split_settings": self.split_settings(), "fingerprint": self.split_fingerprint(),
            "counts": {k: int(v) for k, v in t.groupby("split").size().to_dict().items()},
            "moved_to_train": list(self.moved_to_train),
        }

    # --- transforms ------------------------------------------------------------------------
    @property
    def train_transform(self) -> ImageTransform:
        return build_train_pipeline(self.image_size, self.mean, self.std, self.augment)

    @property
    def eval_transform(self) -> EvalTransform:
        return build_eval_pipeline(self.image_size, self.mean, self.std, self.augment["interpolation"])

    # --- loaders ---------------------------------------------------------------------------
    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.world_size, trainer.global_rank
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    def dataset(self, split: str, train: bool | None = None) -> LesionImageDataset:
        """The Dataset of one split; ``train`` picks the augmenting pipeline (default: split == train)."""
        rows = self.split_table(split)
        train = split == "train" if train is None else train
        transform = self.train_transform if train else self.eval_transform
        if train:
            _, rank = self._world()
            transform.set_random_seed(self.seed * 1000 + rank)
        if not train:
            # Evaluation sees exactly what `melanoma predict` sees for the same file: a full decode
            # (no JPEG draft scaling) and the eval resize, or those very pixels from the cache.
            paths = [self._eval_cached.get(p, p) for p in rows["path"]]
            return LesionImageDataset(paths, rows["label"].to_numpy(), transform, decode_size=None,
                                      metadata=self.metadata_vectors(rows))
        paths = [self._cached.get(p, p) for p in rows["path"]]
        # Cached files are already small; the originals may be decoded at reduced JPEG scale.
        return LesionImageDataset(paths, rows["label"].to_numpy(), transform,
                                  decode_size=None if self._cached else self.image_size,
                                  metadata=self.metadata_vectors(rows))

    def _loader(self, split: str, train: bool) -> DataLoader:
        ds = self.dataset(split, train)
        world_size, rank = self._world()
        sampler = None
        if train and self.sampler == "balanced":
            sampler = BalancedDistributedSampler(ds.labels, world_size, rank, seed=self.seed)
        elif world_size > 1:
            # Built here rather than left to Lightning so a plain DDP script shards the same way.
            # Evaluation shards are unpadded so every image counts once in val/test metrics.
            sampler = (DistributedSampler(ds, world_size, rank, shuffle=True, seed=self.seed) if train
                       else EvalDistributedSampler(len(ds), world_size, rank))
        generator = torch.Generator().manual_seed(self.seed + rank)
        return DataLoader(
            ds,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            worker_init_fn=_seed_worker_augmentations if self.num_workers > 0 else None,
            generator=generator,
            multiprocessing_context=worker_context(self.num_workers),
            # the metadata branch's BatchNorm cannot train on a batch of one image: such a last
            # batch (a different image each shuffled epoch) is left out; a joint member without
            # metadata feeds the same branch (its missing indicators), so it does the same
            drop_last=bool(train and (self.metadata_schema is not None or self.feeds_metadata_branch)
                           and (len(sampler) if sampler is not None else len(ds)) % self.batch_size == 1),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    # --- misc ------------------------------------------------------------------------------
    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, root={str(self.root)!r}, "
                f"label_set={self.label_set!r}, classes={self.class_names})")
