import json
import os
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer as TimmViT
from timm.models.vision_transformer import checkpoint_filter_fn

from melanoma.models.pretrained import PretrainedWeightsError, load_pretrained, resample_pos_embed
from melanoma.models.vit import VisionTransformer, vit_base, vit_small, vit_tiny

ARCHS = {
    "tiny": (vit_tiny, "deit_tiny_patch16_224", 2),
    "small": (vit_small, "deit_small_patch16_224", 2),
    # base at 224 px on 2 CPU cores: one image per forward keeps it to a few seconds
    "base": (vit_base, "deit_base_patch16_224", 1),
}
FORMATS = ["deit_wrapped.pth", "plain.pth", "plain.pt", "plain.bin", "model.safetensors"]


def _write_all_formats(state: dict, folder) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    files = {name: folder / name for name in FORMATS}
    # The official DeiT release wraps the weights: {"model": state_dict, ...}.
    torch.save({"model": state, "epoch": 300}, files["deit_wrapped.pth"])
    torch.save(state, files["plain.pth"])
    for name in ("plain.pt", "plain.bin"):  # same bytes as timm's torch.save(state_dict), other suffix
        os.link(files["plain.pth"], files[name])
    save_file({k: v.contiguous() for k, v in state.items()}, str(files["model.safetensors"]))
    return files


@pytest.fixture(scope="module", params=[
    "tiny", "small", pytest.param("base", marks=pytest.mark.slow)])
def deit_reference(request, tmp_path_factory):
    factory, timm_name, batch = ARCHS[request.param]
    torch.manual_seed(0)
    ref = timm.create_model(timm_name, pretrained=False).eval()
    x = torch.randn(batch, 3, 224, 224)
    with torch.no_grad():
        feats = ref.forward_features(x)
        logits = ref.forward_head(feats)
    files = _write_all_formats(ref.state_dict(), tmp_path_factory.mktemp(request.param))
    head = {k: v.clone() for k, v in ref.head.state_dict().items()}
    ours = factory(num_classes=1000).eval()
    return dict(ours=ours, x=x, feats=feats, logits=logits, files=files, head=head)


@pytest.mark.parametrize("fmt", FORMATS)
def test_timm_deit_checkpoint_loads_and_matches_timm(deit_reference, fmt):
    ref = deit_reference
    ours = ref["ours"]
    with torch.no_grad():  # scramble, so nothing left over from a previous format can pass
        for p in ours.parameters():
            p.fill_(0.5)
    assert load_pretrained(ours, ref["files"][fmt]) is ours
    # head.* is never loaded from a checkpoint ...
    assert torch.equal(ours.head.weight, torch.full_like(ours.head.weight, 0.5))
    # ... so copy timm's head to compare logits too.
    ours.head.load_state_dict(ref["head"])
    with torch.no_grad():
        feats = ours.forward_features(ref["x"])
        logits = ours.forward_head(feats)
    assert feats.shape == ref["feats"].shape
    assert (feats - ref["feats"]).abs().max() < 1e-5
    assert (logits - ref["logits"]).abs().max() < 1e-5
    assert ref["logits"].abs().max() > 0.1  # non-trivial values are being compared


def test_384_px_model_from_224_px_weights_equals_timm_resampled(tmp_path):
    torch.manual_seed(0)
    ref224 = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    state = ref224.state_dict()
    torch.save({"model": state}, tmp_path / "deit_tiny.pth")

    ref384 = timm.create_model("deit_tiny_patch16_224", img_size=384, pretrained=False).eval()
    ref384.load_state_dict(checkpoint_filter_fn(state, ref384), strict=True)

    ours = load_pretrained(vit_tiny(img_size=384, num_classes=1000), tmp_path / "deit_tiny.pth").eval()
    ours.head.load_state_dict(ref224.head.state_dict())
    assert ours.pos_embed.shape == (1, 1 + 24 * 24, 192)
    expected = resample_abs_pos_embed(state["pos_embed"], new_size=[24, 24], num_prefix_tokens=1)
    assert (ours.pos_embed - expected).abs().max() < 1e-6
    assert torch.equal(ours.pos_embed[:, 0], state["pos_embed"][:, 0])  # class token entry kept

    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        assert (ours.forward_features(x) - ref384.forward_features(x)).abs().max() < 1e-5
        assert (ours(x) - ref384(x)).abs().max() < 1e-5


def test_resample_pos_embed_down_and_identity():
    pe = torch.randn(1, 1 + 16, 8)
    assert resample_pos_embed(pe, (4, 4)) is pe
    down = resample_pos_embed(pe, (2, 2))
    assert torch.allclose(down, resample_abs_pos_embed(pe, new_size=[2, 2], num_prefix_tokens=1), atol=1e-6)
    with pytest.raises(PretrainedWeightsError, match="not a square grid"):
        resample_pos_embed(torch.randn(1, 1 + 15, 8), (4, 4))


# --- refusals, on a miniature ViT --------------------------------------------------------------

MINI = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture()
def mini_state():
    torch.manual_seed(0)
    return TimmViT(num_classes=10, **MINI).state_dict()


def _refused(tmp_path, state, match):
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    model = VisionTransformer(**MINI)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PretrainedWeightsError, match=match):
        load_pretrained(model, path)
    # nothing was half-loaded
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_mini_checkpoint_loads(tmp_path, mini_state):
    torch.save(mini_state, tmp_path / "ok.pth")
    model = load_pretrained(VisionTransformer(**MINI), tmp_path / "ok.pth")
    assert torch.equal(model.blocks[1].mlp.fc2.weight, mini_state["blocks.1.mlp.fc2.weight"])


def test_renamed_tensor_is_refused_naming_both_keys(tmp_path, mini_state):
    mini_state["blocks.0.attn.in_proj.weight"] = mini_state.pop("blocks.0.attn.qkv.weight")
    _refused(tmp_path, mini_state,
             r"missing: \['blocks.0.attn.qkv.weight'\]; unexpected: \['blocks.0.attn.in_proj.weight'\]")


def test_missing_tensor_is_refused(tmp_path, mini_state):
    del mini_state["norm.weight"]
    _refused(tmp_path, mini_state, r"missing: \['norm.weight'\]")


def test_mis_shaped_tensor_is_refused(tmp_path, mini_state):
    mini_state["blocks.1.mlp.fc1.bias"] = mini_state["blocks.1.mlp.fc1.bias"][:100]
    _refused(tmp_path, mini_state, r"mis-shaped: \['blocks.1.mlp.fc1.bias \(checkpoint \(100,\), model \(128,\)\)'\]")


def test_other_architecture_is_refused(tmp_path):
    torch.manual_seed(0)
    wider = TimmViT(num_classes=0, **{**MINI, "embed_dim": 64})
    _refused(tmp_path, wider.state_dict(), r"mis-shaped: \[.*'patch_embed.proj.weight \(checkpoint \(64, 3, 8, 8\), model \(32, 3, 8, 8\)\)'.*vit_tiny/vit_small/vit_base")


def test_pickled_objects_are_refused(tmp_path, mini_state):
    path = tmp_path / "evil.pth"
    torch.save({"model": mini_state, "args": Opaque()}, path)
    with pytest.raises(PretrainedWeightsError, match="weights_only=True"):
        load_pretrained(VisionTransformer(**MINI), path)


class Opaque:
    """An arbitrary pickled object (DeiT's own training checkpoints hold an argparse Namespace)."""


def test_missing_file_and_unknown_names(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="file not found"):
        load_pretrained(VisionTransformer(**MINI), tmp_path / "nope.pth")
    with pytest.raises(PretrainedWeightsError, match="neither an existing file nor a timm model name"):
        load_pretrained(VisionTransformer(**MINI), "not_a_model_xyz")
    (tmp_path / "w.ckpt").write_bytes(b"")
    with pytest.raises(PretrainedWeightsError, match=r"unsupported weights file .*\.safetensors"):
        load_pretrained(VisionTransformer(**MINI), tmp_path / "w.ckpt")


# --- the hub path (timm names), in a clean process with its own HF cache -------------------------

HUB_SCRIPT = textwrap.dedent("""
    import json
    import timm
    from melanoma.models.pretrained import PretrainedWeightsError, load_pretrained
    from melanoma.models.vit import vit_tiny, vit_small
    # count the models timm builds: an offline miss must be refused before timm builds one
    built, create_model = [], timm.create_model
    def counting_create_model(name, *args, **kwargs):
        built.append(name)
        return create_model(name, *args, **kwargs)
    timm.create_model = counting_create_model
    out = {}
    try:
        load_pretrained(vit_small(), "deit_small_patch16_224")
        out["error"] = None
    except PretrainedWeightsError as e:
        out["error"] = str(e)
    out["built_for_small"] = list(built)
    model = load_pretrained(vit_tiny(), "deit_tiny_patch16_224")
    out["built_for_tiny"] = built[len(out["built_for_small"]):]
    out["tiny_digest"] = {k: float(v.double().sum()) for k, v in model.state_dict().items()}
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_hub_name_offline_fails_fast_and_reads_the_hub_cache(tmp_path):
    # A Hugging Face cache holding timm's deit_tiny (as a download would leave it) but not deit_small.
    torch.manual_seed(0)
    state = timm.create_model("deit_tiny_patch16_224", pretrained=False).state_dict()
    repo = tmp_path / "hf" / "hub" / "models--timm--deit_tiny_patch16_224.fb_in1k"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file(state, str(repo / "snapshots" / commit / "model.safetensors"))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "TORCH_HOME": str(tmp_path / "torch")}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", HUB_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    # refused before timm built (and tried to download into) a model; the cached one is built
    assert out["built_for_small"] == [] and out["built_for_tiny"] == ["deit_tiny_patch16_224"]
    assert "'deit_small_patch16_224'" in out["error"] and "HF_HUB_OFFLINE=1" in out["error"]
    assert "pass the local file instead: model.pretrained=FILE" in out["error"]
    assert "dl.fbaipublicfiles.com/deit/deit_small_patch16_224" in out["error"]

    expected = {k: float(v.double().sum()) for k, v in state.items() if not k.startswith("head.")}
    got = {k: v for k, v in out["tiny_digest"].items() if not k.startswith("head.")}
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_unreachable_hub_fails_at_once_naming_the_config_key(monkeypatch):
    """Not offline, not cached, and no route to the hub: one connection attempt, then one error
    that names model.pretrained=FILE and HF_HUB_OFFLINE (huggingface_hub would retry for a minute)."""
    import socket

    import huggingface_hub.constants

    import melanoma.models.pretrained as pretrained

    attempts, built = [], []

    def refuse(address, timeout=None):
        attempts.append((address, timeout))
        raise OSError("Network is unreachable")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(pretrained, "_in_hub_cache", lambda *a: False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: built.append(a) or None)
    with pytest.raises(PretrainedWeightsError) as err:
        load_pretrained(vit_tiny(), "deit_tiny_patch16_224")
    assert len(attempts) == 1 and attempts[0][1] == pretrained.HUB_PROBE_TIMEOUT_S and built == []
    text = str(err.value)
    assert "cannot be reached" in text and "model.pretrained=FILE" in text and "HF_HUB_OFFLINE=1" in text
    assert "model.pretrained=null" in text

    # behind a proxy the probe cannot judge: timm is asked (here: the fake builds nothing)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert pretrained._hub_unreachable() is None and len(attempts) == 1
