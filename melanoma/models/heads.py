"""Classifier heads, one per dataset, each knowing its class names.

A head is rebuilt from its ``spec()`` alone (``build_head``), so a checkpoint that stores the
specs next to the weights can be loaded without the dataset or config that created it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

__all__ = ["DatasetHeads", "LinearHead", "MLPHead", "build_head"]



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


HEAD_TYPES = {"linear": LinearHead, "mlp": MLPHead}


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
