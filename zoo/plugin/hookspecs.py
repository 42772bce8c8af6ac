"""The hooks a zoo plugin implements (pluggy project "zoo"): one registration hook per kind.

A plugin is a module with functions decorated by `zoo.hookimpl`, found through the `zoo`
entry-point group. Each hook hands the plugin a `register` callable; the plugin calls it with
provider objects (`zoo.BackboneProvider`, `zoo.Exporter`; see `zoo.plugin.api`). pluggy calls the hooks,
one plugin at a time, so a plugin that fails is isolated. An implementation whose name is not
a hook below is rejected by name (pluggy's `check_pending`), so a typo never goes unnoticed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    from .api import BackboneProvider, Exporter

hookspec = pluggy.HookspecMarker("zoo")
hookimpl = pluggy.HookimplMarker("zoo")

HOOKS = ("zoo_register_backbones", "zoo_register_exporters")
# The plugin API v1 hooks (0.1): named in the error a plugin still implementing them gets.
V1_HOOKS = ("register_backbones", "register_exporters", "backbone_normalization", "backbone_feature_dim",
            "backbone_layer_groups", "create_backbone")


@hookspec
def zoo_register_backbones(register: Callable[["BackboneProvider"], None]) -> None:
    """Call `register(provider)` once per `zoo.BackboneProvider` this plugin offers.

    Called once per set of installed plugins (the answer is cached on disk for `zoo list`), so
    it must be cheap: build no models, download nothing. Raising, or registering an invalid
    provider, a spec outside the provider's name, or a provider name another plugin owns, marks
    this plugin broken (nothing of it is kept) unless ZOO_STRICT_PLUGINS=1, which re-raises.
    """


@hookspec
def zoo_register_exporters(register: Callable[["Exporter"], None]) -> None:
    """Call `register(exporter)` once per `zoo.Exporter` (export format) this plugin offers.

    Same rules as zoo_register_backbones: cheap, isolated, a format name belongs to one plugin.
    """
