"""Samplers (balanced, DDP shards), worker augmentation seeds and the pre-resized cache."""

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from melanoma.data.cache import cache_path
from melanoma.data.dermmel import DermMelDataModule
from melanoma.data.samplers import BalancedDistributedSampler
from melanoma.data.transforms import train_transform


def test_balanced_sampler_draws_classes_equally_and_reseeds_per_epoch():
    labels = [0] * 90 + [1] * 10
    s = BalancedDistributedSampler(labels, seed=3, num_samples_total=20000)
    drawn = np.array(labels)[list(s)]
    assert abs(drawn.mean() - 0.5) < 0.02
    assert len(s) == 20000
    first = list(s)
    assert list(s) == first  # same epoch, same draw
    s.set_epoch(1)
    assert list(s) != first
    assert len(BalancedDistributedSampler(labels)) == 100  # an epoch = dataset length by default


def test_balanced_sampler_shards_one_global_draw():
    labels = [0, 0, 0, 1, 1, 2, 2]
    world = [BalancedDistributedSampler(labels, num_replicas=3, rank=r, seed=5) for r in range(3)]
    shards = [list(s) for s in world]
    assert [len(s) for s in shards] == [3, 3, 3]  # ceil(7 / 3)
    single = list(BalancedDistributedSampler(labels, num_replicas=1, rank=0, seed=5, num_samples_total=9))
    assert [single[i] for i in range(0, 9, 3)] == shards[0]
    assert [single[i] for i in range(1, 9, 3)] == shards[1]


class _Same(torch.utils.data.Dataset):
    def __init__(self):
        self.transform = train_transform(16)
        self.img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return self.transform(self.img)


def test_dataloader_workers_do_not_repeat_each_others_augmentations():
    from melanoma.data.base import _seed_worker_augmentations
    from melanoma.data.workers import worker_context

    loader = torch.utils.data.DataLoader(_Same(), batch_size=4, num_workers=2,
                                         worker_init_fn=_seed_worker_augmentations,
                                         multiprocessing_context=worker_context(2))
    a, b = list(loader)  # batch 0 from worker 0, batch 1 from worker 1
    assert not torch.equal(a, b)


def test_datamodule_balanced_sampler_balances_batches(dermmel_root):
    dm = DermMelDataModule(dermmel_root, image_size=32, batch_size=8, sampler="balanced", num_workers=0)
    dm.setup()
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, BalancedDistributedSampler) and len(loader.sampler) == 16
    # 10 vs 6 in the split; many epochs of balanced draws come out even
    counts = []
    for epoch in range(50):
        loader.sampler.set_epoch(epoch)
        counts.append(np.array(dm.split_table("train").label)[list(loader.sampler)].mean())
    assert abs(np.mean(counts) - 0.5) < 0.05


def _ddp_worker(rank, world, port, root, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = {}
        for sampler in ("random", "balanced"):
            dm = DermMelDataModule(root, image_size=16, batch_size=4, sampler=sampler, num_workers=0)
            dm.setup()
            for split in ("train", "val", "test"):
                loader = getattr(dm, f"{split}_dataloader")()
                idx = list(loader.sampler)
                n_loaded = sum(len(y) for _, y in loader)
                result[f"{sampler}/{split}"] = {"paths": [str(loader.dataset.paths[i]) for i in idx],
                                                "loaded": n_loaded, "all": dm.split_table(split).path.tolist()}
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_shard_each_split_and_balance_differently(dermmel_root, tmp_path):
    """Two gloo processes on CPU: the plain path gives disjoint shards covering every split;
    the balanced sampler gives each rank its own draw."""
    with socket.socket() as sock:  # a free port: other test runs may hold the usual ones
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # fork, not spawn: a spawned child re-imports torch, Lightning and this module (~15 s each on
    # two busy cores); the children only build loaders and run gloo collectives.
    mp.start_processes(_ddp_worker, args=(2, port, str(dermmel_root), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    r0, r1 = (json.load(open(tmp_path / f"rank{r}.json")) for r in range(2))
    for split in ("train", "val", "test"):  # 16 / 6 / 8 images: even, so no padding
        a, b = r0[f"random/{split}"]["paths"], r1[f"random/{split}"]["paths"]
        assert not set(a) & set(b), split
        assert sorted(a + b) == sorted(r0[f"random/{split}"]["all"]), split
        assert r0[f"random/{split}"]["loaded"] == len(a) and r1[f"random/{split}"]["loaded"] == len(b)
    # eval shards keep table order: rank 0 takes rows 0, 2, 4 ...
    assert r0["random/test"]["paths"] == r0["random/test"]["all"][0::2]
    a, b = r0["balanced/train"]["paths"], r1["balanced/train"]["paths"]
    assert len(a) == len(b) == 8 and a != b
    assert r0["balanced/train"]["loaded"] == r1["balanced/train"]["loaded"] == 8
    assert r0["balanced/val"]["paths"] == r0["random/val"]["paths"]  # only train is rebalanced


def test_cache_stores_resized_copies_and_is_used(dermmel_root, tmp_path):
    cache = tmp_path / "cache"
    dm = DermMelDataModule(dermmel_root, image_size=16, cache_dir=cache, cache_size=20, num_workers=0, batch_size=4)
    assert dm.cache_size == 20
    dm.prepare_data()
    entries = sorted(cache.rglob("*.jpg"))
    assert len(entries) == 30
    assert all(min(Image.open(e).size) == 20 for e in entries[:5])  # sources are 32 px
    dm.setup()
    ds = dm.dataset("val")
    assert all(str(p).startswith(str(cache)) for p in ds.paths)
    x, _ = ds[0]
    assert x.shape == (3, 16, 16)
    # cached and uncached evaluation see nearly the same pixels
    plain = DermMelDataModule(dermmel_root, image_size=16, num_workers=0)
    plain.setup()
    assert (plain.dataset("val")[0][0] - x).abs().mean() < 0.1
    # a changed source gets a new cache entry, the old one is never read
    src = dm.split_table("val").path[0]
    before = cache_path(cache, src, 20)
    os.utime(src, ns=(0, 10**9))
    assert cache_path(cache, src, 20) != before
    os.utime(src)  # leave the shared fixture's mtimes fresh
    # default cache size keeps the 256-for-224 margin
    assert DermMelDataModule(dermmel_root, image_size=224, cache_dir=cache).cache_size == 256


def test_npy_cache_skips_decoding_and_matches_jpg_cache(dermmel_root, tmp_path):
    kw = dict(image_size=16, cache_size=20, num_workers=0)
    npy = DermMelDataModule(dermmel_root, cache_dir=tmp_path / "c", cache_format="npy", **kw)
    npy.setup()
    ds = npy.dataset("train")
    assert all(str(p).endswith(".npy") for p in ds.paths)
    arr = np.load(ds.paths[0])
    assert arr.dtype == np.uint8 and arr.ndim == 3 and min(arr.shape[:2]) == 20
    jpg = DermMelDataModule(dermmel_root, cache_dir=tmp_path / "c", cache_format="jpg", **kw)
    jpg.setup()
    assert all(str(p).endswith(".jpg") for p in jpg.dataset("train").paths)
    assert (ds[0][0] - jpg.dataset("train")[0][0]).abs().mean() < 0.05  # JPEG q95 vs raw, the same crop
    # evaluation reads the exact eval pixels (16 x 16, always .npy) whatever the training format
    for dm in (npy, jpg):
        val = dm.dataset("val")
        assert all(str(p).endswith(".npy") for p in val.paths) and np.load(val.paths[0]).shape == (16, 16, 3)
    assert list(npy.dataset("val").paths) == list(jpg.dataset("val").paths)
    with pytest.raises(ValueError, match="cache_format"):
        DermMelDataModule(dermmel_root, cache_dir=tmp_path, cache_format="png")


@pytest.mark.parametrize("n,world", [(1, 1), (7, 2), (9, 2), (10, 3), (11, 4), (3, 3)])
def test_eval_sampler_shards_are_disjoint_in_order_and_cover_every_index_once(n, world):
    from melanoma.data.samplers import EvalDistributedSampler

    shards = [list(EvalDistributedSampler(n, world, r)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))  # each index exactly once
    for r, s in enumerate(shards):
        assert s == list(range(r, n, world))  # rank r: r, r + W, r + 2W, ...
        assert len(EvalDistributedSampler(n, world, r)) == len(s)
    # no padding: shard sizes differ by at most one and sum to n (DistributedSampler gives 4 + 4 for 7)
    assert sum(len(s) for s in shards) == n and max(map(len, shards)) - min(map(len, shards)) <= 1


def test_eval_sampler_refuses_a_rank_without_images():
    from melanoma.data.samplers import EvalDistributedSampler

    with pytest.raises(ValueError, match="3 images.*4 processes"):
        EvalDistributedSampler(3, 4, 3)
    assert list(EvalDistributedSampler(0, 2, 1)) == []  # an empty split is empty everywhere
