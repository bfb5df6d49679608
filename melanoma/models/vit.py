"""A Vision Transformer whose module names are timm's state-dict keys.

Because ``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.N.{norm1,attn.qkv,attn.proj,
norm2,mlp.fc1,mlp.fc2}``, ``norm`` and ``head`` are named exactly as in timm, a DeiT checkpoint
loads 1:1 and strictly (see ``pretrained.py``). The layout is DeiT's: pre-norm blocks, LayerNorm
eps 1e-6, exact GELU, a class token first and then a learned position embedding over all tokens.

Attention runs through ``F.scaled_dot_product_attention``. Only when a caller asks for attention
maps (``return_attention=True``) does a block take the explicit softmax path, so that maps never
slow training; the probabilities it returns stay in the autograd graph, because gradient-weighted
attention rollout differentiates the logits with respect to them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Attention",
    "Block",
    "DropPath",
    "Mlp",
    "PatchEmbed",
    "VisionTransformer",
    "init_vit_weights",
    "vit_base",
    "vit_small",
    "vit_tiny",
]

LAYER_NORM_EPS = 1e-6


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=LAYER_NORM_EPS)


class PatchEmbed(nn.Module):
    """Cut the image into non-overlapping patches and project each one (a strided conv)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(
                f"img_size must be a multiple of patch_size; got img_size={img_size}, "
                f"patch_size={patch_size}. Pick an image size divisible by {patch_size}."
            )
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            # The learned position embedding has one entry per patch of this exact grid.
            raise ValueError(
                f"expected images of {self.img_size[0]}x{self.img_size[1]} px, got "
                f"{x.shape[-2]}x{x.shape[-1]}. Resize the input, or build the model with "
                f"img_size={x.shape[-1]} (load_pretrained resamples pos_embed for it)."
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (timm's layout)."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        B, N, C = x.shape
        # (B, N, 3*C) -> (3, B, heads, N, head_dim): views into the qkv output, no copies.
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if return_attention:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            x = _dropout(self.attn_drop, attn) @ v
        else:
            attn = None
            x = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0
            )
        # Release the (B, N, 3D) qkv buffer before proj allocates its output (inference peak memory;
        # in training autograd keeps it anyway).
        del q, k, v
        x = _dropout(self.proj_drop, self.proj(x.transpose(1, 2).reshape(B, N, C)))
        return (x, attn) if return_attention else x


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _dropout(self.drop2, self.fc2(_dropout(self.drop1, self.act(self.fc1(x)))))


def _dropout(module: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    # Zero-rate dropout is the common case (DeiT fine-tuning): skipping the module call saves
    # Python/dispatcher overhead that is visible when a small model is launch-bound on a GPU.
    return module(x) if module.training and module.p > 0.0 else x


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, rescale the kept ones."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.norm1 = _layer_norm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = _layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.drop_path = DropPath(drop_path)

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # Residual branches are single expressions so that each branch output is freed as soon as
        # it has been added: a name holding it would keep one more (B, N, D) buffer alive through
        # the MLP (peak inference memory).
        if return_attention:
            y, attn = self.attn(self.norm1(x), return_attention=True)
            x = x + self._drop_path(y)
            del y
        else:
            x = x + self._drop_path(self.attn(self.norm1(x)))
        x = x + self._drop_path(self.mlp(self.norm2(x)))
        return (x, attn) if return_attention else x

    def _drop_path(self, y: torch.Tensor) -> torch.Tensor:
        return self.drop_path(y) if self.training and self.drop_path.drop_prob > 0.0 else y


class VisionTransformer(nn.Module):
    """ViT with a class token; ``forward_features`` returns all tokens after the final ``norm``."""

    num_prefix_tokens = 1
    #: attention weights can be read (melanoma.explain: rollout and friends)
    reads_attention = True

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 0,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.num_features = embed_dim
        self.depth = depth
        self.num_heads = num_heads

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid_size = self.patch_embed.grid_size
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + self.num_prefix_tokens, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        # Stochastic depth grows linearly with depth, as in DeiT.
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, rates[i])
            for i in range(depth)
        )
        self.norm = _layer_norm(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        init_vit_weights(self)

    # --- layer groups (what optimiser groups, layer-wise rates and unfreezing address) --------

    def layer_groups(self) -> list[str]:
        """The backbone's layers in forward order: ``patch_embed``, ``pos_cls`` (``pos_embed`` and
        ``cls_token``), ``block0`` ... ``block{depth-1}``, ``norm`` (like timm's group_matcher)."""
        return ["patch_embed", "pos_cls", *(f"block{i}" for i in range(self.depth)), "norm"]

    @staticmethod
    def layer_of(name: str) -> str:
        """The layer group of a parameter, by its name relative to the backbone."""
        if name.startswith("patch_embed."):
            return "patch_embed"
        if name in ("pos_embed", "cls_token"):
            return "pos_cls"
        if name.startswith("blocks."):
            return "block" + name.split(".")[1]
        if name.startswith("norm."):
            return "norm"
        raise ValueError(
            f"backbone parameter {name!r} belongs to no known layer (patch_embed, pos_embed/cls_token, "
            f"blocks.N, norm); the ViT's parameter names must mirror timm's"
        )

    def frozen_prefix(self, trainable: set[str] | None) -> int:
        """How many forward stages (0: the token embedding, 1..depth: the blocks, depth + 1:
        the final norm) lie below every trainable layer and can run without autograd."""
        if trainable is None or {"patch_embed", "pos_cls"} & trainable:
            return 0
        lowest = next((i for i in range(self.depth) if f"block{i}" in trainable), None)
        if lowest is not None:
            return 1 + lowest
        return 1 + self.depth if "norm" in trainable else 2 + self.depth

    # --- forward ---------------------------------------------------------------------------

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return _dropout(self.pos_drop, x + self.pos_embed)

    def forward_features(
        self, x: torch.Tensor, return_attention: bool = False, frozen_prefix: int = 0
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """All tokens after the final norm. The first ``frozen_prefix`` stages (see
        ``frozen_prefix()``) run under no_grad: frozen layers then cost no backward pass and
        keep no activations."""
        if frozen_prefix and torch.is_grad_enabled() and not return_attention:
            with torch.no_grad():
                x = self.prepare_tokens(x)
                for block in self.blocks[: frozen_prefix - 1]:
                    x = block(x)
                if frozen_prefix > self.depth + 1:
                    return self.norm(x).detach()
            for block in self.blocks[max(frozen_prefix - 1, 0):]:
                x = block(x)
            return self.norm(x)
        x = self.prepare_tokens(x)
        if not return_attention:
            for block in self.blocks:
                x = block(x)
            return self.norm(x)
        attentions = []
        for block in self.blocks:
            x, attn = block(x, return_attention=True)
            attentions.append(attn)
        return self.norm(x), attentions

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = tokens[:, 0]
        if pre_logits:
            return x
        return self.head(_dropout(self.head_drop, x))

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        if return_attention:
            tokens, attentions = self.forward_features(x, return_attention=True)
            return self.forward_head(tokens), attentions
        return self.forward_head(self.forward_features(x))



# --- initialisation (kept apart from the forward code) -------------------------------------------


def _init_linear(m: nn.Linear) -> None:
    nn.init.trunc_normal_(m.weight, std=0.02)
    if m.bias is not None:
        nn.init.zeros_(m.bias)


@torch.no_grad()
def init_vit_weights(model: VisionTransformer) -> None:
    """timm's default ViT init: truncated normal (std 0.02) for pos_embed and every Linear with
    zero biases, a near-zero normal (std 1e-6) class token, LayerNorm ones/zeros. The patch
    projection keeps PyTorch's Conv2d default, as timm's does."""
    nn.init.trunc_normal_(model.pos_embed, std=0.02)
    nn.init.normal_(model.cls_token, std=1e-6)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            _init_linear(m)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --- DeiT presets --------------------------------------------------------------------------------

PRESETS = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
}


def _preset(name: str, kw: dict) -> VisionTransformer:
    args = dict(patch_size=16, mlp_ratio=4.0, qkv_bias=True, **PRESETS[name])
    args.update(kw)
    return VisionTransformer(**args)


def vit_tiny(**kw) -> VisionTransformer:
    """DeiT-Tiny: 192 dim, 12 blocks, 3 heads, patch 16."""
    return _preset("vit_tiny", kw)


def vit_small(**kw) -> VisionTransformer:
    """DeiT-Small: 384 dim, 12 blocks, 6 heads, patch 16."""
    return _preset("vit_small", kw)


def vit_base(**kw) -> VisionTransformer:
    """DeiT-Base: 768 dim, 12 blocks, 12 heads, patch 16."""
    return _preset("vit_base", kw)
