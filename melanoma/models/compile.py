"""``model.compile``: torch.compile the backbone in place, so checkpoints keep plain key names.

``torch.compile(module)`` returns a wrapper whose state-dict keys gain ``_orig_mod.``; a checkpoint
written through it no longer loads into an uncompiled model (predict, export, init_from).
``nn.Module.compile()`` instead compiles a module's ``__call__`` in place and leaves its
parameters, names and state dict as they were.

What gets compiled is each transformer block (plus the patch embedding and final norm), not the
``VisionTransformer`` object: the training forward runs the blocks one by one (frozen stages under
no_grad, see LesionClassifier.forward) and ``Classifier`` calls ``forward_features`` /
``forward_head``, so the backbone's own ``__call__`` is never the entry point. Blocks that differ
only in a Python float (stochastic depth grows with depth: each block's ``drop_path.drop_prob``)
are one recompile each; Dynamo's recompile limit (8) would leave blocks 9.. of a 12-block ViT
uncompiled, silently, so it is raised to cover every block.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_BACKEND", "compile_backbone", "is_compiled"]

DEFAULT_BACKEND = "inductor"


def compile_backbone(backbone: nn.Module, backend=DEFAULT_BACKEND, **options) -> nn.Module:
    """Compile ``backbone``'s blocks, patch embedding and final norm in place (a timm backbone:
    its top-level stages); returns ``backbone``.

    ``backend``: anything ``torch.compile`` accepts ("inductor", "aot_eager", "eager", a callable).
    ``options``: further ``torch.compile`` arguments (mode, fullgraph, dynamic, ...).
    """
    if getattr(backbone, "family", None) == "timm":
        # a timm model (melanoma.models.timm_backbone): its top-level stages that hold weights
        parts = [m for m in backbone.net.children() if next(m.parameters(), None) is not None]
    elif getattr(backbone, "family", None) == "open_clip":
        parts = [backbone.visual]  # the whole image tower (melanoma.models.open_clip_backbone)
    else:
        parts = [*getattr(backbone, "blocks", []), getattr(backbone, "patch_embed", None), getattr(backbone, "norm", None)]
    parts = [p for p in parts if p is not None]
    if not parts:
        raise ValueError(f"expected a VisionTransformer with blocks, patch_embed and norm; "
                         f"found {type(backbone).__name__} with none of them")
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    # every part may be one recompile of the same Block.forward code (see the module docstring),
    # and each again under no_grad (frozen stages) and in eval mode: three variants per part
    setattr(config, name, max(getattr(config, name), 3 * len(parts) + 8))
    for part in parts:
        part.compile(backend=backend, **options)
    log.info("backbone compiled in place (%d modules, backend %s)", len(parts), backend)
    return backbone


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` was compiled in place by ``nn.Module.compile``."""
    return getattr(module, "_compiled_call_impl", None) is not None
