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


def step_time(module: LesionClassifier, opt: torch.optim.Optimizer, x, y) -> float:
    t0 = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(module(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)
    y = torch.randint(0, 2, (args.batch,))
    setups = {}
    for name, layers in VARIANTS.items():
        module = make_module(args.image_size).train()
        module.set_trainable_layers(layers)
        lrs = optim.layer_lrs(module.model.backbone.depth, lr=1e-4)
        opt = optim.build_optimizer(optim.param_groups(module.model.backbone, module.head, lrs, 0.05), {})
        step_time(module, opt, x, y)  # warm-up: allocator, AdamW state
        setups[name] = (module, opt)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, (module, opt) in setups.items():
            times[name] += [step_time(module, opt, x, y) for _ in range(args.steps)]

    full = statistics.median(times["full fine-tuning"])
    print(f"vit_small, batch {args.batch}, {args.image_size} px, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print(f"{'variant':<26} {'trainable params':>16} {'median s/step':>14} {'speed-up':>9}")
    for name, (module, _) in setups.items():
        med = statistics.median(times[name])
        print(f"{name:<26} {module.trainable_parameter_count():>16,} {med:>14.3f} {full / med:>8.2f}x")


if __name__ == "__main__":
    main()
