"""Load DeiT/timm ViT weights into our VisionTransformer, strictly.

The reference project loaded ``deit_base_patch16_224`` with ``strict=False``: 4 of 152 tensors
arrived and nobody noticed. Here every backbone tensor must load: a missing, unexpected or
mis-shaped key is an error that names it. Only the ImageNet classifier (``head.*``) is dropped,
and ``pos_embed`` is resampled (bicubic with antialiasing, as timm does) when the model's patch
grid differs from the checkpoint's.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

from melanoma.models.vit import VisionTransformer

__all__ = ["PretrainedWeightsError", "load_pretrained", "read_state_dict", "resample_pos_embed",
           "state_dict_mismatch", "weights_provenance"]

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors",)
ACCEPTED = (
    ".pth/.pt/.bin (a state_dict, or the official DeiT {'model': state_dict} wrapper) "
    "or .safetensors"
)
DROPPED_PREFIXES = ("head.",)


class PretrainedWeightsError(RuntimeError):
    """Weights that cannot be loaded completely into the model."""


def state_dict_mismatch(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> str:
    """Describe missing, unexpected and mis-shaped keys ('' when ``found`` fits ``expected``)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mis_shaped = [
        f"{k} (checkpoint {tuple(found[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items() if k in found and tuple(found[k].shape) != tuple(v.shape)
    ]
    parts = [f"{label}: {keys}" for label, keys in
             (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped)) if keys]
    return "; ".join(parts)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a local file, unwrapping DeiT's ``{"model": ...}``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        return dict(load_file(str(path), device="cpu"))
    if suffix not in TORCH_SUFFIXES:
        raise PretrainedWeightsError(f"unsupported weights file {path}: expected {ACCEPTED}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise PretrainedWeightsError(
            f"{path} holds pickled objects other than tensors, which torch.load(weights_only=True) "
            f"refuses to run ({e}). Re-save just the weights: torch.save(model.state_dict(), path)."
        ) from e
    # Official DeiT releases wrap the weights as {"model": ..., "optimizer": ..., ...}.
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PretrainedWeightsError(
            f"{path} does not hold a state dict of tensors (found {type(obj).__name__}); "
            f"expected {ACCEPTED}"
        )
    return dict(obj)


def _hub_state_dict(name: str) -> dict[str, torch.Tensor]:
    """Fetch ``name``'s pretrained weights through timm (Hugging Face hub cache or download)."""
    import timm

    if not (timm.is_model(name) or name.startswith("hf-hub:")):
        raise PretrainedWeightsError(
            f"{name!r} is neither an existing file nor a timm model name. Pass a local file "
            f"({ACCEPTED}) or a timm name such as 'deit_base_patch16_224'."
        )
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - only used for the offline check and a nicer hint
        cfg = None
    hint = f" (e.g. {cfg.url})" if cfg is not None and cfg.url else ""
    offline = _hub_offline()

    def fail(reason: str) -> PretrainedWeightsError:
        return PretrainedWeightsError(
            f"could not fetch pretrained weights for {name!r} through timm / the Hugging Face hub: "
            f"{reason}\nTo use weights without network, download the checkpoint on a machine that "
            f"has it{hint} and pass the local file instead: model.pretrained=FILE on the train.py "
            f"command line (in Python: load_pretrained(backbone, FILE); accepted: {ACCEPTED}); or "
            f"copy a Hugging Face cache (HF_HOME) that holds {name!r}; or train from scratch with "
            f"model.pretrained=null. Set HF_HUB_OFFLINE=1 to skip every network look-up."
        )

    cached = cfg is not None and cfg.hf_hub_id and _in_hub_cache(cfg.hf_hub_id, cfg.hf_hub_filename)
    # Offline and not cached: say so at once, before timm spends seconds building the model.
    if offline and cfg is not None and cfg.hf_hub_id and not cached:
        raise fail(f"HF_HUB_OFFLINE=1 and {cfg.hf_hub_id!r} is not in the local hub cache")
    # Not cached and the hub unreachable: huggingface_hub would retry for a minute, each warning
    # printed twice, before failing the same way. One connection attempt says it in seconds.
    if not offline and not cached:
        unreachable = _hub_unreachable()
        if unreachable:
            raise fail(f"{unreachable}, and {name!r} is not in the local hub cache")
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as e:  # noqa: BLE001 - hub/network errors come in many types; all mean "not here"
        raise fail(f"{'(HF_HUB_OFFLINE=1) ' if offline else ''}{type(e).__name__}: {e}") from e
    return model.state_dict()


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


#: seconds one connection attempt to the hub may take before it counts as unreachable
HUB_PROBE_TIMEOUT_S = 3.0


def _hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached (no DNS, refused, timed out), or None when a
    TCP connection opens, or when a proxy is configured (the proxy decides; we cannot probe it)."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except ImportError:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as e:
        return f"the hub ({host}:{port}) cannot be reached ({type(e).__name__}: {e})"
    return None


def _in_hub_cache(repo_id: str, filename: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    # timm reads model.safetensors when a repo has it, else pytorch_model.bin.
    names = [filename] if filename else ["model.safetensors", "pytorch_model.bin"]
    return any(isinstance(try_to_load_from_cache(repo_id, n), str) for n in names)


def resample_pos_embed(
    pos_embed: torch.Tensor, new_grid: tuple[int, int], num_prefix_tokens: int = 1
) -> torch.Tensor:
    """Resample a (1, prefix + H*W, D) position embedding to another patch grid.

    Bicubic with antialiasing, as timm does, so our 384 px model equals timm's resampled one.
    The class-token entry is kept as it is.
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    side = math.isqrt(grid.shape[1])
    if side * side != grid.shape[1]:
        raise PretrainedWeightsError(
            f"pos_embed has {grid.shape[1]} patch positions, not a square grid; cannot resample it "
            f"to {new_grid[0]}x{new_grid[1]}"
        )
    if (side, side) == tuple(new_grid):
        return pos_embed
    dim, dtype = grid.shape[-1], grid.dtype
    grid = grid.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(dtype)
    log.info("resampled pos_embed from %dx%d to %dx%d patches", side, side, *new_grid)
    return torch.cat([prefix, grid], dim=1)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_provenance(source: str | Path | None, license: str | None = None) -> dict:
    """Where a backbone's initial weights came from, as the checkpoint records it: a local file's
    name and sha256, or the hub name timm fetched; None source: random initialisation."""
    record = {"source": None, "name": None, "sha256": None, "license": license}
    if source is None:
        return record
    path = Path(source)
    if path.is_file():
        return record | {"source": "file", "name": path.name, "sha256": _sha256(path)}
    return record | {"source": "hub", "name": str(source)}


def _read_source(source: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    path = Path(source)
    if path.is_file():
        return read_state_dict(path), str(path)
    if path.suffix.lower() in TORCH_SUFFIXES + SAFETENSORS_SUFFIXES:
        # Looks like a file name: do not send a typo to the hub as a model name.
        raise PretrainedWeightsError(f"pretrained weights file not found: {path}")
    return _hub_state_dict(str(source)), f"timm:{source}"


def load_pretrained(model, source: str | Path):
    """Load pretrained backbone weights into ``model`` in place and return it.

    ``source`` is a local ``.pth``/``.pt``/``.bin``/``.safetensors`` file, or, when it is not an
    existing file, a timm model name (e.g. ``"deit_base_patch16_224"``) fetched through timm and
    the Hugging Face hub cache. The ImageNet classifier is dropped (``head.*`` for our ViT, the
    timm model's own classifier for a timm backbone); everything else must match exactly.
    """
    if getattr(model, "family", None) == "open_clip":  # a file, a published folder or an hf-hub name
        model.load_weights(source)
        return model
    state, where = _read_source(source)
    if not isinstance(model, VisionTransformer):  # a timm backbone (melanoma.models.timm_backbone)
        model.load_timm_state_dict(state, where)
        return model

    state = {k: v for k, v in state.items() if not k.startswith(DROPPED_PREFIXES)}
    if "pos_embed" in state and state["pos_embed"].shape != model.pos_embed.shape:
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], model.grid_size, model.num_prefix_tokens)

    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(DROPPED_PREFIXES)}
    problems = state_dict_mismatch(expected, state)
    if problems:
        raise PretrainedWeightsError(
            f"weights from {where} do not fit {type(model).__name__}(embed_dim={model.embed_dim}, "
            f"depth={model.depth}, num_heads={model.num_heads}, patch_size={model.patch_size}): "
            f"{problems}. Use the preset matching the checkpoint (vit_tiny/vit_small/vit_base)."
        )
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and all(k.startswith(DROPPED_PREFIXES) for k in result.missing_keys)
    log.info("loaded all %d backbone tensors from %s (head.* not loaded)", len(state), where)
    return model
