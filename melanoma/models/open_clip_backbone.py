"""The image tower of an open_clip model (CLIP, DermLIP, MAKE, BiomedCLIP...) as a backbone.

It offers the interface our ViT and ``TimmBackbone`` offer the rest of the house:
``layer_groups()`` (``stem``, ``block0`` ... ``block{n-1}``, ``norm``), ``layer_of(name)``,
``frozen_prefix``, ``forward_features`` / ``forward_head`` and ``embed_dim``, so heads, gradual
unfreezing, layer-wise LR decay, calibration, predict, export and serve work unchanged.

Features are the tower's output: the image embedding in the joint image-text space (after the
tower's projection, before normalisation), the vector zero-shot classification compares with the
text embeddings (``melanoma.models.zero_shot``) and the one published linear probes use.

The architecture is open_clip's model config (``embed_dim``, ``vision_cfg``, ...). It is resolved
once, when training starts (``resolve_open_clip``: a built-in name, an ``hf-hub:`` name, a local
folder as the hub publishes it, or a JSON config file), and stored with the backbone's keyword
arguments in the checkpoint (``model_cfg``), so a checkpoint alone rebuilds the tower: no
network, no config file and no weights file are needed to predict, evaluate, export or serve.

The module is ``self.visual``: the state dict is open_clip's ``visual.*`` keys unchanged, so
open_clip weights (the full image-text state dict) load strictly into it, the text tower's keys
being set aside.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from melanoma.models.grouped import GroupedBackbone

log = logging.getLogger(__name__)

__all__ = ["FAMILY_OPEN_CLIP", "OpenClipBackbone", "OpenClipError", "OpenClipGroupingError", "OpenClipSource",
           "build_clip_model", "open_clip_settings", "read_open_clip_state_dict", "resolve_open_clip"]

FAMILY_OPEN_CLIP = "open_clip"
INSTALL_HINT = 'pip install -e ".[open_clip]" (the open_clip_torch package)'
#: the config file a published open_clip folder (hub repository) holds
CONFIG_FILE = "open_clip_config.json"
#: weights files of a published open_clip folder, in the order open_clip prefers them
FOLDER_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                  "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth",
                  "model.pth")
HF_HUB_PREFIX = "hf-hub:"
VISUAL = "visual."
#: the layer of the parameters after the last block (final norm, projection, attention pooling)
NORM = "norm"
STEM = "stem"


class OpenClipError(ValueError):
    """An open_clip architecture or weights source that cannot be used as asked."""


class OpenClipGroupingError(OpenClipError):
    """An image tower whose parameters cannot be grouped into layers (unfreezing, LLRD)."""


def _open_clip():
    try:
        import open_clip
    except ImportError as e:
        raise ImportError(f"model=open_clip needs the open_clip_torch package ({e}); install it: {INSTALL_HINT}") from e
    return open_clip


# --- where the architecture and the weights come from ------------------------------------------

class OpenClipSource:
    """An open_clip architecture resolved from ``model.backbone.name`` and ``model.pretrained``:
    ``model_cfg`` (open_clip's model config), ``preprocess`` (size, mean, std, interpolation from
    the model's config), ``weights`` (a local weights file, or None) and ``hub`` (the hub name the
    weights came from, or None)."""

    def __init__(self, name: str, model_cfg: dict, preprocess: dict, weights: Path | None, hub: str | None,
                 folder: Path | None = None):
        self.name, self.model_cfg, self.preprocess = name, model_cfg, preprocess
        self.weights, self.hub, self.folder = weights, hub, folder

    def __repr__(self) -> str:
        return f"OpenClipSource({self.name!r}, weights={self.weights}, hub={self.hub})"


def _default_preprocess() -> dict:
    from dataclasses import asdict

    from open_clip.transform import PreprocessCfg

    return asdict(PreprocessCfg())


def _merge_preprocess(base: dict, extra: Mapping | None) -> dict:
    keys = ("size", "mean", "std", "interpolation", "resize_mode")
    return {**base, **{k: v for k, v in dict(extra or {}).items() if k in keys and v is not None}}


def _read_config_file(path: Path) -> tuple[dict, dict]:
    """(model_cfg, preprocess_cfg) of an ``open_clip_config.json`` (or a bare model config)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise OpenClipError(f"cannot read the open_clip config {path}: {e}") from e
    model_cfg = data.get("model_cfg", data)
    if not all(k in model_cfg for k in ("embed_dim", "vision_cfg")):
        raise OpenClipError(f"{path} is not an open_clip model config: expected 'embed_dim' and 'vision_cfg' (at the "
                            f"top or under 'model_cfg'), found {sorted(model_cfg)}")
    return dict(model_cfg), dict(data.get("preprocess_cfg") or {})


def _folder_weights(folder: Path) -> Path:
    for name in FOLDER_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pth", ".pt"))
    if len(found) == 1:
        return folder / found[0]
    raise OpenClipError(f"{folder} holds {CONFIG_FILE} but {'no weights file' if not found else f'several: {found}'}; "
                        f"expected one of {list(FOLDER_WEIGHTS)} (as the hub repository publishes them)")


def _hub_file(repo: str, filename: str) -> Path:
    """A file of a hub repository: from the local cache, else downloaded; offline or unreachable
    and not cached, an error that says what to do instead."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    from melanoma.models.pretrained import _hub_offline, _hub_unreachable

    cached = try_to_load_from_cache(repo, filename)
    if isinstance(cached, str):
        return Path(cached)
    todo = (f"Download the repository on a machine with network (`huggingface-cli download {repo} "
            f"--local-dir DIR`, or the files from https://huggingface.co/{repo}) and pass the folder: "
            f"model.pretrained=DIR (it holds {CONFIG_FILE} and the weights); or copy a Hugging Face cache (HF_HOME) "
            f"that holds {repo!r}")
    reason = ("HF_HUB_OFFLINE=1" if _hub_offline() else _hub_unreachable())
    if reason:
        raise OpenClipError(f"cannot fetch {filename} of hf-hub:{repo}: {reason}, and it is not in the local hub "
                            f"cache. {todo}.")
    try:
        return Path(hf_hub_download(repo, filename))
    except Exception as e:  # noqa: BLE001 - hub errors come in many types; all mean "not here"
        raise OpenClipError(f"cannot fetch {filename} of hf-hub:{repo} ({type(e).__name__}: {e}). {todo}.") from e


def _hub_weights(repo: str) -> Path:
    errors = []
    for name in FOLDER_WEIGHTS[:4]:
        try:
            return _hub_file(repo, name)
        except OpenClipError as e:
            errors.append(str(e))
    raise OpenClipError(errors[-1])


def resolve_open_clip(name: str, pretrained: str | Path | None = None) -> OpenClipSource:
    """The architecture (and weights) that ``model.backbone.name`` and ``model.pretrained`` name.

    ``pretrained``: a local weights file (open_clip's full state dict: ``.safetensors``,
    ``.bin``, ``.pth``, ``.pt``), a local folder as a hub repository publishes it
    (``open_clip_config.json`` + weights: its config is the architecture), an ``hf-hub:`` name,
    or None (random initialisation). ``name``: an open_clip built-in architecture
    (``ViT-B-16``; ``open_clip.list_models()``), an ``hf-hub:org/repo`` name (config and, with
    ``pretrained`` None, weights from the hub), or a JSON file holding an open_clip model config.
    """
    open_clip = _open_clip()
    preprocess = _default_preprocess()
    weights = hub = folder = None
    source = None if pretrained in (None, "", "null") else str(pretrained)
    if source is not None and not source.startswith(HF_HUB_PREFIX):
        path = Path(source).expanduser()
        if path.is_dir():
            if not (path / CONFIG_FILE).is_file():
                raise OpenClipError(f"model.pretrained={source}: a folder without {CONFIG_FILE}; expected a folder as "
                                    f"the hub publishes an open_clip model ({CONFIG_FILE} and the weights), or a "
                                    f"weights file")
            folder = path
        elif not path.is_file():
            raise FileNotFoundError(f"model.pretrained={source}: no such file or folder; pass an open_clip weights file, "
                                    f"a downloaded open_clip folder, an hf-hub: name, or null")
        else:
            weights = path
    if folder is not None:
        model_cfg, extra = _read_config_file(folder / CONFIG_FILE)
        preprocess = _merge_preprocess(preprocess, extra)
        weights = _folder_weights(folder)
        _check_named_architecture(open_clip, name, model_cfg, folder)
    elif name.startswith(HF_HUB_PREFIX) or (source or "").startswith(HF_HUB_PREFIX):
        repo = (source if (source or "").startswith(HF_HUB_PREFIX) else name)[len(HF_HUB_PREFIX):]
        model_cfg, extra = _read_config_file(_hub_file(repo, CONFIG_FILE))
        preprocess = _merge_preprocess(preprocess, extra)
        if weights is None:
            weights, hub = _hub_weights(repo), f"{HF_HUB_PREFIX}{repo}"
    elif name.lower().endswith(".json"):
        model_cfg, extra = _read_config_file(Path(name).expanduser())
        preprocess = _merge_preprocess(preprocess, extra)
    else:
        model_cfg = open_clip.get_model_config(name)
        if model_cfg is None:
            close = [m for m in open_clip.list_models() if name.split("-")[0].lower() in m.lower()][:8]
            raise OpenClipError(f"model.backbone.name={name!r} is not an open_clip architecture (open_clip "
                                f"{open_clip.__version__}); similar: {close or 'none'}. Pass a built-in name "
                                f"(open_clip.list_models()), hf-hub:ORG/REPO, a JSON model config, or "
                                f"model.pretrained=<downloaded folder> (its {CONFIG_FILE} names the architecture)")
    model_cfg = dict(model_cfg)
    model_cfg.pop("custom_text", None)  # which text tower class: irrelevant to the image tower
    return OpenClipSource(name, model_cfg, preprocess, weights, hub, folder)


#: open_clip's interpolation names -> a dataset config's (dataset.augment.interpolation)
_INTERPOLATIONS = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest", "lanczos": "lanczos",
                   "area": "area", "box": "area"}


def open_clip_settings(name: str, pretrained: str | Path | None) -> dict:
    """What a training run takes from the model's config: ``model_cfg`` (stored in the
    checkpoint), ``mean``/``std``, ``interpolation`` (a dataset config's name) and ``size`` (the
    pretraining input size, for the record)."""
    source = resolve_open_clip(name, pretrained)
    pre = source.preprocess
    interpolation = str(pre.get("interpolation", "bicubic")).lower()
    if interpolation not in _INTERPOLATIONS:
        raise OpenClipError(f"{name}: the model's preprocessing interpolation {interpolation!r} is not one of "
                            f"{sorted(_INTERPOLATIONS)}")
    size = source.model_cfg["vision_cfg"].get("image_size", pre.get("size"))  # what the tower was built for
    return {"model_cfg": source.model_cfg, "mean": [float(m) for m in pre["mean"]],
            "std": [float(s) for s in pre["std"]], "interpolation": _INTERPOLATIONS[interpolation],
            "size": size}


def _check_named_architecture(open_clip, name: str, model_cfg: dict, folder: Path) -> None:
    """A built-in name beside a folder must describe the folder's image tower."""
    builtin = open_clip.get_model_config(name) if not name.startswith(HF_HUB_PREFIX) else None
    if builtin is None:
        return
    if builtin.get("vision_cfg") != model_cfg.get("vision_cfg") or builtin.get("embed_dim") != model_cfg.get("embed_dim"):
        raise OpenClipError(
            f"model.backbone.name={name} is open_clip's {builtin.get('vision_cfg')} (embed_dim "
            f"{builtin.get('embed_dim')}), but {folder / CONFIG_FILE} describes {model_cfg.get('vision_cfg')} (embed_dim "
            f"{model_cfg.get('embed_dim')}); the folder's weights are that architecture: name it (or any label that "
            f"is not a built-in name) as model.backbone.name")


def read_open_clip_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """An open_clip state dict from a local file (safetensors, or torch.load with weights_only):
    training checkpoints' ``{"state_dict": ...}`` and DDP's ``module.`` prefix are unwrapped."""
    from melanoma.models.pretrained import read_state_dict

    state = read_state_dict(path)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


# --- the tower -----------------------------------------------------------------------------------

def _vision_tower(model_cfg: Mapping, img_size: int | None) -> nn.Module:
    _open_clip()
    from open_clip.model import _build_vision_tower

    vision_cfg = copy.deepcopy(dict(model_cfg["vision_cfg"]))
    if img_size is not None:
        vision_cfg["image_size"] = int(img_size)
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False  # weights come from the open_clip file, never timm's hub
    return _build_vision_tower(int(model_cfg["embed_dim"]), vision_cfg, quick_gelu=bool(model_cfg.get("quick_gelu", False)))


def build_clip_model(model_cfg: Mapping, img_size: int | None = None) -> nn.Module:
    """The whole open_clip model (image and text towers) of ``model_cfg``, randomly initialised:
    for zero-shot classification, which needs the text tower (``melanoma.models.zero_shot``)."""
    _open_clip()
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = copy.deepcopy(dict(model_cfg))
    if img_size is not None:
        cfg["vision_cfg"]["image_size"] = int(img_size)
    if "timm_model_name" in cfg["vision_cfg"]:
        cfg["vision_cfg"]["timm_model_pretrained"] = False
    hf_text = "hf_model_name" in (cfg.get("text_cfg") or {})
    if hf_text:
        cfg["text_cfg"]["hf_model_pretrained"] = False
    if "multimodal_cfg" in cfg:
        raise OpenClipError("CoCa models (a multimodal_cfg) are not supported for zero-shot here; their image "
                            "tower still works as a backbone (model=open_clip)")
    cls = CustomTextCLIP if (cfg.pop("custom_text", False) or hf_text) else CLIP
    return cls(**cfg)


class OpenClipBackbone(GroupedBackbone):
    """An open_clip image tower; features are its image embedding (B, embed_dim).

    ``model_cfg``: open_clip's model config (None: resolved from ``name``, a built-in
    architecture, a JSON config file or an hf-hub name); ``img_size``: the input size (the
    tower's position embedding is built for it; pretrained ones are resampled on load)."""

    family = FAMILY_OPEN_CLIP

    def __init__(self, name: str, model_cfg: Mapping | None = None, img_size: int | None = None):
        super().__init__()
        if model_cfg is None:
            model_cfg = resolve_open_clip(name).model_cfg
        self.name = name
        self.model_cfg = copy.deepcopy(dict(model_cfg))
        self.img_size = img_size
        self.visual = _vision_tower(self.model_cfg, img_size)
        self.embed_dim = self.num_features = int(self.model_cfg["embed_dim"])
        self._groups = _layer_map(self.visual, name)
        self._layers = _forward_order(set(self._groups.values()))
        #: the local weights file the tower was initialised from (provenance), set by load_weights
        self.weights_file: Path | None = None

    def checkpoint_kwargs(self) -> dict:
        """What the checkpoint stores to rebuild this tower alone (no network, no files)."""
        return {"model_cfg": copy.deepcopy(self.model_cfg), "img_size": self.img_size}

    @property
    def trunk(self) -> nn.Module:
        return self.visual

    # --- where the model looked -----------------------------------------------------------------

    def _attention_modules(self) -> list[nn.MultiheadAttention]:
        """The ViT tower's attention modules in forward order (torch's MultiheadAttention, whose
        weights can be asked for), or [] (a CNN tower, or blocks of another kind)."""
        blocks = getattr(getattr(self.visual, "transformer", None), "resblocks", None)
        if blocks is None or getattr(self.visual, "class_embedding", None) is None:
            return []
        found = [getattr(b, "attn", None) for b in blocks]
        return found if found and all(isinstance(m, nn.MultiheadAttention) for m in found) else []

    @property
    def reads_attention(self) -> bool:
        """Whether attention maps (rollout...) can be read: a ViT tower yes, a CNN tower no (Grad-CAM)."""
        return bool(self._attention_modules())

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.visual.grid_size)

    #: the class token before the patch tokens
    num_prefix_tokens = 1

    @property
    def map_methods(self) -> tuple[str, ...] | None:
        """The maps of where it looked (melanoma.explain): None for a ViT tower (attention maps:
        the explain package's own list), Grad-CAM for a CNN tower, none for other towers."""
        if self.reads_attention:
            return None
        try:
            self.gradcam_layer()
        except ValueError:
            return ()
        from melanoma.conventions import CNN_MAP_METHODS

        return CNN_MAP_METHODS

    def gradcam_layer(self) -> nn.Module:
        """The last convolutional stage of a ResNet tower (open_clip's ModifiedResNet, or a timm CNN
        trunk); a ViT tower has attention maps instead."""
        layer4 = getattr(self.visual, "layer4", None)
        if layer4 is not None:
            return layer4
        trunk = getattr(self.visual, "trunk", None)
        info = getattr(trunk, "feature_info", None)
        if trunk is not None and info and not hasattr(trunk, "blocks"):
            return trunk.get_submodule(info[-1]["module"])
        raise ValueError(f"the open_clip image tower {self.name} ({type(self.visual).__name__}) has no convolutional "
                         f"stage for Grad-CAM" + ("; use an attention map (--attention-method rollout)"
                                                  if self.reads_attention else ""))

    def _with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The tower's features and each block's attention weights (B, heads, N, N), asked of
        torch's MultiheadAttention for this one call (open_clip asks for none)."""
        modules = self._attention_modules()
        if not modules:
            self.gradcam_layer()  # a CNN tower: says to use Grad-CAM
            raise ValueError(f"the open_clip tower {self.name} has no attention weights to read")
        attentions: list[torch.Tensor] = []

        def reading(forward):
            def call(*args, **kwargs):
                kwargs.update(need_weights=True, average_attn_weights=False)
                out, weights = forward(*args, **kwargs)
                attentions.append(weights)
                return out, weights
            return call

        for m in modules:
            m.forward = reading(m.forward)
        try:
            features = self.visual(x)
        finally:
            for m in modules:
                del m.forward  # the class's own forward again
        return features, attentions

    # --- forward ---------------------------------------------------------------------------------

    def forward_features(self, x: torch.Tensor, return_attention: bool = False, frozen_prefix: int = 0):
        if return_attention:
            return self._with_attention(x)
        if torch.onnx.is_in_onnx_export():
            # nn.MultiheadAttention's fused inference path is one op ONNX does not have: export the
            # same attention as its plain operations
            enabled = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
            try:
                return self.visual(x)
            finally:
                torch.backends.mha.set_fastpath_enabled(enabled)
        return self.visual(x)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    # --- weights from elsewhere ------------------------------------------------------------------

    def load_weights(self, source: str | Path) -> OpenClipSource:
        """Load the image tower's weights from ``source`` (a file, a published folder or an
        hf-hub name: ``resolve_open_clip``), strictly: every ``visual.*`` tensor must fit, and the
        text tower's tensors are set aside. Returns the resolved source (provenance)."""
        from melanoma.models.pretrained import PretrainedWeightsError, state_dict_mismatch

        path = Path(str(source)).expanduser()
        if path.is_file():  # the architecture is this tower's; the file brings only weights
            resolved = OpenClipSource(self.name, self.model_cfg, {}, path, None)
        else:
            resolved = resolve_open_clip(self.name, source)
        if resolved.weights is None:
            raise PretrainedWeightsError(f"model.pretrained={source}: no weights file found")
        if resolved.folder is not None and (resolved.model_cfg.get("vision_cfg") != self.model_cfg.get("vision_cfg")):
            raise PretrainedWeightsError(f"model.pretrained={source}: its {CONFIG_FILE} describes another image tower "
                                         f"({resolved.model_cfg.get('vision_cfg')}) than the one built "
                                         f"({self.model_cfg.get('vision_cfg')})")
        state = read_open_clip_state_dict(resolved.weights)
        visual = {k[len(VISUAL):]: v for k, v in state.items() if k.startswith(VISUAL)}
        if not visual:
            raise PretrainedWeightsError(
                f"{resolved.weights} holds no open_clip image tower (no 'visual.*' keys; found e.g. {list(state)[:4]}); "
                f"expected an open_clip model's full state dict (as open_clip saves it)")
        self._resample_position_embedding(visual)
        problems = state_dict_mismatch(self.visual.state_dict(), visual)
        if problems:
            raise PretrainedWeightsError(
                f"weights from {resolved.weights} do not fit the open_clip image tower {self.name} "
                f"({self.model_cfg.get('vision_cfg')}): {problems}. Use the architecture the weights were trained as "
                f"(model.backbone.name, or the folder they were published in as model.pretrained)")
        self.visual.load_state_dict(visual, strict=True)
        self.weights_file = None if resolved.hub else Path(resolved.weights)
        log.info("loaded all %d image-tower tensors of %s from %s (%d text-tower tensors set aside)", len(visual),
                 self.name, resolved.hub or resolved.weights, len(state) - len(visual))
        return resolved

    def _resample_position_embedding(self, visual: dict[str, torch.Tensor]) -> None:
        old = visual.get("positional_embedding")
        new = getattr(self.visual, "positional_embedding", None)
        if old is None or new is None or old.shape == new.shape:
            return
        from melanoma.models.pretrained import resample_pos_embed

        visual["positional_embedding"] = resample_pos_embed(old[None], tuple(self.visual.grid_size), 1)[0]


# --- layer groups of the image towers open_clip builds --------------------------------------------

_VIT_STEM = ("conv1.", "class_embedding", "positional_embedding", "ln_pre.", "patchnorm_pre_ln.")
_VIT_TOP = ("ln_post.", "proj", "attn_pool", "ln_post_contrastive.", "attn_pool_contrastive.")
_RESNET_STEM = re.compile(r"^(conv[123]|bn[123])\.")
_RESNET_LAYER = re.compile(r"^layer(\d+)\.")
_VIT_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.")


def _forward_order(layers: set[str]) -> list[str]:
    blocks = sorted((n for n in layers if n.startswith("block")), key=lambda n: int(n[5:]))
    return [*([STEM] if STEM in layers else []), *blocks, *([NORM] if NORM in layers else [])]


def _layer_map(visual: nn.Module, name: str) -> dict[str, str]:
    """Parameter name (with ``visual.``) -> layer group: ``stem``, ``block0`` ... ``block{n-1}``,
    ``norm`` (what follows the last block: final norm, projection, attention pooling)."""
    kind = type(visual).__name__
    names = [n for n, _ in visual.named_parameters()]
    out: dict[str, str] = {}
    if kind == "VisionTransformer":
        for n in names:
            block = _VIT_BLOCK.match(n)
            out[n] = (f"block{block.group(1)}" if block else STEM if n.startswith(_VIT_STEM)
                      else NORM if n.startswith(_VIT_TOP) else "")
    elif kind == "ModifiedResNet":
        for n in names:
            layer = _RESNET_LAYER.match(n)
            out[n] = (f"block{int(layer.group(1)) - 1}" if layer else STEM if _RESNET_STEM.match(n)
                      else NORM if n.startswith("attnpool.") else "")
    elif kind == "TimmModel":
        from melanoma.models.timm_backbone import TimmGroupingError
        from melanoma.models.timm_backbone import _layer_map as timm_layers

        try:
            trunk = timm_layers(visual.trunk, f"{name} (its timm trunk)")
        except TimmGroupingError as e:
            raise OpenClipGroupingError(str(e)) from e
        for n in names:
            out[n] = trunk.get(f"net.{n[len('trunk.'):]}", "") if n.startswith("trunk.") else NORM
    else:
        raise OpenClipGroupingError(
            f"the open_clip image tower of {name} is a {kind}, whose layers this package cannot group for gradual "
            f"unfreezing and layer-wise learning rates; supported towers: open_clip's VisionTransformer and "
            f"ModifiedResNet, and timm trunks with a group_matcher")
    unknown = [n for n, layer in out.items() if not layer]
    if unknown:
        raise OpenClipGroupingError(f"{name}: parameters {unknown[:6]} of its {kind} image tower fit no layer group "
                                    f"(stem, blocks, norm); this tower variant is not supported")
    return {f"{VISUAL}{n}": layer for n, layer in out.items()}
