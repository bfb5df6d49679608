"""Samplers that shard across DDP ranks: class-balanced draws for training, and an unpadded
in-order split for evaluation.

Both subclass DistributedSampler so Lightning (``use_distributed_sampler``) does not wrap them a
second time. The balanced sampler draws one global balanced sequence per epoch from
(seed, epoch) on every rank, then gives rank r every world_size-th element: ranks see different
samples, and together one epoch's worth.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DistributedSampler


def balanced_weights(labels: Sequence[int]) -> np.ndarray:
    """Per-sample weights 1 / (count of its class): every class is drawn equally often."""
    labels = np.asarray(labels)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse]


class BalancedDistributedSampler(DistributedSampler):
    """Draws ``num_samples_total`` indices (default: the dataset length) with replacement, each
    class equally likely, and shards them over ``num_replicas`` ranks.

    Call ``set_epoch`` each epoch (Lightning does) for a fresh draw.
    """

    def __init__(
        self,
        labels: Sequence[int],
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        num_samples_total: int | None = None,
    ):
        labels = list(labels)
        if not labels:
            raise ValueError("BalancedDistributedSampler needs at least one sample")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        # DistributedSampler only needs len(dataset); labels stand in for the dataset.
        super().__init__(labels, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.weights = torch.as_tensor(balanced_weights(labels), dtype=torch.double)
        total = num_samples_total or len(labels)
        self.num_samples = math.ceil(total / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        indices = torch.multinomial(self.weights, self.total_size, replacement=True, generator=g)
        return iter(indices[self.rank : self.total_size : self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


class EvalDistributedSampler(DistributedSampler):
    """Rank r of W gets indices r, r + W, r + 2W, ... of ``dataset_size``: every index exactly once
    over the ranks, in order, with no padding.

    torch's DistributedSampler pads every shard to ceil(n / W) by repeating images, so metrics
    computed on the shards count some images twice. Shards here differ in length by at most one;
    synced metric states (torchmetrics gathers uneven tensors) then equal one process's.
    A rank with no image would never update its metrics and the others would wait for it in the
    sync, so 0 < n < W is refused.
    """

    def __init__(self, dataset_size: int, num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        if 0 < dataset_size < num_replicas:
            raise ValueError(
                f"an evaluation split of {dataset_size} images cannot be shared by {num_replicas} "
                f"processes: each needs at least one image. Use at most {dataset_size} devices "
                f"(trainer.devices) or a larger split."
            )
        # DistributedSampler only needs len(dataset); a range stands in for the dataset.
        super().__init__(range(dataset_size), num_replicas=num_replicas, rank=rank, shuffle=False)
        self.total_size = dataset_size
        self.num_samples = len(range(rank, dataset_size, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples
