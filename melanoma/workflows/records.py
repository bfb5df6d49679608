"""What a training run records about its data, written into every checkpoint it saves.

The LightningModule knows the model; the training workflow knows the data. ``TrainingRecords``
(a callback the workflow adds) describes, once the datamodule is set up, each head's data (its
dataset config, from which `melanoma evaluate` rebuilds it; the split settings, counts and
fingerprint; the train prior and how training reweighted it) and the run's seen-set, and hands
them to the module, which writes them with the model's own record through the checkpoint
contract. A single dataset is a joint run with one member here too: one code path.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl
import numpy as np
import torch

from melanoma.models.checkpoint import SeenImages, TrainingData

__all__ = ["TrainingRecords", "check_resumed_split", "members_of", "seen_records", "training_balance", "training_data_records"]


def members_of(dm) -> dict:
    """head name -> the member DataModule it trains on (a single dataset: itself)."""
    return dict(getattr(dm, "members", None) or {dm.name: dm})


def training_balance(member, class_weight: torch.Tensor | None = None) -> dict:
    """The train split's class prior and how training reweighted it (loss weights, sampler):
    evaluation undoes that shift when it calibrates (melanoma.evaluation.calibration)."""
    labels = member.split_table("train")["label"].to_numpy()
    counts = np.bincount(labels, minlength=len(member.class_names)).astype(np.float64)
    return {"prior": (counts / max(counts.sum(), 1.0)).tolist(),
            "class_weights": None if class_weight is None else class_weight.tolist(),
            "sampler": getattr(member, "sampler", "random")}


def training_data_records(dm, dataset_config: Mapping, class_weights: Mapping[str, torch.Tensor]
                          ) -> dict[str, TrainingData]:
    """Each head's training data. ``dataset_config``: the run's resolved ``cfg.dataset``; a joint
    run's members are rebuilt from their own configs and split descriptions (as `melanoma
    evaluate --head` rebuilds one alone)."""
    members = members_of(dm)
    joint = getattr(dm, "members", None) is not None
    descriptions = dm.split_descriptions if joint else {dm.name: dm.split_description()}
    configs = dm.member_configs if joint else {dm.name: dict(dataset_config)}
    return {name: TrainingData.from_dict({**descriptions[name], "config": dict(configs[name]),
                                          **training_balance(member, class_weights.get(name))})
            for name, member in members.items()}


def seen_records(dm, model_id: str, splits=("train", "val", "test")) -> list[SeenImages]:
    """The run's own seen-set: train, val and (marked) test images of every training dataset
    (``splits``: those the model saw; a zero-shot head has no train split)."""
    records = []
    for head, member in members_of(dm).items():
        for split in splits:
            ids, hashes = member.seen_images(split)
            records.append(SeenImages(dataset=member.name, split=split, head=head, ids=ids, hashes=hashes,
                                      model=model_id))
    return records


def check_resumed_split(records: Mapping[str, TrainingData], resumed: Mapping) -> None:
    """On resume: refuse to continue on a different split than the checkpoint's heads were
    trained on (that would leak test images into training, or silently change what "val"
    means). ``resumed``: the checkpoint's head records (name -> HeadRecord)."""
    for name, now in records.items():
        before = getattr(resumed.get(name), "data", None)
        if before is None or not before.fingerprint or before.fingerprint == now.fingerprint:
            continue
        raise RuntimeError(
            f"{now.dataset}: the data split differs from the one this checkpoint was trained on "
            f"(checkpoint {before.counts}, now {now.counts}, label_set {before.label_set!r} vs "
            f"{now.label_set!r}). Resuming would mix images across train/val/test. Resume with the same "
            f"dataset files, seed, fractions and fold, or start a new run.")


class TrainingRecords(pl.Callback):
    """Hands the module the run's data records once the datamodule is set up and the module's
    loss weights (and, on resume, its model id) are known; on resume, checks first that the
    split is the one the checkpoint recorded."""

    def __init__(self, dataset_config: Mapping, run_config: Mapping):
        self.dataset_config = dict(dataset_config)
        self.run_config = dict(run_config)

    def on_fit_start(self, trainer: pl.Trainer, pl_module) -> None:
        dm = trainer.datamodule
        data = training_data_records(dm, self.dataset_config, pl_module.class_weights)
        if trainer.ckpt_path:  # resuming: the restored head records are the checkpoint's
            check_resumed_split(data, pl_module.head_records)
        pl_module.set_training_records(data=data, seen=seen_records(dm, pl_module.model_id), config=self.run_config)
