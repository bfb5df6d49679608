"""The training configs (conf/) composed outside `python train.py`: the CLI describes a dataset
exactly as a training run does (`dataset=ham10000 dataset.root=...`)."""

from __future__ import annotations

import os
import shutil
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
    hint = unknown_override_hint(list(overrides), directory)
    if hint:
        raise ValueError(hint)
    with initialize_config_dir(config_dir=str(directory), version_base="1.3", job_name="melanoma_cli"):
        cfg = compose(config_name="train", overrides=list(overrides))
        groups = [o for o in overrides if (directory / o.lstrip("+~").split("=", 1)[0].split("@", 1)[0]).is_dir()]
        errors = config_type_errors(compose(config_name="train", overrides=groups), cfg)
    if errors:
        raise ConfigError("config value(s) of the wrong type: " + "; ".join(errors))
    return cfg


# --- mistakes caught before a run starts -------------------------------------------------------

def _yaml_keys(path: Path) -> tuple[set[str], bool]:
    """(top-level keys of a conf/ yaml file, whether it is `# @package _global_`)."""
    from omegaconf import OmegaConf

    text = path.read_text()
    node = OmegaConf.load(path)
    keys = set(node.keys()) if hasattr(node, "keys") else set()
    return keys - {"defaults"}, "@package _global_" in text


def _known_keys(directory: Path) -> tuple[set[str], dict[str, set[str]]]:
    """The names a command-line override may start with (train.yaml's keys, the config groups,
    keys global-package configs add) and, per group, the keys its configs have."""
    top, _ = _yaml_keys(directory / "train.yaml")
    top |= {"hydra"}
    per_group: dict[str, set[str]] = {}
    for group in sorted(p for p in directory.iterdir() if p.is_dir()):
        top.add(group.name)
        keys = per_group.setdefault(group.name, set())
        for path in group.rglob("*.yaml"):
            found, is_global = _yaml_keys(path)
            if is_global:
                top |= found
                if group.name in found:  # `# @package _global_` with a `dataset:` block (joint)
                    from omegaconf import OmegaConf

                    nested = OmegaConf.load(path).get(group.name)
                    keys |= set(nested.keys()) if hasattr(nested, "keys") else set()
            elif path.parent == group:
                keys |= found
        keys |= {p.name for p in group.iterdir() if p.is_dir()}  # nested groups (dataset/augment)
    return top, per_group


def unknown_override_hint(overrides: list[str], directory: Path | None = None) -> str | None:
    """A "did you mean ...?" for overrides whose key is not in conf/ (`datset=ham10000`,
    `dataset.rot=...`), or None. Overrides that add keys (`+key=...`) are the user's call."""
    import difflib

    directory = directory or conf_dir()
    top, per_group = _known_keys(directory)
    problems = []
    for item in overrides:
        if item.startswith(("-", "+")) or "=" not in item and not item.startswith("~"):
            continue  # options (-m, --cfg job) and additions
        key = item.lstrip("~").split("=", 1)[0].split("@", 1)[0]
        parts = key.replace("/", ".").split(".")
        if parts[0] == "hydra":
            continue  # Hydra's own config (hydra.mode, hydra.sweeper.*): Hydra checks it
        if parts[0] not in top:
            close = difflib.get_close_matches(parts[0], sorted(top), n=1)
            problems.append(f"{key!r}: no config key or group {parts[0]!r}"
                            + (f"; did you mean {'.'.join([close[0], *parts[1:]])!r}?" if close else ""))
        elif len(parts) > 1 and parts[0] in per_group and per_group[parts[0]] and parts[1] not in per_group[parts[0]]:
            close = difflib.get_close_matches(parts[1], sorted(per_group[parts[0]]), n=1)
            problems.append(f"{key!r}: no {parts[0]} config has a key {parts[1]!r}"
                            + (f"; did you mean {'.'.join([parts[0], close[0], *parts[2:]])!r}?" if close else ""))
    if not problems:
        return None
    return ("unknown override " + "; ".join(problems)
            + " (to add a new key on purpose, prefix it with +)")


#: keys Lightning / W&B accept in more than one type (their default's type says nothing)
MIXED_TYPE_KEYS = frozenset({
    "trainer.devices",  # 1 | "auto" | [0, 1]
    "trainer.fast_dev_run",  # false | 5
    "trainer.deterministic",  # false | "warn"
    "logger.wandb.log_model",  # true | "all"
    "callbacks.model_checkpoint.save_last", "callbacks.last_checkpoint.save_last",  # true | "link"
})


def config_type_errors(defaults, cfg) -> list[str]:
    """Keys whose value in ``cfg`` has the wrong type for its default in ``defaults`` (both
    composed configs): a number given as text (`model.optimizer.lr=abc`), a flag given as
    anything but true/false. Keys whose default is null or text take any value."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    errors: list[str] = []

    def walk(node, prefix: str) -> None:
        items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else []
        for key, _ in items:
            path = f"{prefix}{key}"
            if path in MIXED_TYPE_KEYS or OmegaConf.is_interpolation(node, key) or OmegaConf.is_missing(node, key):
                continue
            child = node._get_node(key)
            value = child._value() if not isinstance(child, (DictConfig, ListConfig)) else child
            if isinstance(value, DictConfig):
                walk(value, path + ".")
                continue
            if isinstance(value, ListConfig) or value is None or isinstance(value, str):
                continue
            try:
                got = OmegaConf.select(cfg, path, throw_on_missing=False)
            except Exception:  # noqa: BLE001 - an unresolvable value is Hydra's error to report
                continue
            if got is None:
                continue
            if isinstance(value, bool):
                if not isinstance(got, bool):
                    errors.append(f"{path}={got!r}: expected true or false (default {str(value).lower()})")
            elif isinstance(value, (int, float)) and (isinstance(got, (bool, str)) or not isinstance(got, (int, float))):
                errors.append(f"{path}={got!r}: expected a number (default {value!r})")

    walk(defaults, "")
    return errors


class ConfigError(ValueError):
    """A composed config that cannot run as it is (wrong value types)."""


def check_running_config(cfg) -> None:
    """Inside `python train.py`: refuse values of the wrong type, naming each key, before any
    work. The defaults are the same config groups composed without the value overrides."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return  # composed by a test or a script: nothing to compare against
    from hydra import compose
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hc = HydraConfig.get()
    task = list(hc.overrides.task)
    choices = set(hc.runtime.choices)
    parsed = OverridesParser.create().parse_overrides(task)
    groups = [text for text, o in zip(task, parsed) if o.key_or_group in choices]
    errors = config_type_errors(compose(config_name=hc.job.config_name, overrides=groups), cfg)
    if errors:
        raise ConfigError("config value(s) of the wrong type: " + "; ".join(errors)
                          + ". Fix them on the command line (or in your conf/local/ file).")


# --- before torch and Lightning are imported (train.py) ------------------------------------------

#: dataset classes that generate their data into dataset.root (a missing root is theirs to make);
#: kept in step with melanoma.data by tests/test_errors_first.py
GENERATING_DATASETS = frozenset({"melanoma.data.synthetic.SyntheticDataModule"})
#: what Hydra writes into a run folder before the job starts: nothing of a run
HYDRA_ONLY = {".hydra"}


def check_dataset_root(cfg) -> None:
    """A dataset.root that does not exist, refused in the first second of `python train.py`
    (the dataset's own reader checks the layout inside it later, with the download link)."""
    from hydra.core.hydra_config import HydraConfig

    dataset = cfg.get("dataset") or {}
    target, root = dataset.get("_target_"), dataset.get("root")
    if not root or target in GENERATING_DATASETS:
        return
    path = Path(os.path.expanduser(str(root)))
    if not path.exists():
        name = HydraConfig.get().runtime.choices.get("dataset") if HydraConfig.initialized() else None
        name = name or str(target).rsplit(".", 1)[-1]
        raise FileNotFoundError(
            f"{name}: dataset root {path} does not exist. Set dataset.root to the folder that holds the "
            f"downloaded data (the layout each dataset expects: docs/data.md)")


def early_checks(cfg) -> None:
    """What `python train.py` checks before it imports torch and Lightning: value types, then
    whether the dataset root exists."""
    check_running_config(cfg)
    check_dataset_root(cfg)


def hydra_run_dir(cfg) -> Path | None:
    """This run's folder when Hydra made it for this job (not a folder a caller passed in)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    made = Path(HydraConfig.get().runtime.output_dir)
    return made if Path(cfg.paths.output_dir).resolve() == made.resolve() else None


def remove_unused_run_dir(run_dir: Path, stop_at: Path | None = None) -> bool:
    """Remove a run folder that holds nothing but Hydra's own files (.hydra/, the job's .log):
    a run that failed before training leaves no folder behind. Then empty parents up to
    ``stop_at`` (runs/train, runs). True if removed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return False
    extra = [p for p in run_dir.iterdir() if p.name not in HYDRA_ONLY and p.suffix != ".log"]
    if extra:
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    parent = run_dir.parent
    stop = Path(stop_at).resolve() if stop_at else None
    while stop is not None and parent.resolve() != stop.parent and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
        if parent.resolve() == stop:
            break
        parent = parent.parent
    return True
