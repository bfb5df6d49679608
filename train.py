"""Train a melanoma classifier: `python train.py experiment=quickstart` (see conf/train.yaml).

Examples:
    python train.py experiment=quickstart
    python train.py dataset=ham10000 trainer.devices=2
    python train.py -m model.optimizer.lr=1e-4,3e-4
    python train.py -m hparams_search=optuna
    python train.py ckpt_path=runs/train/<stamp>/checkpoints/last.ckpt   # resume
"""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig


def refuse(e: Exception) -> None:
    """A mistake in what was asked (a value, a path, the data): its message, no traceback."""
    if os.environ.get("MELANOMA_DEBUG"):
        raise e
    sys.exit(f"train.py: error: {e}\n(set MELANOMA_DEBUG=1 for a traceback)")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from melanoma.config import early_checks, hydra_run_dir, remove_unused_run_dir

    try:  # in the first seconds, before torch and Lightning are imported
        early_checks(cfg)
    except (ValueError, FileNotFoundError) as e:
        if hydra_run_dir(cfg):
            remove_unused_run_dir(hydra_run_dir(cfg), Path(cfg.paths.log_dir))
        refuse(e)

    from melanoma.workflows.training_run import USER_ERRORS, run

    try:
        return run(cfg)
    except USER_ERRORS as e:
        refuse(e)


if __name__ == "__main__":
    from melanoma.config import unknown_override_hint

    hint = unknown_override_hint(sys.argv[1:])
    if hint:
        sys.exit(f"train.py: {hint}")
    main()
