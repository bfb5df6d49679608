"""Zero-shot classification with a CLIP-style (open_clip) model, as an ordinary Classifier.

The classifier is the image tower as the backbone (``OpenClipBackbone``) and a ``ZeroShotHead``
whose rows are the class text embeddings, computed once here from the class prompts
(conf/prompts/: templates x descriptions per class name; each prompt's embedding normalised, the
class's mean normalised again, as in CLIP). Logits are ``logit_scale * cos(image, class)``, with
the model's own learned scale. The text tower is needed only to build the head, so the checkpoint
holds the image tower and the head alone: evaluate (calibration on val, test report), evaluate
--external, predict, export and serve work on it unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from melanoma.config import conf_dir
from melanoma.models.classifier import Classifier
from melanoma.models.heads import DatasetHeads, ZeroShotHead
from melanoma.models.open_clip_backbone import (HF_HUB_PREFIX, OpenClipBackbone, OpenClipError, OpenClipSource,
                                                build_clip_model, resolve_open_clip)

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_PROMPTS", "class_prompts", "encode_prompts", "load_prompts", "zero_shot_classifier"]

#: the prompt set used unless another is named (conf/prompts/<name>.yaml)
DEFAULT_PROMPTS = "dermatology"
#: open_clip caps the learned temperature at this scale (exp(logit_scale) <= 100)
MAX_LOGIT_SCALE = 100.0


def load_prompts(spec: str | Path | None = None) -> dict:
    """A prompt set: a name in conf/prompts/ (default ``dermatology``) or a YAML file, holding
    ``templates`` (strings with one ``{}``) and ``classes`` (class name -> descriptions)."""
    from omegaconf import OmegaConf

    spec = DEFAULT_PROMPTS if spec is None else str(spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        path = conf_dir() / "prompts" / f"{spec}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (conf_dir() / "prompts").glob("*.yaml"))
        raise FileNotFoundError(f"prompt set {spec!r}: no such file, and not one of conf/prompts/ {known}")
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    templates, classes = data.get("templates"), data.get("classes")
    if (not isinstance(templates, list) or not templates
            or not all(isinstance(t, str) and t.count("{}") == 1 for t in templates)):
        raise ValueError(f"{path}: 'templates' must be a list of strings each holding one '{{}}'; found {templates!r}")
    if not isinstance(classes, Mapping) or not all(isinstance(v, list) and v for v in classes.values()):
        raise ValueError(f"{path}: 'classes' must map each class name to a list of descriptions; found {classes!r}")
    return {"templates": list(templates), "classes": {str(k): [str(d) for d in v] for k, v in classes.items()},
            "source": str(path)}


def class_prompts(prompts: Mapping, class_names: Sequence[str]) -> dict[str, list[str]]:
    """Every prompt of every class: each template filled with each of the class's descriptions."""
    missing = [c for c in class_names if c not in prompts["classes"]]
    if missing:
        raise ValueError(f"the prompt set {prompts.get('source', '')} has no descriptions for classes {missing} (it has "
                         f"{sorted(prompts['classes'])}); add them under 'classes:' or pass another --prompts file")
    return {c: [t.format(d) for d in prompts["classes"][c] for t in prompts["templates"]] for c in class_names}


@torch.no_grad()
def encode_prompts(clip: nn.Module, tokenizer, texts_by_class: Mapping[str, Sequence[str]]) -> torch.Tensor:
    """(C, D) class embeddings: per class, the normalised mean of its prompts' normalised text
    embeddings, in class order."""
    clip.eval()
    rows = []
    for texts in texts_by_class.values():
        emb = nn.functional.normalize(clip.encode_text(tokenizer(list(texts))).float(), dim=-1)
        rows.append(nn.functional.normalize(emb.mean(0), dim=-1))
    return torch.stack(rows)


def _tokenizer(source: OpenClipSource):
    import open_clip
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    text_cfg = dict(source.model_cfg.get("text_cfg") or {})
    context = int(text_cfg.get("context_length", 77))
    try:
        if source.folder is not None:
            return open_clip.get_tokenizer(f"local-dir:{source.folder}")
        if source.hub is not None or source.name.startswith(HF_HUB_PREFIX):
            return open_clip.get_tokenizer(source.hub or source.name)
        if source.name in open_clip.list_models():
            return open_clip.get_tokenizer(source.name)
        if text_cfg.get("hf_tokenizer_name"):
            return HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=context,
                               **dict(text_cfg.get("tokenizer_kwargs") or {}))
    except OSError as e:  # a Hugging Face tokenizer that is neither cached nor reachable
        raise OpenClipError(f"the text tokenizer of {source.name} could not be loaded ({e}); with no network, use the "
                            f"downloaded folder (model.pretrained=DIR holds the tokenizer files) or copy a Hugging "
                            f"Face cache (HF_HOME) that holds it") from e
    return SimpleTokenizer(context_length=context)


def zero_shot_classifier(name: str, pretrained: str | Path, head: str, class_names: Sequence[str],
                         img_size: int | None, prompts: Mapping) -> tuple[Classifier, OpenClipSource]:
    """The image tower of open_clip weights ``pretrained`` and a zero-shot head named ``head``
    over ``class_names``, its rows the text tower's embeddings of the class prompts."""
    import open_clip

    source = resolve_open_clip(name, pretrained)
    if source.weights is None:
        raise OpenClipError("zero-shot classification needs trained image and text towers: pass their weights as "
                            "model.pretrained=FILE|DIR|hf-hub:ORG/REPO")
    clip = build_clip_model(source.model_cfg, img_size)
    # open_clip's own loader: its state-dict conversions, position-embedding resizing, strict load
    open_clip.load_checkpoint(clip, str(source.weights), strict=True, weights_only=True)
    texts = class_prompts(prompts, class_names)
    weight = encode_prompts(clip, _tokenizer(source), texts)
    scale = min(float(clip.logit_scale.detach().exp()), MAX_LOGIT_SCALE)
    backbone = OpenClipBackbone(name, source.model_cfg, img_size)
    backbone.visual.load_state_dict(clip.visual.state_dict(), strict=True)
    zero_shot = ZeroShotHead(backbone.embed_dim, class_names, logit_scale=scale, prompts=texts)
    zero_shot.weight.data.copy_(weight)
    heads = DatasetHeads()
    heads.add(head, zero_shot)
    log.info("zero-shot head %r: %d classes, %d prompts each on average, logit scale %.1f", head, len(class_names),
             sum(map(len, texts.values())) // len(texts), scale)
    return Classifier(backbone, heads).eval(), source
