"""DataLoader workers start in a way that cannot inherit a lock another thread holds (forkserver
or spawn, never a plain fork of a process with threads): training, evaluation and prediction."""

import multiprocessing as mp
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from melanoma.data.dermmel import DermMelDataModule
from melanoma.data.workers import WORKER_START_METHOD, worker_context

# held by a background thread of the test process while the loader starts its worker
_HELD = threading.Lock()


class _TriesTheLock(torch.utils.data.Dataset):
    """Item: 1.0 if this process could take _HELD within 3 s, else 0.0 (a forked copy of a held
    lock never frees: a real worker needing it would wait forever)."""

    def __len__(self):
        return 1

    def __getitem__(self, i):
        got = _HELD.acquire(timeout=3)
        if got:
            _HELD.release()
        return torch.tensor(float(got))


def _load_while_another_thread_holds_the_lock(context) -> float:
    taken, done = threading.Event(), threading.Event()

    def hold():
        with _HELD:
            taken.set()
            done.wait(30)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    taken.wait(5)
    try:
        loader = torch.utils.data.DataLoader(_TriesTheLock(), batch_size=1, num_workers=1,
                                             multiprocessing_context=context, timeout=60)
        return float(next(iter(loader)))
    finally:
        done.set()
        holder.join()


def test_workers_do_not_inherit_a_lock_held_by_another_thread():
    assert WORKER_START_METHOD in ("forkserver", "spawn")
    assert _load_while_another_thread_holds_the_lock(worker_context(1)) == 1.0


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="no fork on this platform")
def test_a_plain_fork_would_inherit_it():
    """What the test above guards against: the hazard is real, so that test can fail."""
    assert _load_while_another_thread_holds_the_lock(mp.get_context("fork")) == 0.0


def test_no_context_without_workers():
    assert worker_context(0) is None


def test_datamodule_loaders_use_the_safe_start(dermmel_root):
    dm = DermMelDataModule(dermmel_root, image_size=16, batch_size=4, num_workers=1)
    dm.setup()
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        assert loader.multiprocessing_context.get_start_method() == WORKER_START_METHOD
    x, y = next(iter(dm.train_dataloader()))  # the dataset and its transforms cross the process boundary
    assert x.shape == (4, 3, 16, 16) and y.shape == (4,)


def test_predictor_workers_use_the_safe_start_and_give_the_same_logits(two_head_ckpt, tmp_path):
    from melanoma.predict import Predictor

    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(paths[-1])
    predictor = Predictor(two_head_ckpt, progress=False, batch_size=2)
    in_process = predictor.logits_of_paths(paths, num_workers=0)
    with_workers = predictor.logits_of_paths(paths, num_workers=2)
    np.testing.assert_array_equal(with_workers, in_process)
