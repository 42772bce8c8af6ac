"""ZooModel: the frozen-backbone-plus-head model, carrying everything needed to deploy it.

This is the single object training produces and exporters consume. It is saved as a directory:
  model.json           metadata (backbone name and weights, normalization, labels, head config)
  head.safetensors     head weights
  backbone.safetensors only when the backbone's weights cannot be rebuilt from its plugin
                       (random init, a local file, or layers that were trained)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, cast

import torch
import torch.nn as nn

from . import __version__
from .backbones import BackboneInfo, create_backbone, create_loaded_backbone
from .errors import ZooError
from .heads import HeadConfig, build_head
from .io import save_safetensors, write_json
from .records import Normalization

FORMAT_VERSION = 2  # 2: model.json lists its weights files with shapes and sha256 ("files")
HEAD_FILE = "head.safetensors"
BACKBONE_FILE = "backbone.safetensors"
# model.json's required keys and their JSON types (format 1 and 2)
SCHEMA = {"format_version": int, "backbone": str, "normalization": dict, "labels": list, "feature_dim": int,
          "head": dict, "extra": dict}


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
        features: torch.Tensor = self.backbone(x)
        return features

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(features)
        return logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


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


def pretrained_classifier(backbone: str, weights: Any = "default") -> ZooModel:
    """The backbone with the classifier its pretrained weights came with, and its class names,
    as a ZooModel, untrained by us: `zoo.export(pretrained_classifier("torchvision/mobilenet_v2"),
    out=...)` ships it through the same validated path as a trained run.

    The classifier comes from the backbone's provider (`BackboneProvider.pretrained_head`); a
    provider without one, or random-init weights, is a ZooError naming the backbone."""
    from .plugin import registry
    from .plugin.api import PretrainedHead

    # -- the backbone, as for training -------------------------------------------------------------------
    module, info = create_backbone(backbone, weights=weights)
    if info.weights is None or str(info.weights).startswith("file:"):
        raise ZooError(f"{info.name} has no pretrained classifier with weights={info.weights or 'none'}: "
                       "a pretrained head comes with the provider's own weights; pass a weights tag "
                       f"({', '.join(w.tag for w in info.available_weights[:4]) or 'none available'}) or train a head with `zoo train`")

    # -- its own classifier, from the provider that owns it -------------------------------------------------
    reg = registry.backbones()
    rec, _ = reg.resolve(info.name)
    head = reg.ask(rec, "pretrained_head", lambda p: p.pretrained_head(rec.spec, info.weights))
    if head is None:
        raise ZooError(f"plugin {info.plugin!r} offers no pretrained classifier for {info.name} "
                       f"(weights {info.weights}); train a head on your data with `zoo train --backbone {info.name}`")
    if not isinstance(head, PretrainedHead) or not isinstance(head.module, nn.Module):
        raise ZooError(f"plugin {info.plugin!r}: pretrained_head() for {info.name} must return "
                       f"zoo.PretrainedHead(labels, module), got {type(head).__name__}")

    # -- checked: the classifier takes the backbone's features and gives one logit per label -------------
    labels = tuple(str(x) for x in head.labels)
    classifier = head.module.eval()
    if info.feature_dim is None:  # create_backbone measures it; never None after a build
        raise ZooError(f"plugin {info.plugin!r}: {info.name} was built without a feature dimension")
    with torch.no_grad():
        width = classifier(torch.zeros(2, info.feature_dim)).shape
    if tuple(width) != (2, len(labels)):
        raise ZooError(f"plugin {info.plugin!r}: the pretrained classifier of {info.name} maps "
                       f"{info.feature_dim} features to {tuple(width)[1:]} outputs, but names {len(labels)} labels")
    source = f"{info.plugin} pretrained classifier ({info.weights})"
    if isinstance(classifier, nn.Linear):  # a plain Linear is the zoo's linear head: saved, loaded, exported alike
        cfg = HeadConfig(kind="linear")
        zoo_head = build_head(info.feature_dim, len(labels), cfg)
        cast(nn.Sequential, zoo_head)[-1].load_state_dict(classifier.state_dict())
        zoo_head.eval()
    else:
        cfg, zoo_head = HeadConfig(kind="pretrained"), classifier
    meta = ModelMeta(backbone=info.name, weights=info.weights, normalization=info.normalization, labels=labels,
                     feature_dim=info.feature_dim, head=cfg, extra={"head_source": source})
    return ZooModel(module, zoo_head, meta, info)


def _backbone_rebuildable(meta: ModelMeta) -> bool:
    w = meta.weights
    trained = meta.frozen_groups is not None
    return w is not None and not str(w).startswith("file:") and not trained


def _file_record(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What model.json records of a weights file, checked when the model is loaded."""
    from .io import file_sha256

    return {"sha256": file_sha256(path), "tensors": {k: list(v.shape) for k, v in tensors.items()}}


def _check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ZooError(f"refusing to save a model whose {what} holds NaN/inf values ({', '.join(bad[:5])}); "
                       "training diverged: lower the learning rate and train again")


def save_model(model: ZooModel, directory: str | Path, include_backbone: bool | None = None) -> Path:
    """Write head.safetensors, backbone.safetensors (when needed) and model.json atomically;
    model.json lists each weights file with its tensor shapes and sha256, so a missing or altered
    file is found when the model is loaded, never replaced by something else."""
    if model.meta.head.kind == "pretrained":
        build_head(model.meta.feature_dim, len(model.meta.labels), model.meta.head)  # raises: not rebuildable
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if include_backbone is None:
        include_backbone = not _backbone_rebuildable(model.meta)
    parts = {HEAD_FILE: model.head.state_dict()}
    if include_backbone:
        parts[BACKBONE_FILE] = model.backbone.state_dict()
    files = {}
    for name, tensors in parts.items():
        _check_finite(tensors, name)
        save_safetensors(tensors, directory / name)
        files[name] = _file_record(directory / name, tensors)
    if not include_backbone and (directory / BACKBONE_FILE).exists():
        (directory / BACKBONE_FILE).unlink()
    write_json(directory / "model.json", model.meta.to_dict() | {"files": files})  # last: its presence means complete
    return directory


def read_meta(directory: str | Path) -> tuple[ModelMeta, dict[str, Any]]:
    """model.json checked against its schema -> (meta, {weights file: record})."""
    directory = Path(directory)
    meta_path = directory / "model.json"
    if not meta_path.is_file():
        raise ZooError(f"{str(directory)!r} is not a saved zoo model: no model.json (expected a run directory "
                       "written by `zoo train` or zoo.model.save_model)")
    damaged = f"{str(meta_path)!r} is damaged"
    fix = "restore the run directory from a backup or train again"
    try:
        d = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ZooError(f"{damaged}: not valid JSON ({exc}); {fix}") from None
    if not isinstance(d, dict):
        raise ZooError(f"{damaged}: expected a JSON object; {fix}")
    version = d.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ZooError(f"{damaged}: no valid format_version; {fix}")
    if version > FORMAT_VERSION:
        raise ZooError(f"{str(meta_path)!r} has format version {version}, newer than this zoo reads "
                       f"({FORMAT_VERSION}); upgrade backbone-zoo")
    for key, kind in SCHEMA.items():
        if key not in d or not isinstance(d[key], kind):
            raise ZooError(f"{damaged}: {key!r} is missing or not a {_kind_name(kind)}; {fix}")
    if len(d["labels"]) < 1 or not all(isinstance(x, str) for x in d["labels"]):
        raise ZooError(f"{damaged}: 'labels' must be a list of class names; {fix}")
    files = d.get("files")
    if version >= 2 and (not isinstance(files, dict) or HEAD_FILE not in files):
        raise ZooError(f"{damaged}: it lists no weights files ('files'); {fix}")
    try:
        meta = ModelMeta.from_dict(d)
        meta.normalization.validate(str(meta_path))
    except ZooError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise ZooError(f"{damaged}: {type(exc).__name__}: {exc}; {fix}") from None
    if files is None:  # format 1 recorded no files: what the model needs follows from how it was trained
        files = {HEAD_FILE: {}} | ({} if _backbone_rebuildable(meta) else {BACKBONE_FILE: {}})
    return meta, files


def _kind_name(kind: Any) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({dict: "JSON object", list: "list", str: "string", int: "integer"}.get(k, k.__name__)
                       for k in kinds)


def _read_weights(directory: Path, name: str, record: dict[str, Any], why: str) -> dict[str, torch.Tensor]:
    """A weights file listed in model.json: present, unchanged (sha256, shapes), readable."""
    from safetensors.torch import load_file

    from .io import file_sha256

    path = directory / name
    fix = "restore it from a backup or train again; the zoo never substitutes other weights"
    if not path.is_file():
        raise ZooError(f"{str(path)!r} is missing ({why}); {fix}")
    if record.get("sha256") and file_sha256(path) != record["sha256"]:
        raise ZooError(f"{str(path)!r} was altered since it was saved (its sha256 differs from model.json's); {fix}")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for garbage
        raise ZooError(f"{str(path)!r} is not a readable safetensors file ({type(exc).__name__}: {exc}); {fix}") from None
    shapes = record.get("tensors")
    if shapes is not None and {k: list(v.shape) for k, v in tensors.items()} != shapes:
        raise ZooError(f"{str(path)!r} does not hold the tensors model.json lists for it; {fix}")
    return tensors


def _load_state(module: nn.Module, tensors: dict[str, torch.Tensor], path: Path, what: str) -> None:
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) or first[0]
        raise ZooError(f"{str(path)!r} does not fit {what} that model.json describes ({detail}); the run "
                       "directory is inconsistent: restore it from a backup or train again") from None


def load_model(directory: str | Path) -> ZooModel:
    """Rebuild a saved ZooModel, verified: model.json against its schema, and every weights file
    it lists present and unchanged. The backbone comes from backbone.safetensors when the run
    saved one, else from its plugin (pretrained weights the plugin can rebuild exactly)."""
    directory = Path(directory)
    meta, files = read_meta(directory)
    if BACKBONE_FILE in files:
        tensors = _read_weights(directory, BACKBONE_FILE, files[BACKBONE_FILE],
                                "the backbone's weights: random init, a local file, or trained layers")
        module, info = create_loaded_backbone(
            meta.backbone, lambda m: _load_state(m, tensors, directory / BACKBONE_FILE, f"the {meta.backbone} backbone"))
    else:
        module, info = create_backbone(meta.backbone, weights=meta.weights)
    head_tensors = _read_weights(directory, HEAD_FILE, files[HEAD_FILE], "the trained head")
    head = build_head(meta.feature_dim, len(meta.labels), meta.head)
    _load_state(head, head_tensors, directory / HEAD_FILE,
                f"the {meta.head.kind} head for {len(meta.labels)} labels and feature dim {meta.feature_dim}")
    model = ZooModel(module, head, meta, info)
    return model.eval()
