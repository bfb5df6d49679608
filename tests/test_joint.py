"""dataset=joint: one backbone, one head per member, a seeded member schedule, per-member metrics,
per-head checkpoint records, and the cross-member overlap drop."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import compose_cfg, tiny_model_overrides, tiny_trainer_overrides

from melanoma.cli import main
from melanoma.data.joint import JointDataModule, ScheduledLoader, member_override_pairs, member_schedule, mix_weights
from melanoma.data.overlap import image_id
from melanoma.models.checkpoint import read_meta
from melanoma.workflows.training_run import run

JOINT_TINY = ["dataset=joint", "model=vit_tiny", "logger=csv", "dataset.image_size=32", "dataset.batch_size=4",
              "dataset.num_workers=0", "dataset.pin_memory=false", "dataset.persistent_workers=false"]


# --- the member schedule -------------------------------------------------------------------

def test_schedule_is_a_function_of_seed_and_epoch_and_follows_the_mix():
    a = member_schedule([3, 1], 40, seed=7, epoch=2)
    assert np.array_equal(a, member_schedule([3, 1], 40, seed=7, epoch=2))  # what every rank computes
    assert not np.array_equal(a, member_schedule([3, 1], 40, seed=7, epoch=3))
    assert not np.array_equal(a, member_schedule([3, 1], 40, seed=8, epoch=2))
    assert Counter(a.tolist()) == {0: 30, 1: 10}
    assert Counter(member_schedule([1, 1, 1], 10, 0, 0).tolist()) == {0: 4, 1: 3, 2: 3}
    names, batches = ["ham10000", "ph2"], [9, 3]
    assert mix_weights("proportional", names, batches).tolist() == [0.75, 0.25]
    assert mix_weights("uniform", names, batches).tolist() == [0.5, 0.5]
    assert mix_weights({"ham10000": 1, "ph2": 3}, names, batches).tolist() == [0.25, 0.75]
    with pytest.raises(ValueError, match="every member"):
        mix_weights({"ham10000": 1}, names, batches)
    with pytest.raises(ValueError, match="proportional"):
        mix_weights("balanced", names, batches)


def test_ranks_draw_the_same_member_each_step_from_their_own_shard():
    # rank r's shard of member m: batches (m, r, k); a short member (b) cycles under a uniform mix
    def loader(rank):
        loaders = {"a": [(torch.tensor([0, rank, k]), torch.tensor([0])) for k in range(6)],
                   "b": [(torch.tensor([1, rank, k]), torch.tensor([1])) for k in range(2)]}
        sl = ScheduledLoader(loaders, [0.5, 0.5], seed=3)
        sl.sampler.set_epoch(4)
        return list(sl)

    r0, r1 = loader(0), loader(1)
    assert len(r0) == len(r1) == 8
    assert [n for _, _, n in r0] == [n for _, _, n in r1]
    assert Counter(n for _, _, n in r0) == {"a": 4, "b": 4}
    for (x0, y0, n), (x1, _, _) in zip(r0, r1):
        assert x0[1] == 0 and x1[1] == 1 and int(y0) == (0 if n == "a" else 1)


def test_member_overrides_mapping_or_strings():
    assert member_override_pairs({"ph2": {"root": "/d", "augment": {"hflip": 0.5}}}) == \
        {"ph2": [("root", "/d"), ("augment.hflip", 0.5)]}
    assert member_override_pairs(["ph2.root=/d", "ham10000.label_set=dx"]) == \
        {"ph2": [("root", "/d")], "ham10000": [("label_set", "dx")]}
    with pytest.raises(ValueError, match="ph2.root=DIR"):
        member_override_pairs(["root=/d"])


# --- data ----------------------------------------------------------------------------------

def test_joint_config_composes_each_member_from_its_own_config(tmp_path):
    from melanoma.config import compose_config
    from melanoma.workflows.datasets import instantiate_dataset, member_configs

    cfg = compose_config(["dataset=joint", "dataset.members=[ham10000,ph2]", f"paths.data_dir={tmp_path}",
                          "paths.output_dir=unused", "dataset.image_size=64", "+dataset.member_overrides.ph2.seed=7",
                          "dataset.mix={ham10000: 1, ph2: 2}"])
    dm = instantiate_dataset(cfg.dataset, mean=[0.5] * 3, std=[0.25] * 3)
    assert isinstance(dm, JointDataModule) and list(dm.members) == ["ham10000", "ph2"]
    ham, ph2 = dm.members["ham10000"], dm.members["ph2"]
    assert ham.root == tmp_path / "HAM10000" and ph2.root == tmp_path / "PH2Dataset"  # paths.data_dir
    assert dm.class_names_by_member == {"ham10000": ["not_melanoma", "melanoma"],
                                        "ph2": ["common_nevus", "atypical_nevus", "melanoma"]}
    assert ham.image_size == ph2.image_size == 64 and ph2.batch_size == ham.batch_size == cfg.dataset.batch_size
    assert ph2.seed == 7 and ham.seed == 42 and ph2.mean == (0.5, 0.5, 0.5)
    assert dm.member_configs["ph2"]["_target_"] == "melanoma.data.ph2.PH2DataModule"
    assert dm.member_configs["ph2"]["seed"] == 7 and dm.member_configs["ph2"]["image_size"] == 64
    assert dm.mix == {"ham10000": 1, "ph2": 2}
    with pytest.raises(ValueError, match="not members"):
        member_configs(["ham10000", "ph2"], str(tmp_path), {"isic": {"root": "x"}})
    with pytest.raises(ValueError, match="at least two"):
        JointDataModule(["ph2"], member_configs=member_configs(["ph2"], str(tmp_path)))
    with pytest.raises(ValueError, match="instantiate_dataset"):  # data/ composes no configs itself
        JointDataModule(["ham10000", "ph2"])


def _joint_dm(ham_root, second: str, second_root, **kw) -> JointDataModule:
    from melanoma.workflows.datasets import member_configs

    over = {"ham10000": {"root": str(ham_root)}, second: {"root": str(second_root)}}
    return JointDataModule(["ham10000", second], member_configs=member_configs(["ham10000", second], None, over),
                           image_size=32, batch_size=4, num_workers=0, pin_memory=False, persistent_workers=False, **kw)


def _held_out_and_dermmel_copy(ham_root, tiny_dermmel, tmp_path, split: str):
    """A HAM10000 image the joint run holds out in `split`, and a copy of the DermMel tree to
    plant it in."""
    ham = _joint_dm(ham_root, "dermmel", tiny_dermmel).members["ham10000"]
    ham.setup()
    dermmel = tmp_path / "dermmel"
    shutil.copytree(tiny_dermmel, dermmel)
    return ham.split_table(split)["path"].iloc[0], dermmel


def test_overlap_across_members_is_reported_and_dropped_from_train(ham_root, tiny_dermmel, tmp_path):
    held_out, dermmel = _held_out_and_dermmel_copy(ham_root, tiny_dermmel, tmp_path, "test")
    # plant the HAM10000 test image in DermMel's training folder, under its ISIC name
    planted = dermmel / "DermMel" / "train_sep" / "Melanoma" / f"{image_id(held_out)}.jpeg"
    shutil.copy(held_out, planted)

    dm = _joint_dm(ham_root, "dermmel", dermmel)
    dm.setup()
    assert dm.overlap[["image_id", "held_out_dataset", "held_out_split", "train_dataset"]].values.tolist() == \
        [[image_id(held_out), "ham10000", "test", "dermmel"]]
    train = dm.members["dermmel"].split_table("train")["path"].map(image_id).tolist()
    assert image_id(held_out) not in train
    assert image_id(held_out) in dm.members["ham10000"].split_table("test")["path"].map(image_id).tolist()
    # the head's record is the member's own split (as evaluate rebuilds it), with the drop noted
    assert dm.split_descriptions["dermmel"]["counts"]["train"] == 17
    assert dm.split_descriptions["dermmel"]["dropped_from_train"] == 1
    # evaluating the head after fit sees the recorded split, not the thinned training table
    assert dm.members["dermmel"].split_fingerprint() != dm.split_descriptions["dermmel"]["fingerprint"]
    assert dm.evaluation_member("dermmel").split_fingerprint() == dm.split_descriptions["dermmel"]["fingerprint"]
    assert len(dm.members["dermmel"].split_table("train")) == 16

    kept = _joint_dm(ham_root, "dermmel", dermmel, drop_overlap=False)
    kept.setup()
    assert len(kept.overlap) == 1 and len(kept.members["dermmel"].split_table("train")) == 17


def test_a_renamed_flipped_copy_is_found_by_content_and_dropped_from_train(ham_root, tiny_dermmel, tmp_path):
    from PIL import Image, ImageOps

    held_out, dermmel = _held_out_and_dermmel_copy(ham_root, tiny_dermmel, tmp_path, "test")
    planted = dermmel / "DermMel" / "train_sep" / "Melanoma" / "AUG_0_999.jpeg"  # DermMel's naming
    ImageOps.mirror(Image.open(held_out)).resize((80, 60)).save(planted, quality=90)
    dm = _joint_dm(ham_root, "dermmel", dermmel)
    dm.setup()
    hits = dm.overlap[dm.overlap.train_path == str(planted)]
    assert hits[["image_id", "held_out_dataset", "held_out_split", "match"]].values.tolist() == \
        [[image_id(held_out), "ham10000", "test", "content"]]
    assert str(planted) not in dm.members["dermmel"].split_table("train")["path"].tolist()


def test_check_data_on_a_joint_config_reports_the_overlap(ham_root, tiny_dermmel, tmp_path, capsys):
    held_out, dermmel = _held_out_and_dermmel_copy(ham_root, tiny_dermmel, tmp_path, "val")
    shutil.copy(held_out, dermmel / "DermMel" / "train_sep" / "NotMelanoma" / f"{image_id(held_out)}.jpg")
    args = ["check-data", "dataset=joint", "dataset.members=[ham10000,dermmel]", "dataset.image_size=32",
            f"+dataset.member_overrides.ham10000.root={ham_root}", f"+dataset.member_overrides.dermmel.root={dermmel}",
            "-q"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "ham10000:" in err and "dermmel:" in err and "1 image(s) held out" in err
    assert image_id(held_out) in out and "val" in out


# --- a joint training run ------------------------------------------------------------------

@pytest.fixture(scope="module")
def joint_run(ham_root, ph2_flat_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("joint_run")
    cfg = compose_cfg([*JOINT_TINY, "dataset.members=[ham10000,ph2]",
                       f"+dataset.member_overrides.ham10000.root={ham_root}",
                       f"+dataset.member_overrides.ph2.root={ph2_flat_root}", "model.loss.class_weights=true",
                       *tiny_model_overrides(), *tiny_trainer_overrides(max_epochs=1)], out)
    score = run(cfg)
    return out, cfg, score


def test_joint_run_trains_both_heads_and_logs_per_member(joint_run):
    out, cfg, score = joint_run
    assert cfg.optimized_metric == "val/mean/bal_acc"
    assert score is not None and 0.0 <= score <= 1.0
    keys = pd.read_csv(out / "csv" / "metrics.csv").columns.tolist()
    for stage in ("val", "test"):
        for name in ("ham10000", "ph2", "mean"):
            for metric in ("bal_acc", "acc", "loss"):
                assert f"{stage}/{name}/{metric}" in keys, (stage, name, metric)
    assert "val/ham10000/auroc" in keys and "val/ph2/auroc" in keys
    # train metrics exist per head only when that head got training batches: both heads trained
    assert "train/ham10000/bal_acc" in keys and "train/ph2/bal_acc" in keys
    assert "val/bal_acc" not in keys  # a key means one thing: no unnamed joint metric
    test = json.loads((out / "test" / "metrics.json").read_text())
    assert test["test/mean/bal_acc"] == pytest.approx((test["test/ham10000/bal_acc"] + test["test/ph2/bal_acc"]) / 2)
    assert (out / "splits_ham10000.csv").is_file() and (out / "splits_ph2.csv").is_file()


def test_joint_checkpoint_records_every_member_head(joint_run, ham_root, ph2_flat_root):
    out, cfg, _ = joint_run
    ckpt = out / "checkpoints" / "best.ckpt"
    state = torch.load(ckpt, weights_only=True, map_location="cpu")["state_dict"]
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    meta = read_meta(ckpt)
    assert set(meta.heads) == {"ham10000", "ph2"}
    assert meta.heads["ph2"].class_names == ["common_nevus", "atypical_nevus", "melanoma"]
    assert meta.heads["ham10000"].class_names == ["not_melanoma", "melanoma"]
    for name, root, target in (("ham10000", ham_root, "melanoma.data.ham10000.HAM10000DataModule"),
                               ("ph2", ph2_flat_root, "melanoma.data.ph2.PH2DataModule")):
        data = meta.heads[name].data
        assert data.dataset == name and data.config["_target_"] == target
        assert data.config["root"] == str(root) and data.config["image_size"] == 32
        assert data.fingerprint and sum(data.counts.values()) > 0
        assert data.prior is not None and sum(data.prior) == pytest.approx(1.0)
        # each head's loss weighted by its own member's train split (model.loss.class_weights)
        assert len(data.class_weights) == len(meta.heads[name].class_names)
        assert sum(w * p for w, p in zip(data.class_weights, data.prior)) == pytest.approx(1.0, abs=1e-5)
        assert torch.isfinite(state[f"model.heads.{name}.fc.weight"]).all()
        assert f"model.heads.{name}.fc.weight" in last


def test_predict_and_evaluate_per_head(joint_run, ham_root, ph2_flat_root, tiny_dermmel, tmp_path):
    out, _, _ = joint_run
    ckpt = out / "checkpoints" / "best.ckpt"
    images = {"ham10000": sorted(ham_root.rglob("*.jpg"))[0], "ph2": sorted(ph2_flat_root.rglob("*.jpg"))[0]}
    expected = {"ham10000": {"not_melanoma", "melanoma"}, "ph2": {"common_nevus", "atypical_nevus", "melanoma"}}
    for head, image in images.items():
        pred = tmp_path / f"{head}.json"
        assert main(["predict", str(ckpt), str(image), "--head", head, "--out", str(pred), "-q"]) == 0
        result = json.loads(pred.read_text())
        assert result["head"] == head and set(result["class_names"]) == expected[head]
        assert len(result["predictions"]) == 1
    # evaluate rebuilds the ph2 member's split alone from its record (no overrides needed)
    assert main(["evaluate", str(ckpt), "--head", "ph2", "--out", str(tmp_path / "eval_ph2"), "-q"]) == 0
    assert read_meta(ckpt).heads["ph2"].calibration is not None
    # an external set through one chosen head (PH2's 3 classes scored as melanoma vs rest)
    assert main(["evaluate", str(ckpt), "dataset=dermmel", f"dataset.root={tiny_dermmel}", "--external",
                 "--head", "ph2", "--out", str(tmp_path / "ext_ph2"), "-q"]) == 0
    assert any((tmp_path / "ext_ph2").iterdir())


def test_joint_run_resumes_from_last_checkpoint(joint_run, tmp_path):
    out, cfg, _ = joint_run
    from helpers import set_key

    set_key(cfg, "trainer.max_epochs", 2)
    set_key(cfg, "ckpt_path", str(out / "checkpoints" / "last.ckpt"))
    set_key(cfg, "paths.output_dir", str(tmp_path / "resumed"))
    set_key(cfg, "test", False)
    run(cfg)
    last = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    first = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    # one more epoch of the same length, on the same member splits (resume checks their fingerprints)
    assert (last["epoch"], last["global_step"]) == (first["epoch"] + 1, 2 * first["global_step"])
    # the split fingerprints live once in the file, in the checkpoint contract's head records
    assert "JointDataModule" not in last
    resumed, before = read_meta(tmp_path / "resumed" / "checkpoints" / "last.ckpt"), read_meta(out / "checkpoints" / "last.ckpt")
    assert set(resumed.heads) == {"ham10000", "ph2"}
    assert {n: h.data.fingerprint for n, h in resumed.heads.items()} == {n: h.data.fingerprint for n, h in before.heads.items()}


@pytest.mark.slow
def test_ddp_two_processes_joint_run_ends_with_identical_parameters(ham_root, ph2_flat_root, tmp_path):
    """Both ranks follow one member schedule (else DDP's all-reduce would pair different heads or
    hang), so they end with the same weights, every head included."""
    from helpers import run_train_py

    run_dir = tmp_path / "run"
    run_train_py([*JOINT_TINY, "dataset.members=[ham10000,ph2]",
                  f"+dataset.member_overrides.ham10000.root={ham_root}",
                  f"+dataset.member_overrides.ph2.root={ph2_flat_root}",
                  *tiny_model_overrides(), *tiny_trainer_overrides(max_epochs=1), "trainer.devices=2",
                  "test=false", "+callbacks.rec._target_=melanoma.training.debug.RecordTraining",
                  "+callbacks.rec.out_dir=${paths.output_dir}/rec", f"hydra.run.dir={run_dir}"],
                 cwd=tmp_path, timeout=400)
    rec = run_dir / "rec"
    p0 = torch.load(rec / "params_rank0.pt", weights_only=True)
    p1 = torch.load(rec / "params_rank1.pt", weights_only=True)
    start = torch.load(rec / "params_start_rank0.pt", weights_only=True)
    assert p0.keys() == p1.keys() and {"heads.ham10000.fc.weight", "heads.ph2.fc.weight"} <= set(p0)
    for k in p0:
        assert torch.equal(p0[k], p1[k]), f"{k} differs between ranks"
    for name in ("ham10000", "ph2"):  # each head trained on its own member's batches
        assert not torch.equal(p0[f"heads.{name}.fc.weight"], start[f"heads.{name}.fc.weight"])


@pytest.mark.slow
def test_joint_run_on_the_shared_ham10000_and_ph2_images(ham10000_root, ph2_table, tmp_path):
    """The real data beside the project (skips without it): both heads train (a uniform mix draws
    both members in a few steps), per-member metrics are logged, and `predict --head` works for
    each head on that member's own images."""
    out = tmp_path / "run"
    cfg = compose_cfg([*JOINT_TINY, "dataset.members=[ham10000,ph2]", "dataset.mix=uniform",
                       f"+dataset.member_overrides.ham10000.root={ham10000_root}",
                       f"+dataset.member_overrides.ph2.root={ph2_table.parent}",
                       *tiny_model_overrides(), *tiny_trainer_overrides(max_epochs=1),
                       "+trainer.limit_train_batches=6", "trainer.limit_val_batches=2", "+trainer.limit_test_batches=2"],
                      out)
    run(cfg)
    ckpt = out / "checkpoints" / "last.ckpt"
    meta = read_meta(ckpt)
    assert set(meta.heads) == {"ham10000", "ph2"}
    assert meta.heads["ham10000"].data.counts["train"] > 6000 and meta.heads["ph2"].data.counts["test"] == 40
    keys = pd.read_csv(out / "csv" / "metrics.csv").columns.tolist()
    assert {"val/ham10000/bal_acc", "val/ph2/bal_acc", "val/mean/bal_acc"} <= set(keys)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    # both heads trained: their biases (initialised to zero) moved
    assert all(state[f"model.heads.{h}.fc.bias"].abs().sum() > 0 for h in ("ham10000", "ph2"))
    images = {"ham10000": sorted((ham10000_root / "HAM10000_images_part_1").glob("*.jpg"))[:2],
              "ph2": sorted((ph2_table.parent / "images").glob("*.jpg"))[:2]}
    for head, paths in images.items():
        result = tmp_path / f"{head}.json"
        assert main(["predict", str(ckpt), *map(str, paths), "--head", head, "--out", str(result), "-q"]) == 0
        rows = json.loads(result.read_text())["predictions"]
        assert len(rows) == 2 and all(r["error"] is None for r in rows)
        assert {f"prob_{c}" for c in meta.heads[head].class_names} <= set(rows[0])
