"""model=open_clip and `melanoma zero-shot`, on a tiny open_clip model built from a config.

The tiny CLIP (ViT image tower: 32 px, patch 8, width 32, 2 layers; text tower: width 32, 2
layers, 16 tokens) is saved as users bring published weights: a full state-dict file beside a JSON
model config, and a folder as the hub publishes it (open_clip_config.json with its preprocessing,
and the weights). Training, resume, unfreezing, LLRD, calibration, predict, export to ONNX and
zero-shot run from those files; the checkpoint alone rebuilds the model.

The zero-shot task is planted: melanomas are large dark lesions, the others small pale ones, and
the image tower's projection is fitted (least squares on the train split) so that an image's
embedding points at its class's prompt embedding; swapping the prompts must then invert the
ranking.
"""

import json

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from PIL import Image  # noqa: E402

from helpers import compose_cfg, onnx_agrees_with_checkpoint, run_train_py, tiny_trainer_overrides  # noqa: E402

from melanoma.cli import main  # noqa: E402
from melanoma.models import build_backbone  # noqa: E402
from melanoma.models.checkpoint import read_meta  # noqa: E402
from melanoma.models.open_clip_backbone import (OpenClipError, OpenClipGroupingError, _layer_map,  # noqa: E402
                                                build_clip_model, resolve_open_clip)
from melanoma.models.pretrained import PretrainedWeightsError, load_pretrained  # noqa: E402
from melanoma.models.zero_shot import class_prompts, encode_prompts, load_prompts  # noqa: E402
from melanoma.training import optim  # noqa: E402

TINY = {"embed_dim": 16, "quick_gelu": False,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
#: the folder's own preprocessing (not open_clip's default OpenAI mean/std, not our bicubic)
PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear", "size": 32}
PROMPTS = {"templates": ["{}"], "classes": {"melanoma": ["melanoma"], "not_melanoma": ["benign nevus"]}}
SWAPPED = {"templates": ["{}"], "classes": {"melanoma": ["benign nevus"], "not_melanoma": ["melanoma"]}}
COUNTS = {"train_sep": 12, "valid": 10, "test": 10}


def _write_yaml(path, data) -> str:
    from omegaconf import OmegaConf

    OmegaConf.save(OmegaConf.create(data), path)
    return str(path)


def _lesion(rng, melanoma: bool) -> Image.Image:
    """Pale skin; melanoma: a large dark lesion, otherwise a small light-brown one."""
    img = np.full((32, 32, 3), 210.0) + rng.normal(0, 8, (32, 32, 3))
    yy, xx = np.mgrid[:32, :32]
    cy, cx = rng.uniform(12, 20, 2)
    radius = rng.uniform(9, 12) if melanoma else rng.uniform(3, 5)
    inside = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
    img[inside] = (50.0, 35.0, 30.0) if melanoma else (170.0, 120.0, 90.0)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A DermMel-layout dataset where melanomas are large dark lesions and the rest small pale ones."""
    root = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(0)
    for split, n in COUNTS.items():
        for folder, mel in (("Melanoma", True), ("NotMelanoma", False)):
            out = root / "DermMel" / split / folder
            out.mkdir(parents=True)
            for i in range(n):
                _lesion(rng, mel).save(out / f"{folder}_{split}_{i}.jpg", quality=95)
    return root


def _pixels(paths) -> torch.Tensor:
    x = np.stack([np.asarray(Image.open(p).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR))
                  for p in paths]).astype(np.float32) / 255.0
    x = (x - np.array(PREPROCESS["mean"])) / np.array(PREPROCESS["std"])
    return torch.from_numpy(x).permute(0, 3, 1, 2).float()


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory, planted):
    """(json config, weights file, published folder) of a tiny CLIP whose image embeddings of the
    planted train images point at their class's prompt embedding."""
    out = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    clip = build_clip_model(TINY).eval()
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    with torch.no_grad():
        text = torch.nn.functional.normalize(clip.encode_text(tokenizer(["benign nevus", "melanoma"])), dim=-1)
        train = sorted((planted / "DermMel" / "train_sep").rglob("*.jpg"))
        labels = torch.tensor([p.parent.name == "Melanoma" for p in train]).long()
        proj = clip.visual.proj
        clip.visual.proj = None  # the pooled token before the projection
        pooled = clip.visual(_pixels(train))
        fitted = torch.linalg.lstsq(pooled, text[labels] * 10).solution
        clip.visual.proj = torch.nn.Parameter(fitted.to(proj.dtype))
    (out / "tiny-clip.json").write_text(json.dumps(TINY))
    torch.save(clip.state_dict(), out / "tiny-clip.pth")
    folder = out / "TinyCLIP"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY, "preprocess_cfg": PREPROCESS}))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return out / "tiny-clip.json", out / "tiny-clip.pth", folder


def _dataset(root) -> list[str]:
    return ["dataset=dermmel", f"dataset.root={root}", "dataset.image_size=32", "dataset.batch_size=8",
            "dataset.num_workers=0", "dataset.pin_memory=false", "dataset.persistent_workers=false"]


# --- the tower ---------------------------------------------------------------------------------

def test_layer_groups_llrd_and_the_unsupported_tower_error(tiny_clip):
    config, _, _ = tiny_clip
    tower = build_backbone(str(config), family="open_clip", img_size=32)
    assert tower.layer_groups() == ["stem", "block0", "block1", "norm"]
    assert tower.layer_of("visual.conv1.weight") == "stem" and tower.layer_of("visual.positional_embedding") == "stem"
    assert tower.layer_of("visual.transformer.resblocks.1.mlp.c_fc.weight") == "block1"
    assert tower.layer_of("visual.proj") == "norm" and tower.layer_of("visual.ln_post.weight") == "norm"
    assert tower(torch.zeros(2, 3, 32, 32)).shape == (2, 16) and tower.embed_dim == 16
    head = torch.nn.Linear(16, 2)
    groups = optim.optimizer_groups(tower, head, {"lr": 1.0, "weight_decay": 0.05, "head_lr": 10.0,
                                                  "layer_decay": 0.5, "group_lr": {}})
    assert {g["layer"]: g["lr"] for g in groups} == {"head": 10.0, "norm": 1.0, "block1": 0.5, "block0": 0.25,
                                                     "stem": 0.125}
    # a ResNet tower groups too (stem, its four stages, the attention pool)
    rn = build_backbone("RN50", family="open_clip", img_size=64)
    assert rn.layer_groups() == ["stem", "block0", "block1", "block2", "block3", "norm"]

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(2, 2)

    with pytest.raises(OpenClipGroupingError, match="cannot group.*unfreezing"):
        _layer_map(Odd(), "odd")
    with pytest.raises(OpenClipError, match="not an open_clip architecture"):
        resolve_open_clip("ViT-Q-99")


def test_weights_load_strictly_from_a_file_or_a_folder(tiny_clip, tmp_path):
    config, file, folder = tiny_clip
    source = torch.load(file, weights_only=True)
    tower = load_pretrained(build_backbone(str(config), family="open_clip", img_size=32), file)
    assert torch.equal(tower.visual.conv1.weight, source["visual.conv1.weight"])
    assert torch.equal(tower.visual.proj, source["visual.proj"])
    # the folder's config is the architecture; at 48 px the position embedding is resampled
    big = load_pretrained(build_backbone("TinyCLIP", family="open_clip", model_cfg=TINY, img_size=48), folder)
    assert big.visual.positional_embedding.shape == (37, 32)
    assert torch.equal(big.visual.positional_embedding[0], source["visual.positional_embedding"][0])
    # another architecture's weights: every mismatch named
    other = {**TINY, "vision_cfg": {**TINY["vision_cfg"], "width": 48, "head_width": 16}}
    with pytest.raises(PretrainedWeightsError, match="do not fit the open_clip image tower.*mis-shaped"):
        load_pretrained(build_backbone("x", family="open_clip", model_cfg=other, img_size=32), file)
    text_only = tmp_path / "text.pth"
    torch.save({k: v for k, v in source.items() if not k.startswith("visual.")}, text_only)
    with pytest.raises(PretrainedWeightsError, match="no open_clip image tower"):
        load_pretrained(build_backbone(str(config), family="open_clip", img_size=32), text_only)


def test_an_hf_hub_name_offline_says_what_to_do(monkeypatch):
    import melanoma.models.pretrained as pretrained

    monkeypatch.setattr(pretrained, "_hub_offline", lambda: True)
    with pytest.raises(OpenClipError, match="(?s)HF_HUB_OFFLINE=1.*not in the local hub cache.*model.pretrained=DIR"):
        resolve_open_clip("ViT-B-16", "hf-hub:someone/SomeDermCLIP-not-cached")


# --- training, as written and in-process ----------------------------------------------------------

def test_train_py_as_written_then_predict_and_export(tiny_clip, planted, tmp_path):
    """`python train.py model=open_clip model.backbone.name=<arch> model.pretrained=<folder>
    recipe=linear_probe ...`: the tower stays frozen, the model's preprocessing reaches the
    checkpoint; then `melanoma predict` and `melanoma export --format onnx` read only the checkpoint."""
    _, _, folder = tiny_clip
    run_dir = tmp_path / "run"
    run_train_py(["model=open_clip", "model.backbone.name=TinyCLIP", f"model.pretrained={folder}", "recipe=linear_probe",
                  "model.weights_license=CC-BY-NC-4.0", "logger=csv", *_dataset(planted), *tiny_trainer_overrides(2),
                  "test=false", f"paths.output_dir={run_dir}"], cwd=tmp_path)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    meta = read_meta(ckpt)
    assert (meta.backbone_family, meta.backbone) == ("open_clip", "TinyCLIP")
    assert meta.backbone_kwargs["model_cfg"]["vision_cfg"] == TINY["vision_cfg"]
    assert meta.preprocessing.mean == tuple(PREPROCESS["mean"]) and meta.preprocessing.std == tuple(PREPROCESS["std"])
    assert meta.preprocessing.interpolation == "bilinear"
    assert meta.weights["name"] == "open_clip_model.safetensors" and meta.weights["license"] == "CC-BY-NC-4.0"
    # linear probe: the tower kept the published weights exactly
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    from safetensors.torch import load_file

    published = load_file(str(folder / "open_clip_model.safetensors"))
    assert all(torch.equal(state[f"model.backbone.{k}"], v) for k, v in published.items() if k.startswith("visual."))
    import pandas as pd

    counts = pd.read_csv(run_dir / "csv" / "metrics.csv")["trainable_params"].dropna().unique().tolist()
    assert counts == [16 * 2 + 2]

    out = tmp_path / "pred.csv"
    assert main(["predict", str(ckpt), str(planted / "DermMel" / "test"), "--out", str(out)]) == 0
    assert len(pd.read_csv(out)) == 2 * COUNTS["test"]
    assert main(["export", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    _agrees_with_onnxruntime(ckpt, tmp_path / "m.onnx")


def test_train_unfreeze_llrd_resume_calibrate_predict_export(tiny_clip, planted, tmp_path):
    from melanoma.workflows.training_run import run

    config, file, _ = tiny_clip
    base = ["model=open_clip", f"model.backbone.name={config}", f"model.pretrained={file}", "logger=csv",
            *_dataset(planted), "callbacks=unfreezing", "callbacks.unfreezing.start_epoch=1",
            "callbacks.unfreezing.warmup_steps=0", "model.optimizer.layer_decay=0.5", "test=false"]
    run(compose_cfg([*base, *tiny_trainer_overrides(2)], tmp_path / "first"))
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    meta = read_meta(last)
    assert meta.weights["source"] == "file" and meta.weights["name"] == file.name and len(meta.weights["sha256"]) == 64
    # OpenAI's CLIP normalisation (open_clip's default config), stored for predict and export
    assert meta.preprocessing.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    ckpt_dict = torch.load(last, weights_only=True)
    lrs = {g["layer"]: g["initial_lr"] for g in ckpt_dict["optimizer_states"][0]["param_groups"]}
    assert lrs["stem"] < lrs["block0"] < lrs["block1"] < lrs["norm"] < lrs["head"]
    # epoch 1 thawed only the top group (norm): the stem is the file's
    source = torch.load(file, weights_only=True)
    assert torch.equal(ckpt_dict["state_dict"]["model.backbone.visual.conv1.weight"], source["visual.conv1.weight"])
    assert not torch.equal(ckpt_dict["state_dict"]["model.backbone.visual.proj"], source["visual.proj"])

    run(compose_cfg([*base, *tiny_trainer_overrides(3), f"ckpt_path={last}"], tmp_path / "resumed"))
    ckpt = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    resumed = read_meta(ckpt)
    assert resumed.model_id == meta.model_id and resumed.weights == meta.weights
    assert torch.load(ckpt, weights_only=True)["epoch"] == ckpt_dict["epoch"] + 1

    assert main(["evaluate", str(ckpt), "--out", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert report["backbone"] == {"family": "open_clip", "name": str(config), "weights": meta.weights}
    assert read_meta(ckpt).heads["dermmel"].calibration.threshold is not None
    assert main(["export", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    _agrees_with_onnxruntime(ckpt, tmp_path / "m.onnx")


def _agrees_with_onnxruntime(ckpt, onnx_path) -> None:
    sidecar = onnx_agrees_with_checkpoint(ckpt, onnx_path)
    assert sidecar["backbone"]["family"] == "open_clip"
    assert sidecar["mean"] == list(read_meta(ckpt).preprocessing.mean)


# --- zero-shot ---------------------------------------------------------------------------------

def test_class_embeddings_average_the_normalised_prompts(tiny_clip):
    torch.manual_seed(0)
    clip = build_clip_model(TINY).eval()
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    prompts = {"templates": ["a photo of {}.", "{}"], "classes": {"melanoma": ["melanoma", "malignant melanoma"],
                                                                   "nv": ["nevus"]}}
    texts = class_prompts(prompts, ["nv", "melanoma"])
    assert texts == {"nv": ["a photo of nevus.", "nevus"],
                     "melanoma": ["a photo of melanoma.", "melanoma", "a photo of malignant melanoma.",
                                  "malignant melanoma"]}
    weight = encode_prompts(clip, tokenizer, texts)
    with torch.no_grad():
        each = torch.nn.functional.normalize(clip.encode_text(tokenizer(texts["melanoma"])), dim=-1)
    torch.testing.assert_close(weight[1], torch.nn.functional.normalize(each.mean(0), dim=0))
    assert weight.shape == (2, 16)
    with pytest.raises(ValueError, match=r"no descriptions for classes \['bcc'\]"):
        class_prompts(prompts, ["bcc", "melanoma"])


def test_the_default_prompts_cover_the_label_sets():
    from melanoma.data.ham10000 import DX
    from melanoma.data.isic_years import CLASSES_2017, CLASSES_2019
    from melanoma.data.ph2 import CLASSES_3
    from melanoma.conventions import BINARY_CLASSES

    prompts = load_prompts()
    for classes in (BINARY_CLASSES, DX, CLASSES_3, CLASSES_2017, CLASSES_2019):
        assert set(class_prompts(prompts, list(classes))) == set(classes)


def test_zero_shot_on_a_planted_task_then_predict_and_export(tiny_clip, planted, tmp_path):
    """Prompts that agree with the images rank melanomas first (AUROC near 1), with the trained
    heads' report (intervals, calibration on val); swapped prompts invert it."""
    _, _, folder = tiny_clip
    agree, swapped = _write_yaml(tmp_path / "p.yaml", PROMPTS), _write_yaml(tmp_path / "s.yaml", SWAPPED)
    model = ["model=open_clip", "model.backbone.name=TinyCLIP", f"model.pretrained={folder}",
             "model.weights_license=CC-BY-NC-4.0"]
    ckpt = tmp_path / "zs.ckpt"
    assert main(["zero-shot", *model, *_dataset(planted), "--prompts", agree, "--out", str(ckpt),
                 "--report", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert report["auroc"] > 0.9 and report["ci95"]["auroc"][0] > 0.7
    assert report["split"] == "test" and report["n"] == 2 * COUNTS["test"]
    assert report["backbone"]["family"] == "open_clip" and report["backbone"]["weights"]["license"] == "CC-BY-NC-4.0"
    meta = read_meta(ckpt)
    head = meta.heads["dermmel"]
    assert head.spec["type"] == "zero_shot" and head.spec["prompts"]["melanoma"] == ["melanoma"]
    assert head.calibration is not None and head.calibration.threshold is not None  # fitted on val
    # `melanoma evaluate` rebuilds the same split from the checkpoint and agrees
    assert main(["evaluate", str(ckpt), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["auroc"] == pytest.approx(report["auroc"])

    assert main(["zero-shot", *model, *_dataset(planted), "--prompts", swapped, "--out", str(tmp_path / "sw.ckpt"),
                 "--external", "--report", str(tmp_path / "swapped")]) == 0
    inverted = json.loads((tmp_path / "swapped" / "metrics.json").read_text())
    assert inverted["external"] and inverted["n"] == 2 * sum(COUNTS.values())
    assert inverted["auroc"] < 0.2 and inverted["calibrated"] is False

    out = tmp_path / "pred.csv"
    assert main(["predict", str(ckpt), str(planted / "DermMel" / "test" / "Melanoma"), "--out", str(out)]) == 0
    import pandas as pd

    assert (pd.read_csv(out)["predicted_class"] == "melanoma").mean() > 0.8
    assert main(["export", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "zs.onnx")]) == 0
    _agrees_with_onnxruntime(ckpt, tmp_path / "zs.onnx")


def test_a_vit_tower_offers_attention_maps_in_predict_and_serve(tiny_clip, planted, tmp_path):
    """The attention weights of an open_clip ViT tower are read (torch's MultiheadAttention asked
    for them for that one call): each row sums to 1, the logits are those of the plain forward,
    predict writes the rollout map and serve offers it; a ResNet tower offers Grad-CAM."""
    pytest.importorskip("fastapi")
    from melanoma.explain.attention import compute_attention_maps
    from melanoma.explain.gradcam import default_method, methods_for
    from melanoma.models.checkpoint_io import build_classifier, save_classifier_checkpoint
    from melanoma.serve.engine import ModelService, Upload

    kwargs = {"model_cfg": TINY, "img_size": 32}
    torch.manual_seed(0)
    model = build_classifier("TinyCLIP", kwargs, {"d": ["not_melanoma", "melanoma"]}, family="open_clip").eval()
    assert default_method(model.backbone) == "rollout" and "grad_rollout" in methods_for(model.backbone)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        plain = model(x, "d")
        logits, attentions = model(x, "d", return_attention=True)
    torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-5)
    assert len(attentions) == TINY["vision_cfg"]["layers"]
    assert attentions[0].shape == (3, TINY["vision_cfg"]["width"] // TINY["vision_cfg"]["head_width"], 17, 17)
    torch.testing.assert_close(attentions[-1].sum(-1), torch.ones(3, 2, 17))
    assert not any("forward" in vars(m) for m in model.backbone._attention_modules())  # put back
    maps = compute_attention_maps(lambda v, return_attention=False: model(v, "d", return_attention=return_attention),
                                  x, model.backbone.grid_size, num_prefix_tokens=1, methods=("rollout", "grad_rollout"))
    assert maps.maps["rollout"].shape == (3, 4, 4) and np.isfinite(maps.maps["grad_rollout"]).all()

    ckpt = save_classifier_checkpoint(tmp_path / "clip.ckpt", model, "TinyCLIP", kwargs, image_size=32,
                                      family="open_clip")
    image = next((planted / "DermMel" / "test" / "Melanoma").iterdir())
    assert main(["predict", str(ckpt), str(image), "--attention", str(tmp_path / "maps")]) == 0
    written = sorted(p.name for p in (tmp_path / "maps").glob("*.png"))
    assert len(written) == 2 and written[0].endswith("_heads.png") and written[1].endswith("_rollout.png")
    service = ModelService(ckpt)
    assert service.default_overlay == "rollout" and "none" in service.overlay_methods
    result = service.predict([Upload("a.jpg", image.read_bytes())])
    assert result["predictions"][0]["overlay_png"]
    assert build_backbone("RN50", family="open_clip", img_size=64).map_methods == ("gradcam",)


def test_compile_an_open_clip_tower_in_place():
    from melanoma.models.compile import compile_backbone, is_compiled

    torch.manual_seed(0)
    tower = build_backbone("TinyCLIP", family="open_clip", model_cfg=TINY, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = tower(x)
    keys = list(tower.state_dict())
    compile_backbone(tower, backend="eager")
    assert is_compiled(tower.visual) and list(tower.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(tower(x), before)
