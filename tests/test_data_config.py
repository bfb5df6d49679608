"""conf/dataset/*.yaml instantiate the right DataModule with the keys users type."""

from pathlib import Path

import pandas as pd
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from melanoma.config import compose_config

CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset"
USER_KEYS = {"_target_", "root", "image_size", "batch_size", "num_workers", "label_set", "sampler", "seed"}

EXPECTED = {
    "synthetic": ("SyntheticDataModule", ["not_melanoma", "melanoma"], "synthetic"),
    "dermmel": ("DermMelDataModule", ["not_melanoma", "melanoma"], "dermmel"),
    "ham10000": ("HAM10000DataModule", ["not_melanoma", "melanoma"], "ham10000"),
    "ph2": ("PH2DataModule", ["common_nevus", "atypical_nevus", "melanoma"], "ph2"),
    "isic": ("ISICDataModule", ["not_melanoma", "melanoma"], "isic"),
}
# configs of several datasets at once (a global-package file whose members are the configs
# above; tested in test_joint.py)
COMPOSITE = {"joint"}
# parametrised over the files, so a new dataset config is tested (and fails until EXPECTED has it)
DATASET_CONFIGS = sorted(p.stem for p in CONF.glob("*.yaml") if p.stem not in COMPOSITE)


def expected(name: str) -> tuple:
    if name not in EXPECTED:
        raise AssertionError(f"conf/dataset/{name}.yaml has no entry in EXPECTED: add its DataModule class, "
                             "class names and head name there")
    return EXPECTED[name]


def test_every_datamodule_has_a_dataset_config():
    """A DataModule that no conf/dataset/*.yaml targets cannot be chosen with `dataset=...`."""
    import importlib
    import pkgutil

    import melanoma.data
    from melanoma.data.base import LesionDataModule

    for module in pkgutil.iter_modules(melanoma.data.__path__):
        importlib.import_module(f"melanoma.data.{module.name}")
    classes, todo = set(), [LesionDataModule]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__.startswith("melanoma.data."):
                classes.add(f"{sub.__module__}.{sub.__name__}")
            todo.append(sub)
    targets = {OmegaConf.load(p)._target_ for p in CONF.glob("*.yaml") if p.stem not in COMPOSITE}
    assert classes, "found no LesionDataModule subclasses in melanoma.data"
    assert classes <= targets, f"DataModules without a conf/dataset/*.yaml: {sorted(classes - targets)}"


def compose(name, data_dir, **overrides):
    # composed (not loaded): the dataset configs take their augment block from conf/dataset/augment/
    cfg = compose_config([f"dataset={name}", f"paths.data_dir={data_dir}", "paths.output_dir=unused"])
    with open_dict(cfg):
        for key, value in overrides.items():
            OmegaConf.update(cfg, f"dataset.{key}", value)
    return cfg


@pytest.mark.parametrize("name", DATASET_CONFIGS)
def test_config_instantiates_its_datamodule(name, tmp_path):
    cfg = compose(name, tmp_path)
    assert USER_KEYS <= set(cfg.dataset.keys())
    dm = instantiate(cfg.dataset, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    cls, classes, head = expected(name)
    assert type(dm).__name__ == cls and dm.class_names == classes and dm.name == head
    assert dm.root == tmp_path / Path(cfg.dataset.root).relative_to(tmp_path)
    assert dm.mean == (0.5, 0.5, 0.5) and dm.std == (0.25, 0.25, 0.25)
    assert dm.batch_size == cfg.dataset.batch_size and dm.image_size == cfg.dataset.image_size


def test_synthetic_config_builds_a_working_dataset(tmp_path):
    cfg = compose("synthetic", tmp_path, counts={"train": 3, "val": 1, "test": 1}, image_size=32, batch_size=2)
    dm = instantiate(cfg.dataset, mean=[0.5] * 3, std=[0.5] * 3)
    dm.prepare_data()
    dm.setup("fit")
    assert str(dm.table.path[0]).startswith(str(tmp_path / "synthetic"))
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 32, 32)


def test_ham10000_config_with_dx_labels_and_folds(tmp_path):
    cfg = compose("ham10000", tmp_path, label_set="dx", num_folds=5, fold=2)
    dm = instantiate(cfg.dataset)
    assert dm.num_classes == 7 and dm.num_folds == 5 and dm.fold == 2


def test_isic_config_chooses_year_and_label_set(tmp_path):
    cfg = compose("isic", tmp_path, year=2019, label_set="dx8", num_folds=5, fold=1)
    dm = instantiate(cfg.dataset)
    assert dm.year == 2019 and dm.num_classes == 8 and dm.class_names[dm.positive_index] == "mel"
    assert dm.num_folds == 5 and dm.fold == 1 and "year" in dm.split_setting_keys


def test_isic_config_trains_a_fast_dev_run(tmp_path):
    """dataset=isic through train.py's run() on a miniature 2019 download."""
    from isic_layouts import write_isic2019
    from helpers import compose_cfg, tiny_dataset_overrides, tiny_model_overrides, tiny_trainer_overrides

    from melanoma.workflows.training_run import run

    root = write_isic2019(tmp_path / "ISIC2019")
    cfg = compose_cfg(["dataset=isic", *tiny_dataset_overrides(root, batch_size=4), *tiny_model_overrides(),
                       *tiny_trainer_overrides(1), "trainer.fast_dev_run=true", "logger=csv"], tmp_path / "run")
    run(cfg)
    saved = pd.read_csv(tmp_path / "run" / "splits.csv")
    assert {"age", "sex", "site"} <= set(saved.columns) and len(saved) == 45
