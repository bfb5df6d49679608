"""precision=auto: the rule for mocked machines, the autocast it implies, and bf16 inference on CPU
deciding like fp32."""

import numpy as np
import pytest
import torch
from PIL import Image

from melanoma import precision as P

AMX = {"fpu", "avx2", "avx512f", "amx_bf16", "amx_tile"}
AVX512_BF16 = {"fpu", "avx2", "avx512f", "avx512_bf16"}
AVX2_ONLY = {"fpu", "sse2", "avx2", "fma"}


def _no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("flags, expected", [(AMX, "bf16-mixed"), (AVX512_BF16, "bf16-mixed"),
                                             (AVX2_ONLY, "32-true"), (set(), "32-true")])
@pytest.mark.parametrize("accelerator", ["cpu", "auto"])
def test_auto_on_cpu_follows_the_flags(monkeypatch, flags, expected, accelerator):
    _no_cuda(monkeypatch)
    assert P.resolve_precision("auto", accelerator, flags=flags) == expected


@pytest.mark.parametrize("bf16, expected", [(True, "bf16-mixed"), (False, "16-mixed")])
@pytest.mark.parametrize("accelerator", ["gpu", "cuda", "cuda:1"])
def test_auto_on_cuda_follows_bf16_support(bf16, expected, accelerator):
    # the CPU flags do not matter on a GPU
    assert P.resolve_precision("auto", accelerator, flags=AVX2_ONLY, cuda_bf16=lambda: bf16) == expected


@pytest.mark.parametrize("bf16, expected", [(True, "bf16-mixed"), (False, "16-mixed")])
def test_auto_accelerator_uses_cuda_when_available(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert P.resolve_precision("auto", "auto", flags=AMX) == expected


def test_cpu_accelerator_ignores_a_present_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert P.resolve_precision("auto", "cpu", flags=AVX2_ONLY, cuda_bf16=lambda: True) == "32-true"


def test_other_accelerators_and_explicit_values():
    assert P.resolve_precision("auto", "mps", flags=AMX) == "32-true"
    for value in ("32-true", "bf16-mixed", "16-mixed", 32, "bf16-true"):
        assert P.resolve_precision(value, "cpu", flags=AMX) == value


def test_cpu_flags_read_from_a_cpuinfo_file(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 amx_bf16\n\nprocessor\t: 1\n"
                    "flags\t\t: fpu\n")
    assert P.cpu_flags(info) == {"fpu", "avx2", "amx_bf16"}
    assert P.cpu_flags(tmp_path / "missing") == set()
    assert P.resolve_precision("auto", "cpu", flags=lambda: P.cpu_flags(info)) == "bf16-mixed"


@pytest.mark.parametrize("flags", [AMX, AVX512_BF16])
def test_auto_on_a_native_bf16_cpu_picks_bf16_only_for_wide_models(monkeypatch, flags):
    _no_cuda(monkeypatch)
    narrow, wide = P.BF16_CPU_MIN_EMBED_DIM - 1, P.BF16_CPU_MIN_EMBED_DIM
    assert P.resolve_precision("auto", "cpu", flags=flags, embed_dim=narrow) == "32-true"
    assert P.resolve_precision("auto", "cpu", flags=flags, embed_dim=wide) == "bf16-mixed"
    assert P.resolve_precision("auto", "cpu", flags=flags, embed_dim=768) == "bf16-mixed"
    value, reason = P.choose_precision("cpu", flags=flags, embed_dim=64)
    assert value == "32-true" and "width 64" in reason
    # without native bf16 the width does not matter; on a GPU neither
    assert P.resolve_precision("auto", "cpu", flags=AVX2_ONLY, embed_dim=768) == "32-true"
    assert P.resolve_precision("auto", "cuda", cuda_bf16=lambda: True, embed_dim=64) == "bf16-mixed"


@pytest.mark.parametrize("flags", [AMX, AVX512_BF16, AVX2_ONLY, set()])
@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1"])
def test_inference_auto_is_full_precision_on_every_machine(monkeypatch, flags, device):
    monkeypatch.setattr(P, "cpu_flags", lambda *a: flags)
    assert P.inference_precision("auto", device) == "32-true"
    assert P.inference_precision("bf16-mixed", device) == "bf16-mixed"  # lower precision when asked
    with pytest.raises(ValueError, match="precision must be one of"):
        P.inference_precision("8-bit", device)


def test_cpu_flags_follow_the_mock_file_named_in_the_environment(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512_bf16\n")
    monkeypatch.setenv(P.CPUINFO_ENV, str(info))
    assert P.cpu_flags() == {"fpu", "avx512_bf16"}
    monkeypatch.setenv(P.CPUINFO_ENV, str(tmp_path / "missing"))
    assert P.cpu_flags() == set()


def test_resolution_is_logged_with_the_value(caplog):
    with caplog.at_level("INFO", logger="melanoma.precision"):
        P.resolve_precision("auto", "cpu", flags=AVX2_ONLY)
    assert any("precision" in r.getMessage() and "32-true" in r.getMessage() for r in caplog.records)


def test_autocast_context_dtypes():
    x = torch.randn(4, 8)
    w = torch.randn(8, 3)
    with P.autocast_context("bf16-mixed", "cpu"):
        assert (x @ w).dtype == torch.bfloat16
    with P.autocast_context("32-true", "cpu"):
        assert (x @ w).dtype == torch.float32
    with P.autocast_context("auto", "cpu", flags=AVX2_ONLY):
        assert (x @ w).dtype == torch.float32
    with P.autocast_context("auto", "cpu", flags=AMX):
        assert (x @ w).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="precision must be one of"):
        P.autocast_context("8-bit", "cpu")


KW = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
CLASSES = ["not_melanoma", "melanoma"]


def _trained_tiny_classifier(n: int = 160, steps: int = 40):
    """A tiny ViT trained a little on synthetic lesions, so its probabilities spread out (a random
    one scores every image near 0.5, where any rounding flips decisions)."""
    from melanoma.data.synthetic import render_lesion
    from melanoma.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from melanoma.models.checkpoint_io import build_classifier

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 2
    images = np.stack([render_lesion(rng, bool(y), 32)[0] for y in labels])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    y = torch.from_numpy(labels)
    model = build_classifier("vit_tiny", KW, {"synthetic": CLASSES})
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        idx = torch.randint(0, n, (32,))
        loss = torch.nn.functional.cross_entropy(model(x[idx], "synthetic"), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_bf16_inference_on_cpu_decides_like_fp32(tmp_path):
    from melanoma.cli import main
    from melanoma.data.synthetic import render_lesion
    from melanoma.models.checkpoint_io import save_classifier_checkpoint
    from melanoma.models.checkpoint import Calibration
    from melanoma.predict import Predictor

    model = _trained_tiny_classifier()
    ckpt = save_classifier_checkpoint(tmp_path / "m.ckpt", model, "vit_tiny", KW, image_size=32,
                                      calibration={"synthetic": Calibration(threshold=0.5, target_sensitivity=0.95)})
    rng = np.random.default_rng(1)
    paths = []
    for i in range(100):
        p = tmp_path / "img" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(render_lesion(rng, bool(i % 2), 32)[0]).save(p)
        paths.append(p)
    fp32 = Predictor(ckpt, progress=False, precision="32-true").predict_paths(paths)
    bf16 = Predictor(ckpt, progress=False, precision="bf16-mixed").predict_paths(paths)
    p32 = np.array([r["prob_melanoma"] for r in fp32])
    p16 = np.array([r["prob_melanoma"] for r in bf16])
    assert p32.std() > 0.05, "the model must spread its probabilities for the comparison to mean anything"
    assert not np.array_equal(p32, p16), "bf16 ran: its probabilities differ from fp32 in the last digits"
    agree = np.mean([a["decision"] == b["decision"] for a, b in zip(fp32, bf16)])
    assert agree >= 0.99
    assert np.abs(p32 - p16).max() < 0.05
    # the CLI passes --precision through
    assert main(["predict", str(ckpt), str(paths[0]), "--precision", "bf16-mixed", "-q",
                 "--out", str(tmp_path / "r.csv")]) == 0


def test_evaluation_logits_follow_the_precision(tmp_path):
    """evaluate predicts through Predictor.logits_of_paths: its logits follow --precision."""
    from melanoma.data.synthetic import render_lesion
    from melanoma.models.checkpoint_io import build_classifier, save_classifier_checkpoint
    from melanoma.predict import Predictor

    torch.manual_seed(0)
    ckpt = save_classifier_checkpoint(tmp_path / "m.ckpt", build_classifier("vit_tiny", KW, {"synthetic": CLASSES}),
                                      "vit_tiny", KW, image_size=32)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(8):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(render_lesion(rng, bool(i % 2), 32)[0]).save(paths[-1])

    def logits(precision):
        return Predictor(ckpt, progress=False, announce=False, precision=precision).logits_of_paths(paths)

    fp32, bf16, auto = logits("32-true"), logits("bf16-mixed"), logits("auto")
    assert fp32.dtype == bf16.dtype == np.float32
    assert not np.array_equal(fp32, bf16)
    np.testing.assert_allclose(bf16, fp32, atol=0.05 * np.abs(fp32).max())
    # inference's auto is full precision on every machine, whatever the CPU offers
    np.testing.assert_array_equal(auto, fp32)
