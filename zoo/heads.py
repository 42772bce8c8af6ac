"""Classifier heads put on top of a backbone's pooled features."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch.nn as nn

from .errors import ZooError


@dataclass(frozen=True)
class HeadConfig:
    """Linear by default; "mlp" stacks hidden layers (Linear, norm, activation, dropout)."""

    kind: str = "linear"  # linear | mlp
    hidden: tuple[int, ...] = (512,)
    dropout: float = 0.0
    norm: str | None = None  # None | batchnorm | layernorm
    activation: str = "gelu"  # gelu | relu | silu

    def to_dict(self) -> dict[str, Any]:
        """The head that exists, and only it: a linear head has no hidden layers, activation or
        norm, so it is not described with the MLP defaults (`hidden: [512], activation: gelu`)
        that this dataclass carries for when kind becomes "mlp"."""
        if self.kind == "linear":
            return {"kind": "linear", "hidden": [], "dropout": self.dropout}
        if self.kind == "pretrained":  # a provider's own classifier module, described by its source
            return {"kind": "pretrained"}
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "HeadConfig":
        kind = d.get("kind", "linear")
        hidden = tuple(d.get("hidden") or (512,)) if kind == "mlp" else (512,)
        return cls(kind=kind, hidden=hidden, dropout=float(d.get("dropout", 0.0)),
                   norm=d.get("norm") if kind == "mlp" else None, activation=d.get("activation") or "gelu")


_ACT = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}
_NORM = {"batchnorm": nn.BatchNorm1d, "layernorm": nn.LayerNorm}


def build_head(in_features: int, num_classes: int, config: HeadConfig | None = None) -> nn.Module:
    cfg = config or HeadConfig()
    if in_features <= 0 or num_classes < 2:
        raise ZooError(f"a head needs in_features > 0 and at least 2 classes, got {in_features} and {num_classes}")
    if cfg.kind == "linear":
        layers: list[nn.Module] = [nn.Dropout(cfg.dropout)] if cfg.dropout > 0 else []
        return nn.Sequential(*layers, nn.Linear(in_features, num_classes))
    if cfg.kind == "pretrained":
        raise ZooError("a pretrained classifier that is not a plain Linear layer cannot be rebuilt from model.json; "
                       "export it directly (zoo export BACKBONE --head pretrained) instead of saving it as a run")
    if cfg.kind != "mlp":
        raise ZooError(f"unknown head kind {cfg.kind!r}: expected 'linear' or 'mlp'")
    if cfg.activation not in _ACT or (cfg.norm is not None and cfg.norm not in _NORM):
        raise ZooError(f"head activation must be one of {sorted(_ACT)} and norm one of {sorted(_NORM)} or None")
    layers = []
    width = in_features
    for hidden in cfg.hidden:
        layers.append(nn.Linear(width, hidden))
        if cfg.norm:
            layers.append(_NORM[cfg.norm](hidden))
        layers.append(_ACT[cfg.activation]())
        if cfg.dropout > 0:
            layers.append(nn.Dropout(cfg.dropout))
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


# -- feature standardization -----------------------------------------------------------------------
class Standardize(nn.Module):
    """(x - mean) / std per feature, with the training features' statistics. Trained through,
    then folded into the head's first Linear (`fold_standardization`), so a saved or exported
    head is the plain head of its HeadConfig and every consumer computes the same thing."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", mean.detach().clone().float())
        self.register_buffer("std", std.detach().clone().float())

    def forward(self, x):
        return (x - self.mean) / self.std


def feature_statistics(features) -> tuple:
    """(mean, std) over every leading axis of (..., D) features; a constant feature gets std 1
    (as scikit-learn's StandardScaler does), so it is centred but never divided by ~0."""
    import torch

    flat = features.reshape(-1, features.shape[-1]).double()
    mean, std = flat.mean(0), flat.std(0, unbiased=False)
    std = torch.where(std < 1e-6 * max(1.0, float(std.max())), torch.ones_like(std), std)
    return mean.float(), std.float()


def standardized(head: nn.Module, mean, std) -> nn.Sequential:
    return nn.Sequential(Standardize(mean, std), *head)


def fold_standardization(head: nn.Module) -> nn.Module:
    """The same function without the Standardize layer: W' = W / std, b' = b - W' @ mean in the
    first Linear (dropout before it is the identity at inference). A head without one is returned
    as is."""
    import torch

    layers = list(head)
    if not layers or not isinstance(layers[0], Standardize):
        return head
    norm, rest = layers[0], layers[1:]
    first = next(m for m in rest if isinstance(m, nn.Linear))
    with torch.no_grad():
        w = first.weight.double() / norm.std.double()
        b = first.bias.double() - w @ norm.mean.double()
        first.weight.copy_(w.to(first.weight.dtype))
        first.bias.copy_(b.to(first.bias.dtype))
    return nn.Sequential(*rest)
