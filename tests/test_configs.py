"""Every config composes; every experiment runs a fast_dev_run on CPU with a tiny model."""

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from melanoma.workflows.training_run import run
from helpers import CONF_DIR, compose_cfg, tiny_dataset_overrides, tiny_model_overrides, tiny_trainer_overrides

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def test_every_experiment_the_docs_name_exists_and_each_changes_the_defaults():
    """`experiment=NAME` in README.md, docs/, the configs or experiments/*.py must compose, and an
    experiment that leaves the default config as it is would be a mistake (a typo'd package
    line such as a missing `# @package _global_` does exactly that)."""
    repo = CONF_DIR.parent
    sources = [repo / "README.md", *sorted((repo / "docs").glob("*.md")), *sorted(CONF_DIR.rglob("*.yaml")),
               *sorted((repo / "experiments").glob("*.py"))]
    named = {m for path in sources for m in re.findall(r"experiment=(\w+)", path.read_text())}
    assert named, "README.md should show at least one `experiment=NAME` command"
    assert named <= set(EXPERIMENTS), f"named in the docs but absent from conf/experiment/: {named - set(EXPERIMENTS)}"
    default = OmegaConf.to_container(compose_cfg([], Path("/tmp/unused")), resolve=False)
    for name in EXPERIMENTS:
        cfg = OmegaConf.to_container(compose_cfg([f"experiment={name}"], Path("/tmp/unused")), resolve=False)
        cfg.pop("experiment", None)
        assert cfg != {k: v for k, v in default.items() if k != "experiment"}, \
            f"conf/experiment/{name}.yaml changes nothing: does it start with `# @package _global_`?"


def test_dermmel_reference_recipe():
    cfg = compose_cfg(["experiment=dermmel_reference"], Path("/tmp/unused"))
    assert cfg.model.backbone.name == "vit_base" and cfg.model.pretrained == "deit_base_patch16_224"
    assert cfg.model.head.type == "mlp"
    assert cfg.callbacks.unfreezing.start_epoch == 5 and cfg.callbacks.unfreezing.every_n_epochs == 1
    assert dict(cfg.model.optimizer.group_lr) == {"head": 1e-4, "norm": 1e-6, "blocks": 1e-5,
                                                 "pos_cls": 1e-7, "patch_embed": 1e-6}
    assert cfg.model.scheduler._target_ == "melanoma.training.optim.LayerwisePlateauLR"
    assert cfg.model.scheduler.hold_while_frozen and cfg.callbacks.unfreezing.warmup_steps == 50
    assert cfg.model.scheduler.patience == 3 and cfg.model.scheduler.monitor == "val/loss"
    assert cfg.model.scheduler.factor == 0.1
    assert cfg.dataset.batch_size == 8 and cfg.trainer.max_epochs == 50
    assert cfg.dataset._target_.endswith("DermMelDataModule")


def test_quickstart_is_from_scratch_on_synthetic_cpu():
    cfg = compose_cfg(["experiment=quickstart"], Path("/tmp/unused"))
    assert cfg.model.pretrained is None and cfg.trainer.accelerator == "cpu"
    assert cfg.dataset._target_.endswith("SyntheticDataModule") and cfg.print_report


@pytest.mark.parametrize("overrides", [
    ["model.optimizer.lrr=1e-4"],         # typo in a key
    ["trainer.max_epoch=3"],
    ["model=vit_huge"],                   # unknown group option
    ["dataset.image_sise=64"],
    ["model/scheduler=cosinus"],
    ["dataset.augment.hflp=0.5"],
])
def test_typos_in_overrides_are_errors(overrides):
    with pytest.raises(ConfigCompositionException):
        compose_cfg(overrides, Path("/tmp/unused"))


def test_hparams_search_and_slurm_launcher_compose():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=optuna", "hydra/launcher=slurm"],
                      return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.storage is None and cfg.hydra.sweeper.direction == "maximize"
    assert "model.optimizer.lr" in cfg.hydra.sweeper.params
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert OmegaConf.select(cfg, "hydra.launcher.tasks_per_node") == cfg.trainer.devices


def _shrink_for(experiment: str, root: Path, data_root: Path) -> list[str]:
    cfg = compose_cfg([f"experiment={experiment}"], root)
    shrink = [*tiny_model_overrides(), *tiny_trainer_overrides(1), "trainer.fast_dev_run=true",
              "logger=csv", "model.pretrained=null"]
    if cfg.dataset._target_.endswith("SyntheticDataModule"):
        shrink += [f"dataset.root={root / 'synthetic'}", "dataset.image_size=32", "dataset.batch_size=8",
                   "dataset.generate_size=32", "dataset.counts.train=8", "dataset.counts.val=4",
                   "dataset.counts.test=4"]
    else:
        shrink += tiny_dataset_overrides(data_root)
    return shrink


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_runs_fast_dev_run(experiment, tiny_dermmel, tmp_path):
    cfg = compose_cfg([f"experiment={experiment}", *_shrink_for(experiment, tmp_path, tiny_dermmel)],
                      tmp_path / "run")
    run(cfg)
    assert (tmp_path / "run" / "splits.csv").is_file()
    assert (tmp_path / "run" / "test" / "metrics.json").is_file()
