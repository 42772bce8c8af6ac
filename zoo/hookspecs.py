"""Every hook a zoo plugin can implement, in one place (pluggy project name: "zoo").

A plugin is a module (or object) with functions decorated by `zoo.hookimpl` and named as below.
It is found through the `zoo` entry-point group, exactly like the built-ins in `plugins/`.

Hooks about one backbone (`backbone_*`, `create_backbone`) are called only on the plugin that
registered that backbone, so a plugin never sees, or breaks, another plugin's backbones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import pluggy

if TYPE_CHECKING:  # torch stays out of the import path of `zoo --help`
    import torch.nn as nn

    from .records import BackboneSpec, ExporterSpec, LayerGroup, Normalization

hookspec = pluggy.HookspecMarker("zoo")
hookimpl = pluggy.HookimplMarker("zoo")


@hookspec
def register_backbones(register: Callable[["BackboneSpec"], None]) -> None:
    """Register every backbone this plugin provides by calling `register(spec)` once for each.

    Called once per process, when the registry is first needed. Must be cheap: build no models,
    download nothing. Raising, or registering an invalid or duplicate spec, marks the plugin
    broken (none of its backbones are kept) unless ZOO_STRICT_PLUGINS=1, which re-raises.
    Returns nothing.
    """


@hookspec(firstresult=True)
def backbone_normalization(spec: "BackboneSpec", weights: str | None) -> "Normalization | None":
    """Return the preprocessing the backbone expects with weights tag `weights`.

    `weights` is one of `spec.weight_tags`, or None for random init (return what the model was
    designed for, normally the default weights' stats). Called when a record is described,
    at registration (default weights, validated), and when transforms are built.
    firstresult: the owning plugin's answer is used.
    """


@hookspec(firstresult=True)
def backbone_feature_dim(spec: "BackboneSpec", model: "nn.Module | None") -> int | None:
    """Return the width of the pooled features the headless backbone outputs.

    With `model=None` (listing): return it only if known without building the model
    (a shipped table, say), else None. With a built headless `model`: discover it from the
    module (e.g. the replaced classifier's `in_features`, timm's `head_hidden_size`).
    firstresult.
    """


@hookspec(firstresult=True)
def backbone_layer_groups(spec: "BackboneSpec", model: "nn.Module") -> "Sequence[LayerGroup] | None":
    """Return the headless model's parameters split into ordered groups, input to output.

    Every parameter of `model` must be in exactly one group (checked by the conformance
    tests); freezing "the first K groups" relies on it. firstresult.
    """


@hookspec(firstresult=True)
def create_backbone(spec: "BackboneSpec", weights: str | None) -> "nn.Module | None":
    """Build the headless backbone: a module mapping a normalized (N, C, H, W) float batch
    to pooled (N, feature_dim) features.

    `weights` is a tag of `spec.weight_tags` (load it) or None (random init). When the weights
    cannot be had (offline), raise `zoo.errors.WeightsUnavailableError` naming the file to place
    and where. Loading must never execute pickled code. firstresult.
    """


@hookspec
def register_exporters(register: Callable[["ExporterSpec"], None]) -> None:
    """Register export formats by calling `register(ExporterSpec(...))` for each.

    Called once, when an exporter is first needed. Same isolation rules as backbones:
    a failing plugin is marked broken, its exporters dropped. Returns nothing.
    """
