"""A model that learned the synthetic task looks at the lesion: attention-rollout mass inside
the generator's lesion mask exceeds the mask's share of the image on most test images.

An untrained model spreads attention evenly (mass inside = mask share, so "above share" on only
~20 % of images); the longer measurement at 64 px is experiments/attention_mass.py."""

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from melanoma.data.synthetic import render_lesion
from melanoma.conventions import IMAGENET_MEAN, IMAGENET_STD
from melanoma.models.checkpoint_io import build_classifier
from melanoma.explain.attention import compute_attention_maps, mass_inside

SIZE, PATCH = 32, 4


def lesions(n, seed):
    rng = np.random.default_rng(seed)
    pairs = [render_lesion(rng, bool(i % 2), SIZE) for i in range(n)]
    images = np.stack([p[0] for p in pairs]).astype(np.float32) / 255.0
    x = torch.from_numpy(((images - IMAGENET_MEAN) / IMAGENET_STD).transpose(0, 3, 1, 2)).float()
    masks = torch.from_numpy(np.stack([p[1] for p in pairs])).float()
    return x, torch.arange(n) % 2, masks


SEEDS = (1, 2)  # the claim must hold for every seed, not for one lucky initialisation
LEARNED = 0.85  # validation accuracy at which training stops: the model has learned the task
MAX_STEPS, CHECK_EVERY = 400, 25


def train(seed, x, y, x_val, y_val):
    """AdamW on 32-image batches until the validation accuracy reaches LEARNED (checked every
    CHECK_EVERY steps) or MAX_STEPS pass. Returns the model and its last validation accuracy.

    A 2-layer, dim-32 ViT can sit on the chance plateau (loss ln 2) for a couple of hundred
    steps; seeds 1 and 2 leave it after 150-250 steps."""
    torch.manual_seed(seed)
    model = build_classifier("vit_tiny", dict(img_size=SIZE, patch_size=PATCH, embed_dim=32, depth=2, num_heads=2),
                             {"synthetic": ["not_melanoma", "melanoma"]})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    val_accuracy = 0.0
    for step in range(MAX_STEPS):
        idx = torch.randint(0, len(x), (32,), generator=g)
        xb = torch.rot90(x[idx], step % 4, (-2, -1))  # lesions have no orientation
        loss = F.cross_entropy(model(xb, "synthetic"), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % CHECK_EVERY == 0:
            val_accuracy = accuracy(model, x_val, y_val)
            if val_accuracy >= LEARNED:
                break
    return model.eval(), val_accuracy


def accuracy(model, x, y) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        acc = float((model(x, "synthetic").argmax(1) == y).float().mean())
    model.train(was_training)
    return acc


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_rollout_mass_lies_inside_the_lesion_mask(seed):
    x_train, y_train, _ = lesions(400, seed=1)
    x_val, y_val, _ = lesions(64, seed=3)
    model, val_accuracy = train(seed, x_train, y_train, x_val, y_val)
    x, y, masks = lesions(100, seed=2)
    test_accuracy = accuracy(model, x, y)
    # the premise first: a model that did not learn the task says nothing about where it looks
    assert val_accuracy >= LEARNED and test_accuracy > 0.8, (
        f"seed {seed}: the model did not learn the synthetic task in {MAX_STEPS} steps (validation accuracy "
        f"{val_accuracy:.2f}, test {test_accuracy:.2f}; expected >= {LEARNED} and > 0.8); train longer or change "
        "the learning rate before reading the attention assertions")
    # mask share per patch, on the same grid as the maps
    share_per_patch = F.avg_pool2d(masks[:, None], PATCH)[:, 0].numpy()
    share = share_per_patch.mean(axis=(1, 2))
    maps = compute_attention_maps(functools.partial(model.forward, head="synthetic"), x, model.backbone.grid_size,
                                  methods=("last_layer", "rollout", "grad_rollout"))
    results = {}
    for method, m in maps.maps.items():
        inside = mass_inside(m, share_per_patch)
        results[method] = ((inside > share).mean(), inside.mean())
    line = "; ".join(f"{k}: mass inside > mask share on {a:.0%} (mean {b:.3f})" for k, (a, b) in results.items())
    print(f"\nseed {seed}: accuracy {test_accuracy:.2f}, mean mask share {share.mean():.3f}; {line}")
    assert results["rollout"][0] > 0.5
    assert results["rollout"][1] > 1.5 * share.mean()
