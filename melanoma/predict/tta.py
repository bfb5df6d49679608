"""Test-time augmentation over the 8 symmetries of the square (4 rotations x optional flip).

Dermoscopy has no canonical orientation, so each view is an equally valid picture of the
lesion. Logits are averaged (not probabilities) so that temperature scaling and the ONNX export
compose with TTA the same way they do with a single view."""

from __future__ import annotations

from typing import Callable

import torch

# (number of 90-degree rotations, horizontal flip first)
DIHEDRAL_VIEWS: tuple[tuple[int, bool], ...] = tuple((k, f) for f in (False, True) for k in range(4))


def dihedral_view(x: torch.Tensor, rotations: int, flip: bool) -> torch.Tensor:
    """One view of a (B, C, H, W) batch; H must equal W for rotations of 90 or 270 degrees
    to keep the model's input size."""
    if flip:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, k=rotations, dims=(-2, -1)) if rotations else x


def tta_logits(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Mean of forward(view) over the 8 dihedral views of the batch x."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"TTA rotations need square images, got {tuple(x.shape[-2:])}")
    total = None
    for rotations, flip in DIHEDRAL_VIEWS:
        logits = forward(dihedral_view(x, rotations, flip))
        total = logits if total is None else total + logits
    return total / len(DIHEDRAL_VIEWS)
