import pytest
import torch

from melanoma.models import build_backbone
from melanoma.models.checkpoint import Calibration, CheckpointMeta, HeadRecord, Preprocessing
from melanoma.models.classifier import CheckpointError, Classifier
from melanoma.models.heads import DatasetHeads, LinearHead, MLPHead

BACKBONE = {"name": "vit_tiny", "kwargs": {"img_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2}}


class Opaque:
    """Stands for an arbitrary pickled object, e.g. a DictConfig in hyper_parameters."""


def _model() -> Classifier:
    torch.manual_seed(0)
    heads = DatasetHeads()
    heads.add("synthetic", LinearHead(32, ["not_melanoma", "melanoma"]))
    heads.add("ham10000", MLPHead(32, ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"], hidden_features=8))
    return Classifier(build_backbone(BACKBONE["name"], **BACKBONE["kwargs"]), heads)


def _meta(model: Classifier) -> dict:
    specs = model.heads.specs()
    heads = {"synthetic": HeadRecord(specs["synthetic"], Calibration(1.5, threshold=0.3, target_sensitivity=0.95)),
             "ham10000": HeadRecord(specs["ham10000"])}
    return CheckpointMeta(BACKBONE["name"], BACKBONE["kwargs"], heads, "synthetic",
                          Preprocessing(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                          config={"dataset": {"name": "synthetic"}}).to_dict()


def _save_ckpt(path, model, meta=None, state=None, extra=None):
    state = {"model." + k: v for k, v in model.state_dict().items()} if state is None else state
    # Lightning adds more; from_checkpoint must ignore keys outside "model." (e.g. a loss buffer).
    ckpt = {"epoch": 3, "global_step": 12, "pytorch-lightning_version": "2.6.6",
            "state_dict": {**state, "criterion.weight": torch.ones(2)},
            "melanoma": _meta(model) if meta is None else meta, **(extra or {})}
    torch.save(ckpt, path)
    return path


def test_forward_per_head_and_features():
    model = _model().eval()
    x = torch.randn(3, 3, 32, 32)
    feats = model.features(x)
    assert feats.shape == (3, 32)
    assert torch.equal(feats, model.backbone.forward_features(x)[:, 0])
    assert torch.equal(model(x, "synthetic"), model.heads["synthetic"](feats))
    assert model(x, "ham10000").shape == (3, 7)
    logits, attentions = model(x, "synthetic", return_attention=True)
    assert (logits - model(x, "synthetic")).abs().max() < 1e-5
    assert len(attentions) == 2 and attentions[0].shape == (3, 2, 5, 5)  # 32 px / patch 16: 4 patches + cls
    with pytest.raises(KeyError, match=r"no head named 'ph2'.*\['synthetic', 'ham10000'\]"):
        model(x, "ph2")


def test_state_dict_keys_are_what_the_lightning_module_saves():
    keys = list(_model().state_dict())
    assert "backbone.blocks.1.attn.qkv.weight" in keys and "heads.ham10000.fc2.bias" in keys
    assert all(k.startswith(("backbone.", "heads.")) for k in keys)


def test_from_checkpoint_round_trip(tmp_path):
    model = _model().eval()
    path = _save_ckpt(tmp_path / "best.ckpt", model)
    loaded, meta = Classifier.from_checkpoint(path)
    assert meta.to_dict() == _meta(model)
    assert meta.heads["synthetic"].calibration.temperature == 1.5
    assert not loaded.training
    assert loaded.heads.specs() == model.heads.specs()
    assert loaded.heads["ham10000"].class_names[4] == "mel"
    x = torch.randn(2, 3, 32, 32)
    for head in ("synthetic", "ham10000"):
        assert torch.equal(loaded(x, head), model(x, head))


def test_from_checkpoint_refuses_unexpected_keys(tmp_path):
    model = _model()
    state = {"model." + k: v for k, v in model.state_dict().items()}
    state["model.heads.ph2.fc.weight"] = torch.zeros(3, 32)
    with pytest.raises(CheckpointError, match=r"unexpected: \['heads.ph2.fc.weight'\]"):
        Classifier.from_checkpoint(_save_ckpt(tmp_path / "a.ckpt", model, state=state))


def test_from_checkpoint_refuses_missing_keys(tmp_path):
    model = _model()
    state = {"model." + k: v for k, v in model.state_dict().items() if k != "backbone.norm.bias"}
    with pytest.raises(CheckpointError, match=r"missing: \['backbone.norm.bias'\]"):
        Classifier.from_checkpoint(_save_ckpt(tmp_path / "b.ckpt", model, state=state))


def test_from_checkpoint_refuses_mis_shaped_keys(tmp_path):
    model = _model()
    meta = _meta(model)
    meta["heads"]["synthetic"]["spec"]["class_names"] = ["a", "b", "c"]  # META says 3 classes, weights 2
    with pytest.raises(CheckpointError, match=r"mis-shaped: \['heads.synthetic.fc.weight \(checkpoint \(2, 32\), model \(3, 32\)\)'"):
        Classifier.from_checkpoint(_save_ckpt(tmp_path / "c.ckpt", model, meta=meta))


def test_from_checkpoint_refuses_non_melanoma_files(tmp_path):
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match=r"not a melanoma checkpoint.*found \['state_dict'\]"):
        Classifier.from_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        Classifier.from_checkpoint(tmp_path / "nope.ckpt")


def test_from_checkpoint_refuses_pickled_objects(tmp_path):
    model = _model()
    path = _save_ckpt(tmp_path / "obj.ckpt", model, extra={"hyper_parameters": Opaque()})
    with pytest.raises(CheckpointError, match="weights_only=True"):
        Classifier.from_checkpoint(path)
