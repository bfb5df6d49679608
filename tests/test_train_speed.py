"""train.py's speed options: trainer.precision=auto resolved and stored with the run, and
model.compile=true leaving checkpoints interchangeable with uncompiled ones.

Compiled runs use backend aot_eager: it traces through Dynamo and AOTAutograd like inductor does,
without spending a minute of C++ compilation per test on a 2-core machine."""

import logging

import pytest
from pathlib import Path
import torch

from melanoma import precision as P
from melanoma.models.classifier import Classifier
from melanoma.models.compile import compile_backbone, is_compiled
from melanoma.workflows.training_run import run
from melanoma.training.module import LesionClassifier
from helpers import compose_cfg, module_from_cfg, tiny_overrides

COMPILE = ["model.compile=true", "model.compile_backend=aot_eager"]


def _run(tiny_dermmel, out, *extra, epochs=1):
    cfg = compose_cfg([*tiny_overrides(tiny_dermmel, max_epochs=epochs), "test=false", *extra], out)
    run(cfg)
    return out / "checkpoints" / "last.ckpt"


def _ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_precision_auto_is_resolved_logged_and_stored(tiny_dermmel, tmp_path, monkeypatch, caplog):
    # a CPU with AMX and a model wide enough for bf16 to pay there (the threshold lowered to the
    # test model's width): auto must pick bf16-mixed, and the run must really train under it
    monkeypatch.setattr(P, "cpu_flags", lambda *a: {"avx2", "amx_bf16"})
    monkeypatch.setattr(P, "BF16_CPU_MIN_EMBED_DIM", 16)
    with caplog.at_level(logging.INFO):
        last = _run(tiny_dermmel, tmp_path / "amx")
    ckpt = _ckpt(last)
    assert ckpt["melanoma"]["config"]["trainer"]["precision"] == "bf16-mixed"
    assert ckpt["melanoma"]["config"]["trainer"]["precision"] == "bf16-mixed"
    assert any("precision" in r.getMessage() and "bf16-mixed" in r.getMessage() for r in caplog.records)

    monkeypatch.setattr(P, "cpu_flags", lambda *a: {"avx2"})
    ckpt = _ckpt(_run(tiny_dermmel, tmp_path / "avx2"))
    assert ckpt["melanoma"]["config"]["trainer"]["precision"] == "32-true"

    # the same machine with the measured threshold: the narrow test model trains in fp32
    monkeypatch.undo()
    monkeypatch.setattr(P, "cpu_flags", lambda *a: {"avx2", "amx_bf16"})
    ckpt = _ckpt(_run(tiny_dermmel, tmp_path / "amx_narrow"))
    assert ckpt["melanoma"]["config"]["trainer"]["precision"] == "32-true"


def test_explicit_precision_is_kept(tiny_dermmel, tmp_path, monkeypatch):
    monkeypatch.setattr(P, "cpu_flags", lambda *a: {"avx2", "amx_bf16"})
    ckpt = _ckpt(_run(tiny_dermmel, tmp_path / "run", "trainer.precision=32-true"))
    assert ckpt["melanoma"]["config"]["trainer"]["precision"] == "32-true"


def test_compile_is_in_place_and_runs_compiled_code():
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    plain = LesionClassifier({"name": "vit_tiny", "kwargs": kw}, "dermmel", ["not_melanoma", "melanoma"])
    torch.manual_seed(0)
    module = LesionClassifier({"name": "vit_tiny", "kwargs": kw}, "dermmel", ["not_melanoma", "melanoma"],
                              compile=True, compile_backend=counting_backend)
    assert list(module.state_dict()) == list(plain.state_dict())
    assert all(is_compiled(b) for b in module.model.backbone.blocks)
    module.load_state_dict(plain.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(module(x), plain(x), rtol=1e-5, atol=1e-5)
    assert graphs, "the compiled forward never went through the backend"
    with pytest.raises(ValueError, match="expected a VisionTransformer"):
        compile_backbone(torch.nn.Linear(2, 2))


def test_every_block_is_compiled_despite_per_block_drop_path_rates():
    """Stochastic depth gives each block its own drop_prob, a recompile each: with Dynamo's default
    limit of 8, blocks 9.. of a deeper ViT would silently run eagerly."""
    from melanoma.models import build_backbone

    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    depth = 12
    vit = build_backbone("vit_tiny", img_size=16, patch_size=8, embed_dim=16, depth=depth, num_heads=2,
                         drop_path_rate=0.1)
    compile_backbone(vit, backend=counting_backend)
    vit.train()
    vit.forward_features(torch.randn(2, 3, 16, 16))
    # one graph per block (each its own drop rate) plus patch_embed and norm; at the default
    # limit only 8 block graphs would be compiled
    assert len(graphs) >= depth + 2


def test_compiled_and_uncompiled_checkpoints_are_interchangeable(tiny_dermmel, tmp_path):
    torch._dynamo.reset()
    plain = _run(tiny_dermmel, tmp_path / "plain")
    compiled = _run(tiny_dermmel, tmp_path / "compiled", *COMPILE)
    a, b = _ckpt(plain), _ckpt(compiled)
    assert list(a["state_dict"]) == list(b["state_dict"])
    assert not any("_orig_mod" in k for k in b["state_dict"])
    # same seed, same data: the compiled run trained the same weights (aot_eager is exact to rounding)
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=1e-4, atol=1e-5)

    # predict / export path: an uncompiled Classifier loads the compiled run's checkpoint strictly
    model, _ = Classifier.from_checkpoint(compiled)
    assert not any(is_compiled(m) for m in model.modules())

    # resume each from the other's checkpoint, one more epoch
    resumed_c = _run(tiny_dermmel, tmp_path / "resume_c", *COMPILE, f"ckpt_path={plain}", epochs=2)
    resumed_p = _run(tiny_dermmel, tmp_path / "resume_p", f"ckpt_path={compiled}", epochs=2)
    assert _ckpt(resumed_c)["global_step"] == _ckpt(resumed_p)["global_step"] == 2 * a["global_step"]

    # init_from a compiled run into a compiled one starts from its weights
    cfg = compose_cfg([*tiny_overrides(tiny_dermmel, max_epochs=1), *COMPILE, f"model.init_from={compiled}"],
                      tmp_path / "init")
    module = module_from_cfg(cfg, "dermmel", b["melanoma"]["heads"]["dermmel"]["spec"]["class_names"])
    module.load_initial_weights()
    for k, v in module.model.state_dict().items():
        torch.testing.assert_close(v, b["state_dict"]["model." + k])


def test_progress_bar_shows_the_loss_without_a_per_step_sync():
    """prog_bar values are turned into Python numbers after every batch (a host sync); the loss
    must not be one of them, and the bar must still show it."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader, TensorDataset

    from melanoma.training.metrics import TRAIN_LOSS_STEP
    from melanoma.training.progress import TrainProgressBar

    seen = []

    class Look(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((dict(trainer.progress_bar_metrics), bar.get_metrics(trainer, pl_module)))

    cfg = compose_cfg(tiny_overrides(Path("unused")), Path("unused_run"))
    module = module_from_cfg(cfg, "dermmel", ["not_melanoma", "melanoma"])
    data = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.tensor([0, 1] * 4)), batch_size=4)
    bar = TrainProgressBar(refresh_rate=1)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, callbacks=[bar, Look()])
    trainer.fit(module, data)
    assert len(seen) == 2
    for pbar_metrics, shown in seen:
        assert not any(k.startswith("train/loss") for k in pbar_metrics)
        assert float(shown[TRAIN_LOSS_STEP]) > 0


def test_step_values_logged_only_when_written_still_reach_every_logged_step(tiny_dermmel, tmp_path):
    """grad norm and per-layer LR are logged only on the steps the loggers write; the CSV must
    still hold them on exactly the steps that hold the per-step loss."""
    import pandas as pd

    cfg = compose_cfg([*tiny_overrides(tiny_dermmel, max_epochs=3, batch_size=4), "trainer.log_every_n_steps=3",
                       "test=false"], tmp_path / "run")
    run(cfg)
    m = pd.read_csv(tmp_path / "run" / "csv" / "metrics.csv")
    loss_steps = set(m.loc[m["train/loss_step"].notna(), "step"])
    assert len(loss_steps) >= 3
    assert set(m.loc[m["train/grad_norm"].notna(), "step"]) == loss_steps
    assert set(m.loc[m["lr/head"].notna(), "step"]) == loss_steps


def test_host_sync_counter_counts_what_would_stall_a_gpu():
    from melanoma.training.debug import HostSyncCounter
    from melanoma.training.host import HostCopy

    x = torch.arange(6.0)
    original = torch.Tensor.tolist
    with HostSyncCounter() as counter:
        y = (x * 2 + 1).softmax(0)  # device work only
        assert not counter.events
        float(y.sum())
        bool(x.any())
        x.tolist()
        x[x > 2]
        torch.bincount(x.long())
        # torch's AdamW reads its step counter, which lives on the host even for GPU parameters
        w = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.AdamW([w])
        w.sum().backward()
        opt.step()
        # ... but a read in the closure the optimizer runs (Lightning's training step) counts
        opt.step(lambda: float(w.sum()))
        # a sampler's permutation is drawn on the host in any run
        list(torch.utils.data.RandomSampler(range(5)))
        # a value copied to the host without waiting is read without a sync
        copy = HostCopy(y.sum())
        assert float(copy.value()) == pytest.approx(float(y.sum())) and copy.value().tolist() > 0
    assert len(counter.events) == 7  # the float(y.sum()) just above, not the copy's reads
    counter.events.pop()
    assert [op for op, _ in counter.events] == ["_local_scalar_dense", "_local_scalar_dense", "tolist",
                                                 "index (boolean mask)", "bincount", "_local_scalar_dense"]
    assert torch.Tensor.tolist is original


@pytest.mark.parametrize("extra", [[], ["callbacks=unfreezing", "ema=on"]], ids=["default", "unfreezing+ema"])
def test_training_steps_between_log_writes_make_no_host_sync(tiny_dermmel, tmp_path, extra):
    """On a GPU every read of a device value into Python (item, bool, tolist, a data-dependent
    shape) makes the host wait for the queue to drain, and the GPU then idles while Python catches
    up. A step the loggers do not write and the progress bar does not redraw must read nothing:
    not the metrics, the NaN/Inf guard, the gradient norm, the learning rates or EMA."""
    import json

    skipped = ("trainer.enable_progress_bar", "callbacks.progress_bar", "trainer.log_every_n_steps")
    overrides = [o for o in tiny_overrides(tiny_dermmel, max_epochs=1, batch_size=2) if not o.startswith(skipped)]
    out = tmp_path / "syncs.json"
    cfg = compose_cfg([*overrides, *extra, "trainer.log_every_n_steps=4", "test=false",
                       "+callbacks.syncs._target_=melanoma.training.debug.CountHostSyncs",
                       "+callbacks.syncs.start=1", f"+callbacks.syncs.out={out}"], tmp_path / "run")
    run(cfg)
    steps = json.loads(out.read_text())  # batches 1..7 of 8 (16 train images, batch 2)
    assert len(steps) == 7
    logged = {3, 7}  # the logger writes batches 3 and 7 (every 4th); the bar redraws at the last
    # without a sync: it reads the previous step's loss, copied to the host without waiting
    quiet = {b: steps[b - 1] for b in range(1, 8) if b not in logged}
    assert quiet == {b: [] for b in quiet}
    # the counter sees the syncs that writing a log does cost
    assert steps[3 - 1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_host_copy_of_a_cuda_value_reads_it_after_the_copy():
    from melanoma.training.host import HostCopy, is_host_copy

    x = torch.arange(1000.0, device="cuda")
    copy = HostCopy(x.sum())
    a = torch.randn(2048, 2048, device="cuda")
    for _ in range(20):  # more work queued after the copy: value() waits for the copy only
        a = (a @ a).tanh()
    value = copy.value()
    assert value.device.type == "cpu" and is_host_copy(value) and value.item() == 499500.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_configured_adamw_is_fused_on_a_gpu():
    cfg = compose_cfg(tiny_overrides(Path("unused")), Path("unused_run"))
    module = module_from_cfg(cfg, "dermmel", ["not_melanoma", "melanoma"]).cuda()
    configured = module.configure_optimizers()
    opt = configured["optimizer"] if isinstance(configured, dict) else configured
    assert opt.defaults["fused"] is True
