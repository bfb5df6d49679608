"""The short spelling of 5-fold cross-validation, `python train.py -m dataset=ph2 +cv=kfold`, is
the long one: Hydra's basic sweeper expands it into the 5 jobs of
`dataset.num_folds=5 'dataset.fold=range(5)'` (checked by the sweeper's own expansion, without
training; the long form runs for real in tests/test_cv_multirun.py)."""

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from helpers import CONF_DIR


def _jobs(command_line: list[str]):
    """The jobs `train.py -m <command_line>` launches (the sweeper's params first, then the
    command line, as BasicSweeper.sweep does), and the config of the first."""
    fixed = [o for o in command_line if "range(" not in o and "," not in o]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=fixed, return_hydra_config=True)
    params = [f"{k}={v}" for k, v in (cfg.hydra.sweeper.params or {}).items()]  # as BasicSweeper._parse_config
    parsed = OverridesParser.create().parse_overrides(params + command_line)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch], cfg


def test_cv_kfold_is_five_folds_sharing_one_test_split():
    jobs, cfg = _jobs(["dataset=ph2", "+cv=kfold"])
    assert cfg.dataset.num_folds == 5
    assert [[o for o in job if o.startswith("dataset.fold=")] for job in jobs] == \
           [[f"dataset.fold={k}"] for k in range(5)]
    long_jobs, long_cfg = _jobs(["dataset=ph2", "dataset.num_folds=5", "dataset.fold=range(5)"])
    assert long_cfg.dataset.num_folds == 5
    assert [[o for o in job if o.startswith("dataset.fold=")] for job in long_jobs] == \
           [[f"dataset.fold={k}"] for k in range(5)]
