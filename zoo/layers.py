"""Helpers for plugins: split a model's parameters into ordered layer groups.

`auto_layer_groups` works on most torchvision-style models: top-level children in registration
order (which is forward order there), with the big `features` Sequential expanded; runs of small
layers (conv, norm, activation) are gathered into one group that a pooling layer closes, so VGG
gives its five conv blocks and ResNet its stem.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from .records import LayerGroup

_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_LEAVES = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Dropout, nn.Identity, nn.Flatten,
           nn.LayerNorm, nn.GroupNorm, nn.Hardswish, nn.SiLU, nn.GELU, nn.Tanh)
# Containers whose children are the real stages (VGG/MobileNet `features`, ViT `encoder.layers`,
# MaxViT `blocks`, VGG `classifier` holding fc6/fc7).
EXPAND = ("features", "trunk", "trunk_output", "classifier", "encoder", "layers", "blocks")


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def auto_layer_groups(model: nn.Module, expand: Sequence[str] = EXPAND) -> list[LayerGroup]:
    """Layer groups from the module tree, input to output (what the zoo uses when a provider's
    `BuiltBackbone.layer_groups` is None): each child block with parameters is a group; a run of
    single layers between blocks (a stem's conv + norm; the first run is named "stem") is one
    group; the children of containers named in `expand` (VGG `features`, ViT `encoder.layers`)
    are grouped one level down. Every parameter lands in exactly one group."""
    groups: list[tuple[str, list[str]]] = []
    pending: list[str] = []  # module paths of small layers waiting to be closed into a group

    def close(label: str | None = None) -> None:
        nonlocal pending
        with_params = [p for p in pending if _has_params(model.get_submodule(p))]
        if with_params:
            name = label or ("stem" if not groups else f"{with_params[0]}-{with_params[-1].rpartition('.')[2]}"
                             if len(with_params) > 1 else with_params[0])
            groups.append((name, with_params))
        pending = []

    def walk(prefix: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            path = f"{prefix}{child_name}"
            if child_name in expand and len(child._modules) > 0 and not isinstance(child, _LEAVES):
                close()
                walk(path + ".", child)
                close()
            elif isinstance(child, _POOLS):
                close()
            elif isinstance(child, nn.Linear):
                close()
                pending.append(path)
            elif isinstance(child, _LEAVES) or not _has_params(child):
                pending.append(path)
            else:
                close()
                groups.append((path, [path]))
        close()

    walk("", model)
    return groups_from_modules(model, groups)


def groups_from_modules(model: nn.Module, groups: Sequence[tuple[str, Sequence[str]]]) -> list[LayerGroup]:
    """Turn (name, [module paths]) into LayerGroups of parameter names; parameters of modules
    not named anywhere (e.g. a lone cls token) join the nearest preceding group."""
    owner: dict[str, int] = {}
    for i, (_, paths) in enumerate(groups):
        for path in paths:
            for pname, _ in model.get_submodule(path).named_parameters(prefix=path):
                owner.setdefault(pname, i)
    params: list[list[str]] = [[] for _ in groups]
    last = 0
    for pname, _ in model.named_parameters():
        last = owner.get(pname, last)
        params[last].append(pname)
    return [LayerGroup(name, tuple(p)) for (name, _), p in zip(groups, params) if p]


def check_layer_groups(model: nn.Module, groups: Sequence[LayerGroup]) -> None:
    """Raise ValueError unless every parameter is in exactly one group."""
    names = [n for n, _ in model.named_parameters()]
    seen: dict[str, str] = {}
    for g in groups:
        for p in g.parameters:
            if p in seen:
                raise ValueError(f"parameter {p!r} is in groups {seen[p]!r} and {g.name!r}")
            seen[p] = g.name
    missing = [n for n in names if n not in seen]
    extra = [p for p in seen if p not in set(names)]
    if missing or extra:
        raise ValueError(f"layer groups miss {missing[:5]} and name unknown {extra[:5]}")
