"""model=timm: any timm model as the backbone, on tiny random weights saved to local files.

A small timm CNN (resnet10t; resnet18 for the command checked as written) and a small timm ViT
(vit_tiny_patch16_224 shrunk to 32 px, patch 8, dim 32, depth 2): train with layers thawing,
resume, LLRD groups from timm's group_matcher, calibrate, predict, export to ONNX and compare with
onnxruntime. Predict and export read only the checkpoint.
"""

import json

import pytest
import timm
import torch
from torch import nn

from helpers import (compose_cfg, onnx_agrees_with_checkpoint, run_train_py, tiny_dataset_overrides,
                     tiny_trainer_overrides)

from melanoma.cli import main
from melanoma.models import build_backbone
from melanoma.models.checkpoint import read_meta
from melanoma.models.pretrained import PretrainedWeightsError, load_pretrained, weights_provenance
from melanoma.models.timm_backbone import TimmGroupingError, _layer_map, timm_data_config
from melanoma.training import optim

VIT = "vit_tiny_patch16_224"
VIT_KW = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def timm_overrides(root, name: str, pretrained="null", max_epochs: int = 2, kwargs: dict | None = None) -> list[str]:
    kw = [f"model.backbone.kwargs.{k}={v}" for k, v in (kwargs or {}).items() if k != "img_size"]
    return ["dataset=dermmel", "model=timm", f"model.backbone.name={name}", f"model.pretrained={pretrained}",
            "logger=csv", *kw, *tiny_dataset_overrides(root), *tiny_trainer_overrides(max_epochs)]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random timm weights with their ImageNet classifier, as a user brings them: (cnn, vit) files."""
    out = tmp_path_factory.mktemp("timm_weights")
    torch.manual_seed(0)
    cnn = timm.create_model("resnet10t", num_classes=10)
    torch.save(cnn.state_dict(), out / "resnet10t.pth")
    vit = timm.create_model(VIT, num_classes=10, **VIT_KW)
    from safetensors.torch import save_file

    save_file(vit.state_dict(), str(out / "vit.safetensors"))
    return out / "resnet10t.pth", out / "vit.safetensors"


# --- the backbone itself ----------------------------------------------------------------------

def test_layer_groups_come_from_timms_group_matcher():
    cnn = build_backbone("resnet10t", family="timm", img_size=32)
    # resnet10t: the stem, then one block per stage (layer1.0 ... layer4.0)
    assert cnn.layer_groups() == ["stem", "block0", "block1", "block2", "block3"]
    assert cnn.layer_of("net.conv1.0.weight") == "stem"
    assert cnn.layer_of("net.layer3.0.conv1.weight") == "block2"
    assert {cnn.layer_of(n) for n, _ in cnn.named_parameters()} == set(cnn.layer_groups())
    vit = build_backbone(VIT, family="timm", **VIT_KW)
    assert vit.layer_groups() == ["stem", "block0", "block1"]
    assert vit.layer_of("net.pos_embed") == "stem" and vit.layer_of("net.blocks.1.attn.qkv.weight") == "block1"
    assert vit(torch.zeros(2, 3, 32, 32)).shape == (2, 32) and vit.embed_dim == 32
    # a CNN takes any size; the ViT was built for 32 px
    assert cnn(torch.zeros(1, 3, 48, 48)).shape == (1, cnn.embed_dim)


def test_layer_wise_lr_decay_follows_the_groups():
    cnn = build_backbone("resnet10t", family="timm")
    head = nn.Linear(cnn.embed_dim, 2)
    cfg = {"lr": 1.0, "weight_decay": 0.05, "head_lr": 10.0, "layer_decay": 0.5, "group_lr": {}}
    groups = optim.optimizer_groups(cnn, head, cfg)
    lr = {g["layer"]: g["lr"] for g in groups}
    # the top block at lr * 0.5, each block below halves it, the stem one step below block0
    assert lr == {"head": 10.0, "block3": 0.5, "block2": 0.25, "block1": 0.125, "block0": 0.0625, "stem": 0.03125}
    assert sum(len(g["params"]) for g in groups) == len(list(cnn.parameters())) + 2


def test_a_model_without_group_matcher_is_a_clear_error():
    class NoGroups(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

    with pytest.raises(TimmGroupingError, match="no group_matcher.*unfreezing"):
        _layer_map(NoGroups(), "some_model")
    with pytest.raises(ValueError, match="not a timm model"):
        build_backbone("resnet_does_not_exist", family="timm")


def test_local_weights_load_strictly_without_the_classifier(weights):
    cnn_file, vit_file = weights
    cnn = load_pretrained(build_backbone("resnet10t", family="timm"), cnn_file)
    source = torch.load(cnn_file, weights_only=True)
    assert torch.equal(cnn.net.conv1[0].weight, source["conv1.0.weight"])
    assert torch.equal(cnn.net.layer4[0].bn2.running_var, source["layer4.0.bn2.running_var"])
    vit = load_pretrained(build_backbone(VIT, family="timm", **VIT_KW), vit_file)
    from safetensors.torch import load_file

    assert torch.equal(vit.net.pos_embed, load_file(str(vit_file))["pos_embed"])
    # weights of another architecture: every mismatch named
    with pytest.raises(PretrainedWeightsError, match="do not fit timm's resnet18.*missing"):
        load_pretrained(build_backbone("resnet18", family="timm"), cnn_file)
    record = weights_provenance(cnn_file, "CC-BY-NC-4.0")
    import hashlib

    assert record == {"source": "file", "name": "resnet10t.pth", "license": "CC-BY-NC-4.0",
                      "sha256": hashlib.sha256(cnn_file.read_bytes()).hexdigest()}
    assert weights_provenance("resnet18.a1_in1k")["source"] == "hub"


def test_frozen_batch_norms_keep_their_statistics():
    cnn = build_backbone("resnet10t", family="timm")
    for name, p in cnn.named_parameters():
        p.requires_grad_(cnn.layer_of(name) == "block3")
    cnn.train()
    assert not cnn.net.bn1.training if hasattr(cnn.net, "bn1") else True
    assert not cnn.net.layer1[0].bn1.training and cnn.net.layer4[0].bn1.training
    before = cnn.net.layer1[0].bn1.running_mean.clone()
    cnn(torch.randn(4, 3, 32, 32) * 3 + 1)
    assert torch.equal(before, cnn.net.layer1[0].bn1.running_mean)


# --- through train.py, predict, evaluate and export --------------------------------------------

@pytest.mark.parametrize("name", ["resnet18", VIT])
def test_train_py_as_written_then_predict_and_export(name, tiny_dermmel, tmp_path, capsys):
    """`python train.py model=timm model.backbone.name=resnet18 model.pretrained=null
    callbacks=unfreezing ...`, then `melanoma predict` and `melanoma export --format onnx`; the
    same for a small timm ViT."""
    run_dir = tmp_path / "run"
    shrink = [f"model.backbone.kwargs.{k}={v}" for k, v in VIT_KW.items() if k != "img_size"] if name == VIT else []
    proc = run_train_py(["model=timm", f"model.backbone.name={name}", "model.pretrained=null", "callbacks=unfreezing",
                  *shrink, "dataset=dermmel", "logger=csv", "callbacks.unfreezing.warmup_steps=0",
                  *tiny_dataset_overrides(tiny_dermmel), *tiny_trainer_overrides(3), "test=false",
                  f"paths.output_dir={run_dir}"], cwd=tmp_path)
    # frozen layers' batch norms stay in eval mode on purpose: Lightning's warning about it is filtered
    assert "in eval mode at the start of training" not in proc.stderr + proc.stdout
    import pandas as pd

    m = pd.read_csv(run_dir / "csv" / "metrics.csv")
    counts = m["trainable_params"].dropna().tolist()
    assert len(counts) == 3 and counts[0] < counts[1] < counts[2]  # head only, then the top block, then the next
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    meta = read_meta(ckpt)
    assert (meta.backbone_family, meta.backbone) == ("timm", name)
    assert meta.weights == {"source": None, "name": None, "sha256": None, "license": None}
    # mean/std from timm's pretrained config (ImageNet's for resnet18, 0.5s for the ViT)
    assert meta.preprocessing.mean == pytest.approx(timm.models.get_pretrained_cfg(name).mean)

    images = tiny_dermmel / "DermMel" / "test"
    out = tmp_path / "pred.csv"
    assert main(["predict", str(ckpt), str(images), "--out", str(out)]) == 0
    import csv

    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 16 and all(0.0 <= float(r["melanoma_probability"]) <= 1.0 for r in rows)
    assert main(["export", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    _agrees_with_onnxruntime(ckpt, tmp_path / "m.onnx")


@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_train_unfreeze_resume_calibrate_predict_export(kind, weights, tiny_dermmel, tmp_path):
    from melanoma.workflows.training_run import run

    name, kwargs, file = ("resnet10t", {}, weights[0]) if kind == "cnn" else (VIT, VIT_KW, weights[1])
    base = [*timm_overrides(tiny_dermmel, name, file, max_epochs=2, kwargs=kwargs), "callbacks=unfreezing",
            "callbacks.unfreezing.warmup_steps=0", "model.optimizer.layer_decay=0.5", "test=false",
            "model.weights_license=CC-BY-NC-4.0"]
    run(compose_cfg(base, tmp_path / "first"))
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    meta = read_meta(last)
    assert (meta.backbone_family, meta.backbone) == ("timm", name)
    assert meta.weights["source"] == "file" and meta.weights["name"] == file.name
    assert meta.weights["license"] == "CC-BY-NC-4.0" and len(meta.weights["sha256"]) == 64
    # LLRD groups in the optimizer: the stem lowest, the head highest
    opt = torch.load(last, weights_only=True)["optimizer_states"][0]
    lrs = {g["layer"]: g["initial_lr"] for g in opt["param_groups"]}
    assert lrs["stem"] < lrs["block0"] < lrs[f"block{len(lrs) - 3}"] < lrs["head"]
    # frozen at epoch 1: the stem kept the loaded weights
    state = torch.load(last, weights_only=True)["state_dict"]
    source = (torch.load(file, weights_only=True) if file.suffix == ".pth"
              else __import__("safetensors.torch").torch.load_file(str(file)))
    stem_key = "conv1.0.weight" if kind == "cnn" else "pos_embed"
    assert torch.equal(state[f"model.backbone.net.{stem_key}"], source[stem_key])

    # resume: one more epoch, the same model id and weights record
    run(compose_cfg([*base[:0], *timm_overrides(tiny_dermmel, name, file, max_epochs=3, kwargs=kwargs),
                     "callbacks=unfreezing", "callbacks.unfreezing.warmup_steps=0", "model.optimizer.layer_decay=0.5",
                     "test=false", f"ckpt_path={last}"], tmp_path / "resumed"))
    resumed = read_meta(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert resumed.model_id == meta.model_id and resumed.weights == meta.weights
    ckpt = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["epoch"] == torch.load(last, weights_only=True)["epoch"] + 1

    # calibrate (evaluate rebuilds the split from the checkpoint alone), predict, export
    assert main(["evaluate", str(ckpt), "--out", str(tmp_path / "report")]) == 0
    calibrated = read_meta(ckpt).heads["dermmel"].calibration
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert report["backbone"] == {"family": "timm", "name": name, "weights": meta.weights}
    assert calibrated is not None and calibrated.threshold is not None
    assert main(["predict", str(ckpt), str(tiny_dermmel / "DermMel" / "valid"), "--out", str(tmp_path / "p.csv")]) == 0
    assert main(["export", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    _agrees_with_onnxruntime(ckpt, tmp_path / "m.onnx")


def _agrees_with_onnxruntime(ckpt, onnx_path) -> None:
    sidecar = onnx_agrees_with_checkpoint(ckpt, onnx_path)
    assert sidecar["image_size"] == read_meta(ckpt).preprocessing.image_size


def test_provenance_in_api_model_report_and_onnx_sidecar(weights, tmp_path):
    """The weights' file name, sha256 and stated licence reach /api/model, the report and the
    ONNX sidecar from the checkpoint alone."""
    import hashlib

    from melanoma.models.checkpoint_io import build_classifier, save_classifier_checkpoint
    from melanoma.predict.export import export_onnx
    from melanoma.serve.model_info import describe_model

    file = weights[0]
    record = weights_provenance(file, "CC-BY-NC-4.0")
    model = build_classifier("resnet10t", {}, {"d": ["not_melanoma", "melanoma"]}, family="timm")
    ckpt = save_classifier_checkpoint(tmp_path / "m.ckpt", model, "resnet10t", {}, image_size=32, family="timm",
                                      weights=record)
    expected = {"family": "timm", "name": "resnet10t",
                "weights": {"source": "file", "name": file.name, "license": "CC-BY-NC-4.0",
                            "sha256": hashlib.sha256(file.read_bytes()).hexdigest()}}
    assert describe_model(read_meta(ckpt))["backbone_record"] == expected
    sidecar = export_onnx(ckpt, tmp_path / "m.onnx")
    assert sidecar["backbone"] == expected
    assert json.loads((tmp_path / "m.onnx.json").read_text())["backbone"] == expected
    # an older checkpoint (no family, no weights record) reads as our ViT with provenance unknown
    from helpers import tiny_checkpoint

    old = read_meta(tiny_checkpoint(tmp_path / "old.ckpt", {"d": ["a", "melanoma"]}))
    assert old.backbone_record() == {"family": "vit", "name": "vit_tiny", "weights": None}


def test_a_timm_hub_name_offline_says_what_to_do(monkeypatch):
    """model.pretrained=<timm name>: fetched through the hub; offline and not cached, the error
    says so and names the alternatives (a local file, null)."""
    import melanoma.models.pretrained as pretrained

    monkeypatch.setattr(pretrained, "_hub_offline", lambda: True)
    monkeypatch.setattr(pretrained, "_in_hub_cache", lambda repo, filename: False)
    with pytest.raises(PretrainedWeightsError, match="(?s)not in the local hub cache.*model.pretrained=FILE"):
        load_pretrained(build_backbone("resnet10t", family="timm"), "resnet10t.c3_in1k")
    assert timm_data_config("resnet10t.c3_in1k")["input_size"] == list(
        timm.models.get_pretrained_cfg("resnet10t.c3_in1k").input_size)


def test_compile_a_timm_backbone_in_place():
    """model.compile=true with a timm backbone: its stages compile in place, the state dict keeps
    plain keys and the features are unchanged (eager backend: no C++ compiler needed)."""
    from melanoma.models.compile import compile_backbone, is_compiled

    torch.manual_seed(0)
    cnn = build_backbone("resnet10t", family="timm").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = cnn(x)
    keys = list(cnn.state_dict())
    compile_backbone(cnn, backend="eager")
    assert is_compiled(cnn.net.layer1) and list(cnn.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(cnn(x), before)
