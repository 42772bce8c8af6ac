"""ZooModel: the frozen-backbone-plus-head model, carrying everything needed to deploy it.

This is the single object training produces and exporters consume. It is saved as a directory:
  model.json           metadata (backbone name and weights, normalization, labels, head config)
  head.safetensors     head weights
  backbone.safetensors only when the backbone's weights cannot be rebuilt from its plugin
                       (random init, a local file, or layers that were trained)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from . import __version__
from .backbones import BackboneInfo, create_backbone
from .errors import ZooError
from .heads import HeadConfig, build_head
from .io import save_safetensors, write_json
from .records import Normalization

FORMAT_VERSION = 1


@dataclass(frozen=True)
class ModelMeta:
    backbone: str  # qualified name
    weights: str | None  # tag, file id, or None (random init)
    normalization: Normalization
    labels: tuple[str, ...]
    feature_dim: int
    head: HeadConfig = field(default_factory=HeadConfig)
    frozen_groups: int | None = None  # None: whole backbone frozen; K: first K groups frozen
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "zoo_version": __version__,
            "backbone": self.backbone,
            "weights": self.weights,
            "normalization": self.normalization.to_dict(),
            "labels": list(self.labels),
            "feature_dim": self.feature_dim,
            "head": self.head.to_dict(),
            "frozen_groups": self.frozen_groups,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelMeta":
        return cls(
            backbone=d["backbone"],
            weights=d.get("weights"),
            normalization=Normalization.from_dict(d["normalization"]),
            labels=tuple(d["labels"]),
            feature_dim=int(d["feature_dim"]),
            head=HeadConfig.from_dict(d.get("head", {})),
            frozen_groups=d.get("frozen_groups"),
            extra=dict(d.get("extra", {})),
        )


class ZooModel(nn.Module):
    """backbone (normalized NCHW float -> pooled features) followed by head (features -> logits)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, meta: ModelMeta, info: BackboneInfo | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.meta = meta
        self.info = info  # layer groups etc.; None when unknown

    @property
    def labels(self) -> tuple[str, ...]:
        return self.meta.labels

    @property
    def normalization(self) -> Normalization:
        return self.meta.normalization

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_model(
    backbone: str,
    labels: Sequence[str] | int,
    weights: Any = "default",
    head: HeadConfig | None = None,
) -> ZooModel:
    """A fresh ZooModel: the plugin's backbone with a new, untrained head."""
    module, info = create_backbone(backbone, weights=weights)
    if isinstance(labels, int):
        labels = [str(i) for i in range(labels)]
    if info.feature_dim is None:
        raise ZooError(f"plugin {info.plugin!r} could not tell the feature dimension of {info.name}")
    cfg = head or HeadConfig()
    meta = ModelMeta(
        backbone=info.name, weights=info.weights, normalization=info.normalization,
        labels=tuple(labels), feature_dim=info.feature_dim, head=cfg,
    )
    return ZooModel(module, build_head(info.feature_dim, len(labels), cfg), meta, info)


def _backbone_rebuildable(model: ZooModel) -> bool:
    w = model.meta.weights
    trained = model.meta.frozen_groups is not None
    return w is not None and not str(w).startswith("file:") and not trained


def save_model(model: ZooModel, directory: str | Path, include_backbone: bool | None = None) -> Path:
    """Write model.json, head.safetensors and (when needed) backbone.safetensors atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if include_backbone is None:
        include_backbone = not _backbone_rebuildable(model)
    save_safetensors(model.head.state_dict(), directory / "head.safetensors")
    if include_backbone:
        save_safetensors(model.backbone.state_dict(), directory / "backbone.safetensors")
    elif (directory / "backbone.safetensors").exists():
        (directory / "backbone.safetensors").unlink()
    write_json(directory / "model.json", model.meta.to_dict())  # last: its presence means complete
    return directory


def load_model(directory: str | Path) -> ZooModel:
    """Rebuild a saved ZooModel (backbone from its plugin, or from backbone.safetensors)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta_path = directory / "model.json"
    if not meta_path.is_file():
        raise ZooError(f"{str(directory)!r} is not a saved zoo model: no model.json (expected a run directory "
                       "written by `zoo train` or zoo.model.save_model)")
    meta = ModelMeta.from_dict(json.loads(meta_path.read_text()))
    backbone_file = directory / "backbone.safetensors"
    if backbone_file.exists():
        module, info = create_backbone(meta.backbone, weights=None)
        module.load_state_dict(load_file(str(backbone_file)), strict=True)
    else:
        module, info = create_backbone(meta.backbone, weights=meta.weights)
    head = build_head(meta.feature_dim, len(meta.labels), meta.head)
    head.load_state_dict(load_file(str(directory / "head.safetensors")), strict=True)
    model = ZooModel(module, head, meta, info)
    return model.eval()
