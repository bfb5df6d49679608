"""Training-step time with gradual unfreezing's frozen layers vs full fine-tuning (CPU).

Runs the real code path: LesionClassifier.set_trainable_layers (frozen layers below the lowest
trainable one run under no_grad) and the per-layer AdamW groups from configure_optimizers, in
one process, alternating the variants so background load hits them alike.

    python experiments/bench_unfreeze.py [--image-size 224 --batch 16 --steps 4]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from melanoma.training import optim
from melanoma.training.module import LesionClassifier

VARIANTS = {
    "full fine-tuning": None,
    "head + norm + top block": {"head", "norm", "block11"},
    "head only": {"head"},
}


def make_module(image_size: int) -> LesionClassifier:
    return LesionClassifier(backbone={"name": "vit_small", "kwargs": {"img_size": image_size}},
                            dataset_name="bench", class_names=["not_melanoma", "melanoma"])


def step_time(module: LesionClassifier, opt: torch.optim.Optimizer, x, y, bf16: bool = False) -> float:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = module(x)
    loss = torch.nn.functional.cross_entropy(logits.float(), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    device = torch.device(args.device)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 2, (args.batch,), device=device)
    setups = {}
    for name, layers in VARIANTS.items():
        module = make_module(args.image_size).to(device).train()
        module.set_trainable_layers(layers)
        lrs = optim.layer_lrs(module.model.backbone.layer_groups(), lr=1e-4)
        opt = optim.build_optimizer(optim.param_groups(module.model.backbone, module.head, lrs, 0.05),
                                    {"_target_": "torch.optim.AdamW", "weight_decay": 0.05})
        for _ in range(2):  # warm-up: allocator, AdamW state, kernels
            step_time(module, opt, x, y, args.bf16)
        setups[name] = (module, opt)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, (module, opt) in setups.items():
            times[name] += [step_time(module, opt, x, y, args.bf16) for _ in range(args.steps)]

    full = statistics.median(times["full fine-tuning"])
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"vit_small, batch {args.batch}, {args.image_size} px, {'bf16 autocast' if args.bf16 else 'fp32'}, "
          f"{where}, torch {torch.__version__}")
    print(f"{'variant':<26} {'trainable params':>16} {'median s/step':>14} {'speed-up':>9}")
    for name, (module, _) in setups.items():
        med = statistics.median(times[name])
        print(f"{name:<26} {module.trainable_parameter_count():>16,} {med:>14.3f} {full / med:>8.2f}x")


if __name__ == "__main__":
    main()
