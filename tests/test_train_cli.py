"""train.py end to end in subprocesses: DDP on 2 CPU processes, kill -9 and resume, multirun,
Optuna. Slow (each starts Python, torch and Lightning) but essential: they run in CI."""

import json

import pytest
import torch

from helpers import run_train_py, tiny_overrides

pytestmark = pytest.mark.slow


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_multirun_of_two_ddp_jobs_each_own_folder_identical_params_after_unfreeze(tiny_dermmel, tmp_path):
    """A basic multirun of two jobs, each DDP over 2 CPU processes (gloo): each job writes its
    own folder from rank zero, and the layer thawed after DDP wrapped the model is identical on
    both ranks. (One test for both: each train.py start costs ~10 s of the test budget.)"""
    sweep = tmp_path / "sweep"
    # batch 4 x 2 ranks: each rank sees different images, so only all-reduced grads keep them equal
    run_train_py(["-m", *tiny_overrides(tiny_dermmel, max_epochs=2, batch_size=4), "trainer.devices=2",
                  "model.optimizer.lr=1e-4,3e-4", "callbacks=unfreezing", "callbacks.unfreezing.start_epoch=1",
                  "+callbacks.rec._target_=melanoma.training.debug.RecordTraining",
                  "+callbacks.rec.out_dir=${paths.output_dir}/rec", f"hydra.sweep.dir={sweep}"],
                 cwd=tmp_path, timeout=400)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "multirun.yaml"]
    for job, lr in (("0", 1e-4), ("1", 3e-4)):
        run_dir, rec = sweep / job, sweep / job / "rec"
        ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["melanoma"]["config"]["model"]["optimizer"]["lr"] == lr
        assert (run_dir / ".hydra" / "config.yaml").is_file()
        assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "checkpoints" / "best.ckpt").is_file()
        assert (run_dir / "csv" / "metrics.csv").is_file() and (run_dir / "test" / "metrics.json").is_file()
        for rank in (0, 1):
            stages = _records(rec / f"stages_rank{rank}.jsonl")
            assert [s["layers"] for s in stages] == [["head"], ["head", "norm"]]
        p0, p1 = torch.load(rec / "params_rank0.pt", weights_only=True), torch.load(rec / "params_rank1.pt", weights_only=True)
        start = torch.load(rec / "params_start_rank0.pt", weights_only=True)
        for k in p0:
            assert torch.equal(p0[k], p1[k]), f"job {job}: {k} differs between ranks"
        # the layer thawed after DDP wrapped the model did train (so it was all-reduced)
        assert not torch.equal(p0["backbone.norm.weight"], start["backbone.norm.weight"])
        assert torch.equal(p0["backbone.blocks.0.attn.qkv.weight"], start["backbone.blocks.0.attn.qkv.weight"])


def test_single_ddp_run_relaunches_into_one_run_folder_with_identical_params(tiny_dermmel, tmp_path):
    """A plain run (not -m) with trainer.devices=2: Lightning relaunches train.py for rank 1, which
    must write into rank 0's run folder, not a new timestamped one; both ranks end equal. The run
    folder comes from the default hydra.run.dir (runs/<task>/<time>), as a user would get it."""
    run_train_py([*tiny_overrides(tiny_dermmel, max_epochs=1, batch_size=4), "trainer.devices=2", "test=false",
                  "+callbacks.rec._target_=melanoma.training.debug.RecordTraining",
                  "+callbacks.rec.out_dir=${paths.output_dir}/rec"], cwd=tmp_path, timeout=300)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    run_dirs = [p for p in (tmp_path / "runs").glob("*/*") if p.is_dir()]
    assert len(run_dirs) == 1, run_dirs
    run_dir = run_dirs[0]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    rec = run_dir / "rec"
    p0, p1 = torch.load(rec / "params_rank0.pt", weights_only=True), torch.load(rec / "params_rank1.pt", weights_only=True)
    start = torch.load(rec / "params_start_rank0.pt", weights_only=True)
    assert p0.keys() == p1.keys()
    for k in p0:
        assert torch.equal(p0[k], p1[k]), f"{k} differs between ranks"
    assert not torch.equal(p0["backbone.blocks.0.attn.qkv.weight"], start["backbone.blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("extra", [[], ["+callbacks.model_checkpoint.save_on_exception=true",
                                        "+callbacks.last_checkpoint.save_on_exception=true"]],
                         ids=["default", "save_on_exception"])
def test_ddp_non_finite_loss_on_one_rank_stops_both_before_a_bad_checkpoint(tiny_dermmel, tmp_path, extra):
    """Rank 1's head turns NaN before step 1; the guard reads each step's verdict one step late,
    summed over the ranks, so both processes stop at the same point (no rank left waiting in an
    all-reduce: the run ends well within the timeout) and no checkpoint holds the bad step, also
    when the checkpoint callbacks save on exceptions."""
    import math

    run_dir = tmp_path / "run"
    proc = run_train_py([*tiny_overrides(tiny_dermmel, max_epochs=2, batch_size=4), "trainer.devices=2", "test=false",
                         *extra,
                         "callbacks.last_checkpoint.every_n_train_steps=1",
                         "+callbacks.rec._target_=melanoma.training.debug.RecordTraining",
                         f"+callbacks.rec.out_dir={tmp_path / 'rec'}", "+callbacks.rec.nan_at_step=1",
                         "+callbacks.rec.nan_rank=1", f"hydra.run.dir={run_dir}"],
                        cwd=tmp_path, timeout=300, check=False)
    assert proc.returncode != 0
    assert "NonFiniteLossError" in proc.stderr and "global step 1" in proc.stderr, proc.stderr[-3000:]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 1
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert math.isfinite(last["state_dict"]["model.heads.dermmel.fc.bias"].sum())
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt")) in (["last.ckpt"], ["best.ckpt", "last.ckpt"])


def test_kill9_mid_epoch_then_resume_reaches_same_step_and_stage(tiny_dermmel, tmp_path):
    # 16 train images, batch 4: 4 steps per epoch; last.ckpt every 2 steps; killed after step 7
    common = [*tiny_overrides(tiny_dermmel, max_epochs=3, batch_size=4), "callbacks=unfreezing",
              "callbacks.unfreezing.start_epoch=1", "callbacks.last_checkpoint.every_n_train_steps=2",
              "+callbacks.rec._target_=melanoma.training.debug.RecordTraining", "test=false"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_train_py([*common, f"+callbacks.rec.out_dir={full / 'rec'}", f"hydra.run.dir={full}"], cwd=tmp_path)
    proc = run_train_py([*common, f"+callbacks.rec.out_dir={killed / 'rec'}", "+callbacks.rec.kill_at_step=7",
                         f"hydra.run.dir={killed}"], cwd=tmp_path, check=False)
    assert proc.returncode == -9, proc.stderr[-3000:]
    last = killed / "checkpoints" / "last.ckpt"
    interrupted = torch.load(last, weights_only=True)
    assert interrupted["global_step"] == 6 and interrupted["epoch"] == 1
    run_train_py([*common, f"+callbacks.rec.out_dir={killed / 'rec2'}", f"ckpt_path={last}",
                  f"hydra.run.dir={killed}"], cwd=tmp_path)
    a = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["global_step"] == b["global_step"] == 12
    assert a["epoch"] == b["epoch"]
    full_stages = {s["epoch"]: s["layers"] for s in _records(full / "rec" / "stages_rank0.jsonl")}
    resumed = _records(killed / "rec2" / "stages_rank0.jsonl")
    # the resumed run re-enters epoch 1 at step 6 with exactly the stage it had
    assert resumed[0]["epoch"] == 1 and resumed[0]["global_step"] == 6
    for s in resumed:
        assert s["layers"] == full_stages[s["epoch"]]
    # optimizer state on the same parameters (thawed layers only), same group layout
    oa, ob = a["optimizer_states"][0], b["optimizer_states"][0]
    assert [g["layer"] for g in oa["param_groups"]] == [g["layer"] for g in ob["param_groups"]]
    assert sorted(oa["state"]) == sorted(ob["state"])
    assert [int(oa["state"][i]["step"]) for i in sorted(oa["state"])] == \
           [int(ob["state"][i]["step"]) for i in sorted(ob["state"])]


def test_optuna_two_trials(tiny_dermmel, tmp_path):
    sweep = tmp_path / "optuna"
    run_train_py(["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2",
                  "hydra.sweeper.sampler.n_startup_trials=2", *tiny_overrides(tiny_dermmel, max_epochs=1),
                  f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    for job in ("0", "1"):
        assert (sweep / job / "checkpoints" / "best.ckpt").is_file()
    results = (sweep / "optimization_results.yaml").read_text()
    assert "best_params" in results and "model.optimizer.lr" in results
