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
from melanoma.evaluation.checkpoint_io import build_classifier
from melanoma.explain.attention import compute_attention_maps, mass_inside

SIZE, PATCH = 32, 4


def lesions(n, seed):
    rng = np.random.default_rng(seed)
    pairs = [render_lesion(rng, bool(i % 2), SIZE) for i in range(n)]
    images = np.stack([p[0] for p in pairs]).astype(np.float32) / 255.0
    x = torch.from_numpy(((images - IMAGENET_MEAN) / IMAGENET_STD).transpose(0, 3, 1, 2)).float()
    masks = torch.from_numpy(np.stack([p[1] for p in pairs])).float()
    return x, torch.arange(n) % 2, masks


def train(steps=400, seed=1):
    # This 2-layer, dim-32 ViT sometimes sits on the chance plateau (loss ln 2) for hundreds of
    # steps: seed 0 did for 400 with generator v2, seeds 1-3 reached 0.96-0.99 test accuracy.
    # The accuracy assertion below makes "the model learned" a checked premise, not a hope.
    torch.manual_seed(seed)
    x, y, _ = lesions(400, seed=1)
    model = build_classifier("vit_tiny", dict(img_size=SIZE, patch_size=PATCH, embed_dim=32, depth=2, num_heads=2),
                             {"synthetic": ["not_melanoma", "melanoma"]})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        xb = torch.rot90(x[idx], step % 4, (-2, -1))  # lesions have no orientation
        loss = F.cross_entropy(model(xb, "synthetic"), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.slow
def test_rollout_mass_lies_inside_the_lesion_mask():
    model = train()
    x, y, masks = lesions(100, seed=2)
    with torch.no_grad():
        accuracy = float((model(x, "synthetic").argmax(1) == y).float().mean())
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
    print(f"\naccuracy {accuracy:.2f}, mean mask share {share.mean():.3f}; {line}")
    assert accuracy > 0.8
    assert results["rollout"][0] > 0.5
    assert results["rollout"][1] > 1.5 * share.mean()
