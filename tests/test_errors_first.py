"""Errors before waits: what is cheap to check (config keys and value types, paths, the data root
and label files) is checked before a model is built or pretrained weights are fetched; a run that
fails before training leaves no run folder; a file that is not a melanoma checkpoint says what it is."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from helpers import compose_cfg, run_train_py, tiny_checkpoint
from melanoma.cli import main
from melanoma.config import compose_config, config_type_errors, unknown_override_hint
from melanoma.data.synthetic import SyntheticDataModule
from melanoma.models.checkpoint import CheckpointError, read_meta
from melanoma.config import GENERATING_DATASETS, remove_unused_run_dir
from melanoma.workflows.preflight import check_paths


# --- train.py from outside -------------------------------------------------------------------------

@pytest.mark.slow
def test_wrong_dataset_root_fails_naming_it_before_weights_and_leaves_no_run_folder(tmp_path):
    """Checked from outside as written in the issue: `python train.py dataset=ham10000
    dataset.root=/no/such/dir` (default model: DeiT-base from the hub, which must not be asked)."""
    missing = tmp_path / "no" / "such" / "dir"
    proc = run_train_py(["dataset=ham10000", f"dataset.root={missing}"], cwd=tmp_path, check=False,
                        env={"HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode != 0
    err = proc.stderr
    assert f"dataset root {missing} does not exist" in err, err[-3000:]
    assert "deit" not in err.lower() and "hub" not in err.lower()  # never got as far as the weights
    assert "Traceback" not in err and err.count("does not exist") == 1
    assert not (tmp_path / "runs").exists(), sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_wrong_value_type_is_named_with_its_key_and_typo_gets_did_you_mean(tmp_path):
    proc = run_train_py(["experiment=quickstart", "model.optimizer.lr=abc", f"dataset.root={tmp_path / 'syn'}"],
                        cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "model.optimizer.lr='abc': expected a number (default 0.001)" in proc.stderr
    assert not (tmp_path / "syn").exists() and not (tmp_path / "runs").exists()

    proc = run_train_py(["datset=ham10000"], cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "did you mean 'dataset'?" in proc.stderr
    assert "+datset" not in proc.stderr.replace("prefix it with +", "")


# --- the checks themselves -------------------------------------------------------------------------

def test_unknown_override_hint():
    assert "did you mean 'dataset'?" in unknown_override_hint(["datset=ham10000"])
    assert "did you mean 'dataset.root'?" in unknown_override_hint(["dataset.rot=/data"])
    assert "did you mean 'model.optimizer.lr'?" in unknown_override_hint(["model.optimzer.lr=1e-4"])
    fine = ["-m", "dataset=ham10000", "dataset.root=/x", "+anything=1", "model/optimizer=sgd", "ema=on",
            "experiment=quickstart", "hydra.run.dir=x", "trainer.max_epochs=2", "model.backbone.kwargs.depth=2",
            "print_report=true", "~logger", "hparams_search=optuna", "dataset.augment.scale=[0.5,1]",
            # Hydra's own keys (DDP relaunch, sweepers) and a global-package group config's keys
            "hydra.mode=RUN", "hydra.output_subdir=null", "hydra.sweeper.n_trials=2",
            "dataset.members=[ham10000,ph2]", "dataset.mix=uniform"]
    assert unknown_override_hint(fine) is None


def test_config_type_errors_name_the_key():
    defaults = compose_config(["dataset=ham10000"])
    bad = compose_cfg(["dataset=ham10000", "model.optimizer.lr=abc", "dataset.pin_memory=maybe",
                       "trainer.max_epochs=ten", "dataset.num_workers=2", "trainer.devices=auto",
                       "trainer.fast_dev_run=3", "dataset.root=/x"], Path("unused"))
    assert config_type_errors(defaults, bad) == [
        "dataset.pin_memory='maybe': expected true or false (default true)",
        "model.optimizer.lr='abc': expected a number (default 5e-05)",
        "trainer.max_epochs='ten': expected a number (default 30)",
    ]
    assert config_type_errors(defaults, defaults) == []


def test_check_paths_refuses_missing_files_but_passes_hub_names(tmp_path):
    cfg = OmegaConf.create({"ckpt_path": str(tmp_path / "last.ckpt"), "model": {"pretrained": None}})
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=.*last.ckpt: no such file"):
        check_paths(cfg)
    cfg = OmegaConf.create({"ckpt_path": None, "model": {"init_from": "runs/x/best.ckpt"}})
    with pytest.raises(FileNotFoundError, match="model.init_from=runs/x/best.ckpt: no such file"):
        check_paths(cfg)
    cfg = OmegaConf.create({"model": {"pretrained": str(tmp_path / "deit.pth")}})
    with pytest.raises(FileNotFoundError, match="model.pretrained=.*deit.pth: no such file"):
        check_paths(cfg)
    check_paths(OmegaConf.create({"model": {"pretrained": "deit_base_patch16_224"}}))  # a hub name: later


def test_remove_unused_run_dir_keeps_runs_that_wrote_something(tmp_path):
    runs = tmp_path / "runs"
    empty = runs / "train" / "2026-01-01_00-00-00"
    (empty / ".hydra").mkdir(parents=True)
    (empty / ".hydra" / "config.yaml").write_text("a: 1")
    (empty / "train.log").write_text("")
    assert remove_unused_run_dir(empty, runs)
    assert not runs.exists()  # runs/train and runs were left empty: gone too

    used = runs / "train" / "b"
    (used / "checkpoints").mkdir(parents=True)
    other = runs / "train" / "c"
    (other / ".hydra").mkdir(parents=True)
    assert not remove_unused_run_dir(used, runs) and used.is_dir()
    assert remove_unused_run_dir(other, runs) and not other.exists() and used.is_dir()


def test_synthetic_refuses_a_root_whose_parent_is_missing_and_creates_a_plain_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    counts = {"train": 2, "val": 1, "test": 1}
    typo = Path("/no/such/dir/synthetic")
    with pytest.raises(FileNotFoundError, match="does not exist, nor does its parent"):
        SyntheticDataModule(typo, counts=counts, generate_size=16).generate()
    assert not Path("/no/such").exists()
    outside = tmp_path.parent / f"{tmp_path.name}-missing" / "deeper" / "syn"
    with pytest.raises(FileNotFoundError):
        SyntheticDataModule(outside, counts=counts, generate_size=16).generate()
    # under the working directory (the default ./data/synthetic) or beside an existing folder: made
    assert (SyntheticDataModule("data/synthetic", counts=counts, generate_size=16).generate() / "DermMel").is_dir()
    assert (SyntheticDataModule(tmp_path / "x", counts=counts, generate_size=16).generate() / "DermMel").is_dir()


# --- not a melanoma checkpoint ---------------------------------------------------------------------

def _files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    from safetensors.torch import save_file

    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x08\x12\x07pytorch\x1a\x052.4.0:\x9a\x01\n onnx graph")
    text = tmp_path / "README.md"
    text.write_text("# melanoma\n\nVision Transformers ...\n")
    plain = tmp_path / "deit.pth"
    torch.save({"patch_embed.proj.weight": torch.zeros(2, 3), "cls_token": torch.zeros(1)}, plain)
    wrapped = tmp_path / "deit_official.pth"
    torch.save({"model": {"pos_embed": torch.zeros(1, 2)}}, wrapped)
    st = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(2)}, str(st))
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    return {
        "onnx": (onnx, "it is an ONNX model"),
        "text": (text, "it is a text file (it starts '# melanoma')"),
        "plain": (plain, "a plain state dict of 2 tensors (e.g. 'patch_embed.proj.weight')"),
        "wrapped": (wrapped, "a plain state dict of 1 tensors (e.g. 'pos_embed')"),
        "safetensors": (st, "a safetensors weights file"),
        "empty": (empty, "it is an empty file"),
    }


@pytest.mark.parametrize("kind", ["onnx", "text", "plain", "wrapped", "safetensors", "empty"])
def test_not_a_melanoma_checkpoint_says_what_the_file_is(tmp_path, kind):
    path, says = _files(tmp_path)[kind]
    with pytest.raises(CheckpointError) as err:
        read_meta(path)
    text = str(err.value)
    assert "is not a melanoma checkpoint" in text and says in text, text
    assert "Please file an issue" not in text and "weights_only" not in text
    if kind in ("plain", "wrapped", "safetensors"):
        assert "model.pretrained=FILE" in text


def test_cli_reports_a_text_file_given_as_checkpoint_in_one_line(tmp_path, capsys):
    path, _ = _files(tmp_path)["text"]
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    assert main(["predict", str(path), str(image), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a melanoma checkpoint: it is a text file" in err[0]


def test_a_real_checkpoint_still_reads(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "t.ckpt", {"synthetic": ["not_melanoma", "melanoma"]})
    assert read_meta(ckpt).active_head == "synthetic"


def test_generating_datasets_names_the_synthetic_module():
    """train.py's first-second root check skips the datasets that make their root: the names
    it knows (without importing melanoma.data) are the classes'."""
    assert f"{SyntheticDataModule.__module__}.{SyntheticDataModule.__qualname__}" in GENERATING_DATASETS
    for target in GENERATING_DATASETS:
        module, name = target.rsplit(".", 1)
        assert hasattr(__import__(module, fromlist=[name]), name)


def test_cli_overrides_get_did_you_mean_and_type_errors(capsys):
    assert main(["check-data", "datset=ph2", "-q"]) == 2
    assert "did you mean 'dataset'?" in capsys.readouterr().err
    assert main(["check-data", "dataset=ph2", "dataset.batch_size=many", "-q"]) == 2
    assert "dataset.batch_size='many': expected a number (default 16)" in capsys.readouterr().err
