"""Train a melanoma classifier: `python train.py experiment=quickstart` (see conf/train.yaml).

Examples:
    python train.py experiment=quickstart
    python train.py dataset=ham10000 trainer.devices=2
    python train.py -m model.optimizer.lr=1e-4,3e-4
    python train.py -m hparams_search=optuna
    python train.py ckpt_path=runs/train/<stamp>/checkpoints/last.ckpt   # resume
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from melanoma.train import run

    return run(cfg)


if __name__ == "__main__":
    main()
