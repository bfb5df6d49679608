"""GPU path checks for a lent CUDA machine (never part of CI): our ViT against timm's on the GPU.

For DeiT tiny/small/base with the same weights: fp32 logits equal timm's (TF32 off), the
explicit-attention path equals the fused one, and bf16 autocast logits stay close to fp32.
Prints a Markdown table; the throughput side is experiments/bench_vit.py --device cuda.

    python experiments/gpu_check.py [--out results.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch

from melanoma.models.vit import vit_base, vit_small, vit_tiny

ARCHS = {
    "tiny": (vit_tiny, "deit_tiny_patch16_224"),
    "small": (vit_small, "deit_small_patch16_224"),
    "base": (vit_base, "deit_base_patch16_224"),
}


def check(arch: str, device: str, batch: int) -> dict:
    factory, timm_name = ARCHS[arch]
    torch.manual_seed(0)
    reference = timm.create_model(timm_name, pretrained=False).to(device).eval()
    ours = factory(num_classes=reference.num_classes).to(device).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(batch, 3, 224, 224, device=device)
    with torch.inference_mode():
        ref = reference(x)
        fused = ours(x)
        explicit, attentions = ours(x, return_attention=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            bf16 = ours(x).float()
    rows = torch.stack(attentions).sum(-1)
    return {
        "arch": arch,
        "max abs(ours - timm) fp32": (fused - ref).abs().max().item(),
        "max abs(explicit - fused)": (explicit - fused).abs().max().item(),
        "max abs(attn row sum - 1)": (rows - 1).abs().max().item(),
        "max abs(bf16 - fp32) / max abs(fp32)": ((bf16 - fused).abs().max() / fused.abs().max()).item(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    # Exact comparisons need true fp32 matmuls; TF32 would differ from timm by ~1e-3.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results = [check(arch, args.device, args.batch) for arch in ARCHS]
    keys = list(results[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in results:
        lines.append("| " + " | ".join(r["arch"] if k == "arch" else f"{r[k]:.2e}" for k in keys) + " |")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    table = f"Device: {device_name}, torch {torch.__version__}, timm {timm.__version__}\n\n" + "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
