"""The public face of the registry: list, describe and build backbones by name."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .plugin import registry
from .errors import PluginError, UnknownWeightsError, ZooError
from .plugin.api import BuiltBackbone
from .records import LayerGroup, Normalization, WeightsInfo

DEFAULT = "default"  # the `weights=` value meaning "the plugin's default pretrained weights"


@dataclass(frozen=True)
class BackboneInfo:
    """Everything the zoo knows about one backbone with one choice of weights."""

    name: str  # qualified provider/model
    provider: str
    model: str
    family: str
    plugin: str
    weights: str | None  # tag, "file:<name>@<sha>", or None for random init
    default_weights: str | None
    available_weights: tuple[WeightsInfo, ...]
    normalization: Normalization
    feature_dim: int | None
    layer_groups: tuple[LayerGroup, ...] = ()
    num_params: int | None = None
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "provider": self.provider,
            "model": self.model,
            "family": self.family,
            "plugin": self.plugin,
            "weights": self.weights,
            "default_weights": self.default_weights,
            "available_weights": [
                {"tag": w.tag, "source": w.source, "num_classes": w.num_classes, "metrics": dict(w.metrics),
                 "license": w.license}
                for w in self.available_weights
            ],
            "normalization": self.normalization.to_dict(),
            "feature_dim": self.feature_dim,
            "num_params": self.num_params,
            "layer_groups": [{"name": g.name, "num_params": None, "parameters": len(g.parameters)}
                             for g in self.layer_groups],
            "description": self.description,
        }


def list_models(
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    provider: str | None = None,
    pretrained_only: bool = False,
) -> list[str]:
    """Qualified names of registered backbones, filtered by glob patterns (torchvision style)."""
    return registry.backbones().list_models(include, exclude, provider, pretrained_only)


def _choose_weights(rec: registry.BackboneRecord, tag_in_name: str | None, weights: Any) -> tuple[str, Any]:
    """-> ("tag", tag | None) or ("file", path)."""
    if weights is None:
        if tag_in_name is not None:
            raise UnknownWeightsError(f"{rec.name}.{tag_in_name} names weights but weights=None asks for random init")
        return "tag", None
    if weights == DEFAULT:
        return "tag", tag_in_name if tag_in_name is not None else rec.spec.default_weights
    if isinstance(weights, str) and weights in rec.spec.weight_tags:
        if tag_in_name is not None and tag_in_name != weights:
            raise UnknownWeightsError(f"the name asks for weights {tag_in_name!r} but weights={weights!r}")
        return "tag", weights
    from .weights import looks_like_path  # imports torch: only when weights may be a file

    if looks_like_path(weights):
        return "file", Path(weights)
    raise UnknownWeightsError(
        f"{rec.name}: weights={weights!r} is neither a tag ({', '.join(rec.spec.weight_tags) or 'none'}), "
        f"'{DEFAULT}', None (random init), nor a local .safetensors/.pth file"
    )


def get_info(name: str, weights: Any = DEFAULT, catalog: registry.Catalog | None = None) -> BackboneInfo:
    """Describe a backbone without building it (normalization, static feature dim, weights).

    catalog: where to look it up; default the live registry (zoo.index passes its cached one)."""
    reg = catalog if catalog is not None else registry.backbones()
    rec, tag_in_name = reg.resolve(name)
    kind, value = _choose_weights(rec, tag_in_name, weights)
    norm_tag = value if kind == "tag" else rec.spec.default_weights
    return BackboneInfo(
        name=rec.name,
        provider=rec.spec.provider,
        model=rec.spec.model,
        family=rec.spec.family,
        plugin=rec.plugin,
        weights=value if kind == "tag" else f"file:{Path(value).name}",
        default_weights=rec.spec.default_weights,
        available_weights=rec.spec.weights,
        normalization=reg.normalization(rec, norm_tag),
        feature_dim=reg.static_feature_dim(rec),
        description=rec.spec.description,
    )


def get_normalization(name: str, weights: Any = DEFAULT) -> Normalization:
    """The preprocessing stats the backbone's plugin prescribes for these weights."""
    return get_info(name, weights).normalization


def create_backbone(name: str, weights: Any = DEFAULT) -> tuple["torch.nn.Module", BackboneInfo]:  # noqa: F821
    """Build the headless backbone (pooled features out) and describe it.

    weights: "default" (the plugin's default pretrained tag, or random init if it has none),
    a tag such as "IMAGENET1K_V2", None (random init), or a local .safetensors / .pth file
    (read without unpickling code). Returns (module in eval mode, BackboneInfo).

    The module always comes from the provider that owns the name, and its real output width is
    checked against the feature dimension the plugin declares before it is handed out.
    """
    return _create(name, weights)


def create_loaded_backbone(name: str, load: Callable[[Any], None]) -> tuple["torch.nn.Module", BackboneInfo]:  # noqa: F821
    """The random-init architecture of `name` with its state set by `load(module)` (zoo.model's
    run directories: `load` loads backbone.safetensors strictly). The module's own init is skipped
    where `load` overwrites all of it (see `_skeleton`); info.weights is None, as for random init."""
    return _create(name, None, load)


def describe_backbone(name: str) -> tuple["torch.nn.Module", BackboneInfo]:  # noqa: F821
    """What `create_backbone(name, weights=None)` reports (parameters, layer groups, the measured
    feature dim) without computing any weights (`zoo info`): the architecture is built on the meta
    device where it can be, so the module returned may hold meta tensors: count it, do not run it."""
    try:
        return _create(name, None, shapes_only=True)
    except _NotOnMeta:
        return _create(name, None)


class _NotOnMeta(Exception):
    """A module built on the meta device could not be measured there (data-dependent code)."""


def _create(name: str, weights: Any, load: Callable[[Any], None] | None = None,
            shapes_only: bool = False) -> tuple[Any, BackboneInfo]:
    from .weights import file_digest, load_into, read_state_dict

    # -- resolve: the record, its owner, the weights ------------------------------------------------
    reg = registry.backbones()
    rec, tag_in_name = reg.resolve(name)
    kind, value = _choose_weights(rec, tag_in_name, weights)
    build_tag = value if kind == "tag" else None
    norm_tag = value if kind == "tag" else rec.spec.default_weights
    normalization = reg.normalization(rec, norm_tag)
    weights_id: str | None = build_tag
    if kind == "file":
        path = Path(value)
        state = read_state_dict(path)  # a missing or unreadable file fails before anything is built

        def from_file(module):  # weights given as a file: its tensors, classifier keys ignored
            ignored = load_into(module, state, f"weights file {str(path)!r}")
            if ignored:
                warnings.warn(f"{rec.name}: ignored {len(ignored)} keys from {path.name} (classifier): "
                              f"{ignored[:4]}", stacklevel=4)

        load = from_file
        weights_id = f"file:{path.name}@sha256:{file_digest(path)}"

    # -- build, through the owning provider only: uninitialized where `load` overwrites every tensor -
    built = _skeleton(reg, rec, materialize=not shapes_only) if load is not None or shapes_only else None
    if built is None:
        built = reg.ask(rec, "build", lambda p: p.build(rec.spec, build_tag))
        if not isinstance(built, BuiltBackbone):
            raise PluginError(f"plugin {rec.plugin!r}: {type(reg.provider(rec)).__name__}.build() must return "
                              f"zoo.BuiltBackbone(module, feature_dim, layer_groups) for {rec.name}, "
                              f"got {type(built).__name__}")
    module = built.module
    if load is not None:
        load(module)
    module.eval()

    # -- verify what the plugin declared --------------------------------------------------------------
    try:
        feature_dim = verify_feature_dim(module, rec, built.feature_dim, reg.static_feature_dim(rec), normalization)
    except ZooError:
        raise
    except Exception as exc:
        if shapes_only and any(t.is_meta for t in module.parameters()):
            raise _NotOnMeta() from exc
        raise
    groups = built.layer_groups
    if groups is None:
        from .layers import auto_layer_groups

        groups = auto_layer_groups(module)
    info = BackboneInfo(
        name=rec.name,
        provider=rec.spec.provider,
        model=rec.spec.model,
        family=rec.spec.family,
        plugin=rec.plugin,
        weights=weights_id,
        default_weights=rec.spec.default_weights,
        available_weights=rec.spec.weights,
        normalization=normalization,
        feature_dim=feature_dim,
        layer_groups=tuple(groups),
        num_params=sum(p.numel() for p in module.parameters()),
        description=rec.spec.description,
    )
    return module, info


def _skeleton(reg: registry.BackboneRegistry, rec: registry.BackboneRecord,
              materialize: bool = True) -> BuiltBackbone | None:
    """The provider's random-init build with its tensors allocated but not initialized, for a state
    dict to overwrite: random init is most of a small job's model build (ResNet-18 0.15 s, VGG-16
    1.9 s), and a loaded backbone throws it away. The build runs on the meta device (shapes only),
    then every parameter and buffer gets uninitialized CPU memory (materialize=False: it stays on
    meta, for shapes and counts only, and none of the checks below apply).

    None (build for real) unless a strict load is sure to overwrite all of it: the build must run on
    meta tensors (no data-dependent code), every parameter and buffer must be in the state dict
    (no non-persistent buffers, no extra state), none may be shared by two names (moving off meta
    would untie them), and no module may keep a tensor outside its parameters and buffers."""
    import torch
    from torch.nn.parameter import UninitializedTensorMixin

    try:
        with torch.device("meta"):
            built = reg.ask(rec, "build", lambda p: p.build(rec.spec, None))
    except Exception:  # noqa: BLE001 - it cannot be built shapes-only: the real build will say why if it fails
        return None
    if not isinstance(built, BuiltBackbone) or not isinstance(built.module, torch.nn.Module):
        return None
    module = built.module
    if not materialize:
        return built
    tensors = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    unique = {id(t) for _, t in tensors}
    stray = any(isinstance(v, torch.Tensor) for m in module.modules() for v in vars(m).values())
    if (len(unique) != len(tensors) or {n for n, _ in tensors} != set(module.state_dict()) or stray
            or any(isinstance(t, UninitializedTensorMixin) for _, t in tensors)):
        return None
    module.to_empty(device="cpu")
    return built


def output_width(module, input_size: Sequence[int]) -> tuple[int, ...]:
    """The shape of what `module` outputs for one image of `input_size`.

    Shapes only: the module runs on the meta device through torch.func.functional_call (its
    parameters and buffers swapped for meta tensors), so nothing is computed and nothing of it,
    BatchNorm statistics included, changes. Modules meta tensors cannot run (data-dependent
    code) get one real zeros image, in eval mode, under inference_mode."""
    import torch
    from torch.func import functional_call

    was_training = module.training
    module.eval()
    try:
        state = {k: torch.empty_like(v, device="meta") for k, v in
                 [*module.named_parameters(), *module.named_buffers()]}
        try:
            with torch.no_grad():
                out = functional_call(module, state, (torch.empty(1, *input_size, device="meta"),))
        except Exception:  # noqa: BLE001 - meta cannot run this module: run it for real, once
            device = next((p.device for p in module.parameters()), torch.device("cpu"))
            with torch.inference_mode():
                out = module(torch.zeros(1, *input_size, device=device))
    finally:
        module.train(was_training)
    return tuple(out.shape)


def verify_feature_dim(module, rec: registry.BackboneRecord, declared: Any, static: int | None,
                       normalization: Normalization) -> int:
    """The real pooled width of `module`; PluginError naming the plugin unless it is what the
    plugin declared at build time and, when it gave one, in its listing table."""
    shape = output_width(module, normalization.input_size)
    where = f"plugin {rec.plugin!r}: backbone {rec.name}"
    if len(shape) != 2:
        raise PluginError(f"{where} outputs shape {shape} for one image of {tuple(normalization.input_size)}; "
                          "a backbone must output pooled features (N, feature_dim): pool and flatten in build()")
    real = int(shape[1])
    if not isinstance(declared, int) or isinstance(declared, bool) or declared != real:
        raise PluginError(f"{where} declares feature_dim {declared!r} but its module outputs {real} features; "
                          f"return BuiltBackbone(module, feature_dim={real}, ...) from build()")
    if static is not None and static != real:
        raise PluginError(f"{where} is listed with feature_dim {static} (BackboneProvider.feature_dim) but its "
                          f"module outputs {real} features; fix feature_dim() (or its table)")
    return real


def offline_weights_error(model: str, file_name: str, directory: str | os.PathLike, source: str,
                          cause: BaseException | None = None, install: str | None = None) -> ZooError:
    """The error a plugin raises (from `build` or `pretrained_head`) when pretrained weights cannot
    be had offline; it names what is missing, where it goes and every way out.

    model: the backbone (and tag) the weights are for, e.g. "mine/tinynet.v1".
    file_name: the file the plugin looks for, e.g. "tinynet-v1.safetensors".
    directory: where the plugin looks for it (where the user should place it).
    source: where the file comes from (a URL, a hub id, a package).
    cause: the exception that showed it missing, if any (its text is quoted).
    install: a command that installs the weights, e.g. "pip install tinynet-weights" (offered first).
    Returns a `zoo.errors.WeightsUnavailableError` (exit 2) to raise."""
    from .errors import WeightsUnavailableError

    why = f" ({type(cause).__name__}: {cause})" if cause else ""
    return WeightsUnavailableError(
        f"pretrained weights for {model} are not available offline{why}.\n"
        + (f"  - install them: {install}, or\n" if install else "")
        + f"  - place the file {file_name!r} in {str(directory)!r} (from {source}), or\n"
        f"  - pass a local file: weights='path/to/weights.safetensors' (or a .pth state_dict), or\n"
        f"  - use random init: weights=None (CLI: --weights none)"
    )
