"""Classifier heads, one per dataset, each knowing its class names.

A head is rebuilt from its ``spec()`` alone (``build_head``), so a checkpoint that stores the
specs next to the weights can be loaded without the dataset or config that created it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

__all__ = ["DatasetHeads", "FusionHead", "LinearHead", "MLPHead", "ZeroShotHead", "build_head"]



def _check_class_names(class_names: Sequence[str]) -> list[str]:
    if isinstance(class_names, str):
        raise TypeError(f"class_names must be a list of names, got the string {class_names!r}")
    names = [str(c) for c in class_names]
    if len(names) < 2:
        raise ValueError(f"a classifier head needs at least 2 classes, got {names}")
    if len(set(names)) != len(names):
        raise ValueError(f"class names must be unique, got {names}")
    return names


class LinearHead(nn.Module):
    def __init__(self, in_features: int, class_names: Sequence[str], dropout: float = 0.0):
        super().__init__()
        self.class_names = _check_class_names(class_names)
        self.in_features = in_features
        self.dropout = float(dropout)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, len(self.class_names))
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(features))

    def spec(self) -> dict:
        return {"type": "linear", "in_features": self.in_features,
                "class_names": list(self.class_names), "dropout": self.dropout}


class MLPHead(nn.Module):
    """Linear-ReLU-Dropout-Linear (the reference project's head had 64 hidden units)."""

    def __init__(self, in_features: int, class_names: Sequence[str], hidden_features: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        self.class_names = _check_class_names(class_names)
        self.in_features = in_features
        self.hidden_features = int(hidden_features)
        self.dropout = float(dropout)
        self.fc1 = nn.Linear(in_features, self.hidden_features)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(self.hidden_features, len(self.class_names))
        for fc in (self.fc1, self.fc2):
            nn.init.trunc_normal_(fc.weight, std=0.02)
            nn.init.zeros_(fc.bias)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(features))))

    def spec(self) -> dict:
        return {"type": "mlp", "in_features": self.in_features, "class_names": list(self.class_names),
                "hidden_features": self.hidden_features, "dropout": self.dropout}


class MetadataBranch(nn.Module):
    """The metadata MLP of ISIC 2020's winners: Linear-BatchNorm-SiLU-Dropout per layer."""

    def __init__(self, in_features: int, hidden: Sequence[int], dropout: float):
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_features, int(width)), nn.BatchNorm1d(int(width)), nn.SiLU(), nn.Dropout(dropout)]
            in_features = int(width)
        self.layers = nn.Sequential(*layers)
        self.out_features = in_features

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        return self.layers(m)


class MetaBlock(nn.Module):
    """MetaBlock (Pacheco & Krohling 2021): the metadata scale and shift the image features,
    ``sigmoid(tanh(features * f(m)) + g(m))``, f and g each Linear + BatchNorm."""

    def __init__(self, in_features: int, metadata_features: int):
        super().__init__()
        self.scale = nn.Sequential(nn.Linear(metadata_features, in_features), nn.BatchNorm1d(in_features))
        self.shift = nn.Sequential(nn.Linear(metadata_features, in_features), nn.BatchNorm1d(in_features))
        self.out_features = in_features

    def forward(self, features: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(torch.tanh(features * self.scale(m)) + self.shift(m))


#: ``model.fusion`` kinds a FusionHead builds (``none`` is a plain head)
FUSION_KINDS = ("concat", "metablock")


class FusionHead(nn.Module):
    """Image features fused with patient metadata, then a plain head (``head``: a linear or mlp
    spec, built with the fused width). ``metadata`` is the schema record
    (``melanoma.metadata.MetadataSchema.to_dict``): the checkpoint alone says how to encode inputs.
    ``concat``: a metadata branch (``metadata_hidden`` widths) concatenated with the features;
    ``metablock``: MetaBlock gating of the features. Called without metadata, every field is
    missing (the schema's missing vector): a joint-training member or an image scored alone."""

    takes_metadata = True

    def __init__(self, in_features: int, class_names: Sequence[str], fusion: str, metadata: Mapping,
                 head: Mapping | None = None, metadata_hidden: Sequence[int] = (512, 128),
                 metadata_dropout: float = 0.3):
        super().__init__()
        if fusion not in FUSION_KINDS:
            raise ValueError(f"model.fusion must be one of none, {', '.join(FUSION_KINDS)}; got {fusion!r}")
        self.class_names = _check_class_names(class_names)
        self.in_features = int(in_features)
        self.fusion = fusion
        self.metadata = dict(metadata)
        columns = list(self.metadata["columns"])
        self.metadata_features = len(columns)
        missing = [1.0 if c.endswith("_missing") else 0.0 for c in columns]
        self.register_buffer("missing_vector", torch.tensor(missing), persistent=False)
        self.metadata_hidden = [int(w) for w in metadata_hidden]
        self.metadata_dropout = float(metadata_dropout)
        if fusion == "concat":
            self.branch = MetadataBranch(self.metadata_features, self.metadata_hidden, self.metadata_dropout)
            fused = self.in_features + self.branch.out_features
        else:
            self.branch = MetaBlock(self.in_features, self.metadata_features)
            fused = self.in_features
        inner = dict(head or {"type": "linear"})
        inner.update(in_features=fused, class_names=list(self.class_names))
        self.head = build_head(inner)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def forward(self, features: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:
        if metadata is None:
            metadata = self.missing_vector.expand(features.shape[0], -1)
        if metadata.shape[-1] != self.metadata_features:
            raise ValueError(f"metadata has {metadata.shape[-1]} entries per image; this head was trained with "
                             f"{self.metadata_features} ({self.metadata['columns']})")
        metadata = metadata.to(features.dtype)
        if self.fusion == "concat":
            return self.head(torch.cat([features, self.branch(metadata)], dim=-1))
        return self.head(self.branch(features, metadata))

    def spec(self) -> dict:
        inner = self.head.spec()
        inner.pop("in_features"), inner.pop("class_names")
        return {"type": "fusion", "in_features": self.in_features, "class_names": list(self.class_names),
                "fusion": self.fusion, "metadata": dict(self.metadata), "head": inner,
                "metadata_hidden": list(self.metadata_hidden), "metadata_dropout": self.metadata_dropout}


class ZeroShotHead(nn.Module):
    """Zero-shot classification by a CLIP-style model: ``logit_scale * cos(features, weight_c)``,
    one row of ``weight`` per class, the class's text embedding (melanoma.models.zero_shot builds
    it from the class prompts, which the spec keeps for the record). The features are the image
    tower's embedding; both sides are normalised in the forward pass, so the head stays a cosine
    classifier if its rows are trained further."""

    def __init__(self, in_features: int, class_names: Sequence[str], logit_scale: float = 100.0,
                 prompts: Mapping[str, Sequence[str]] | None = None):
        super().__init__()
        self.class_names = _check_class_names(class_names)
        self.in_features = int(in_features)
        self.logit_scale = float(logit_scale)
        self.prompts = {str(k): [str(t) for t in v] for k, v in dict(prompts or {}).items()}
        self.weight = nn.Parameter(torch.zeros(len(self.class_names), self.in_features))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = nn.functional.normalize(features, dim=-1)
        return self.logit_scale * features @ nn.functional.normalize(self.weight, dim=-1).t()

    def spec(self) -> dict:
        return {"type": "zero_shot", "in_features": self.in_features, "class_names": list(self.class_names),
                "logit_scale": self.logit_scale, "prompts": {k: list(v) for k, v in self.prompts.items()}}


HEAD_TYPES = {"linear": LinearHead, "mlp": MLPHead, "fusion": FusionHead, "zero_shot": ZeroShotHead}


def build_head(spec: Mapping) -> nn.Module:
    """Rebuild a head from ``spec()`` output (weights are loaded separately)."""
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in HEAD_TYPES:
        raise ValueError(f"head spec needs 'type' in {sorted(HEAD_TYPES)}, got {kind!r} in {spec}")
    try:
        return HEAD_TYPES[kind](**spec)
    except TypeError as e:
        raise ValueError(f"invalid {kind} head spec {spec}: {e}") from e


class DatasetHeads(nn.ModuleDict):
    """Heads keyed by dataset name. Training on a new dataset adds a head and keeps the others."""

    def add(self, name: str, head: nn.Module, replace: bool = False) -> nn.Module:
        if name in self and not replace:
            raise ValueError(
                f"a head named {name!r} already exists (classes {self[name].class_names}); "
                f"pass replace=True to overwrite it, or use another name"
            )
        self[name] = head
        return head

    def specs(self) -> dict[str, dict]:
        return {name: head.spec() for name, head in self.items()}

    @classmethod
    def from_specs(cls, specs: Mapping[str, Mapping]) -> DatasetHeads:
        heads = cls()
        for name, spec in specs.items():
            heads.add(name, build_head(spec))
        return heads
