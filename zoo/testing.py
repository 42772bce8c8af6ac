"""zoo.testing: the conformance kit plugin authors call from their own tests.

    from zoo.testing import check_backbones, check_exporter

    def test_my_backbones_conform():
        check_backbones(provider="mine")           # every backbone of provider "mine"

    def test_my_format_round_trips():
        check_exporter("my-format")                # export + validate a tiny model

    def test_my_pretrained_classifier():           # only if the provider implements pretrained_head
        check_pretrained_head("mine/net", "in1k")  # needs those weights available offline

Each check goes through the zoo exactly as users do (registry, create_backbone, zoo.export) and
raises ConformanceError (an AssertionError, so pytest shows it as a failure) naming the backbone
or format, what is wrong and what to fix. The built-in plugins' own tests use the same kit.

What `check_backbone` asserts: the spec resolves and every weights tag has valid stats; the
backbone builds with random init, in eval mode; a batch of 2 at the record's input size gives
finite (2, feature_dim) features, equal to the feature dimension the plugin declares at build
time and in its listing; the layer groups are non-empty, uniquely named, ordered, and cover
every parameter exactly once; random-init weights offer no pretrained classifier
(`pretrained_head(spec, None)` is None). `check_pretrained_head` builds a backbone with real
weights and the classifier its provider returns: one finite logit per label (the label count is
the classifier's output width), non-empty label strings, deterministic in eval mode, and
exportable (`zoo.pretrained_classifier`). `check_exporter` exports a model (a tiny built-in one, or one on
your backbone) with your format and requires validation to pass and the metadata to round-trip.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import ZooError


class ConformanceError(AssertionError):
    """A plugin does not meet the contract; the message says which part and how to fix it."""


def _fail(what: str, problem: str) -> None:
    raise ConformanceError(f"{what}: {problem}")


# -- backbones ----------------------------------------------------------------------------------------
def check_backbone(name: str, input_size: Sequence[int] | None = None) -> dict[str, Any]:
    """Check one backbone (random init); returns what was measured. input_size (C, H, W): feed
    this instead of the record's size (a speed-up for big inputs; fully convolutional models)."""
    import torch

    from .plugin import registry
    from .backbones import get_info
    from .layers import check_layer_groups

    # -- the record and its stats ---------------------------------------------------------------------
    reg = registry.backbones()
    try:
        rec, _ = reg.resolve(name)
        info = get_info(name, None)
        for tag in rec.spec.weight_tags or (None,):
            reg.normalization(rec, tag).validate(f"{name} weights {tag!r}")
        static = reg.static_feature_dim(rec)
    except ZooError as exc:
        _fail(name, f"its record is not usable: {exc}")

    # -- build (the zoo verifies the declared feature dimension here) ----------------------------------
    from .backbones import create_backbone

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module, built = create_backbone(name, weights=None)
    except ZooError as exc:
        _fail(name, f"does not build: {exc}")
    if module.training:
        _fail(name, "create_backbone must hand out the module in eval mode")

    # -- a real forward pass ----------------------------------------------------------------------------
    size = tuple(input_size or info.normalization.input_size)
    with torch.inference_mode():
        y = module(torch.randn(2, *size, generator=torch.Generator().manual_seed(0)))
    if y.ndim != 2 or y.shape[0] != 2:
        _fail(name, f"expected pooled (N, D) features for a batch of 2, got shape {tuple(y.shape)}")
    if y.shape[1] != built.feature_dim:
        _fail(name, f"build() declares feature_dim {built.feature_dim}, the output is {y.shape[1]} wide")
    if static is not None and static != built.feature_dim:
        _fail(name, f"feature_dim() lists {static}, the built module gives {built.feature_dim}: fix the listing")
    if not bool(torch.isfinite(y).all()):
        _fail(name, "the features of a random-init model on a random batch are not finite")

    # -- layer groups -------------------------------------------------------------------------------------
    groups = built.layer_groups
    if not groups:
        _fail(name, "no layer groups: return them from build() (or None for the zoo's automatic grouping)")
    if len({g.name for g in groups}) != len(groups):
        _fail(name, f"layer group names must be unique: {[g.name for g in groups]}")
    try:
        check_layer_groups(module, groups)
    except ValueError as exc:
        _fail(name, f"layer groups must cover every parameter exactly once: {exc}")

    # -- random init has no pretrained classifier ----------------------------------------------------------
    if reg.ask(rec, "pretrained_head", lambda p: p.pretrained_head(rec.spec, None)) is not None:
        _fail(name, "pretrained_head(spec, None) returned a classifier, but random-init weights have none: "
                    "return None when weights is None")
    return {"name": name, "feature_dim": built.feature_dim, "listed_feature_dim": static,
            "layer_groups": len(groups), "num_params": built.num_params, "input_size": list(size)}


def check_backbones(provider: str | None = None, names: Iterable[str] | None = None, limit: int | None = None,
                    input_size: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """check_backbone on the given names, or on every backbone of `provider` (a deterministic
    sample of `limit` of them when given). Returns the per-backbone results."""
    from .backbones import list_models

    chosen = list(names) if names is not None else list_models(provider=provider)
    if not chosen:
        _fail(f"provider {provider!r}", "registers no backbone (is the plugin installed? see `zoo plugins`)")
    if limit is not None and len(chosen) > limit:
        chosen = sorted(chosen, key=lambda n: hashlib.sha1(n.encode()).hexdigest())[:limit]
    return [check_backbone(n, input_size) for n in chosen]


def check_pretrained_head(name: str, weights: str = "default") -> dict[str, Any] | None:
    """Check the classifier a provider ships with `weights` (a tag whose files load offline).
    Returns None where the provider offers none (pretrained_head is optional), else what was
    measured. The zoo's own checks in `zoo.pretrained_classifier` (a PretrainedHead, taking the
    backbone's features, one output per label) run first; then a real forward pass."""
    import torch

    from .plugin import registry
    from .backbones import get_info
    from .model import pretrained_classifier

    # -- what the provider offers (optional: None is a valid answer) ------------------------------------------
    reg = registry.backbones()
    try:
        rec, _ = reg.resolve(name)
        tag = get_info(name, weights).weights
        offered = reg.ask(rec, "pretrained_head", lambda p: p.pretrained_head(rec.spec, tag))
    except ZooError as exc:
        _fail(name, f"pretrained_head(spec, {weights!r}) fails: {exc}")
    if offered is None:
        return None

    # -- the zoo's own checks, as users meet them ---------------------------------------------------------------
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = pretrained_classifier(name, weights=weights)
    except ZooError as exc:
        _fail(name, f"its pretrained classifier is not usable: {exc}")

    # -- labels and a real forward pass ---------------------------------------------------------------------
    labels = model.meta.labels
    if not labels or not all(isinstance(x, str) and x.strip() for x in labels):
        _fail(name, "PretrainedHead.labels must be non-empty strings, one per output of the classifier")
    size = tuple(model.meta.normalization.input_size)
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        first, second = model(x), model(x)
    if tuple(first.shape) != (2, len(labels)):
        _fail(name, f"backbone + pretrained classifier give shape {tuple(first.shape)} for a batch of 2, "
                    f"expected (2, {len(labels)}) (one logit per label)")
    if not bool(torch.isfinite(first).all()):
        _fail(name, "the pretrained classifier's logits on a random batch are not finite")
    if not torch.equal(first, second):
        _fail(name, "the pretrained classifier is not deterministic in eval mode (dropout left active?)")
    return {"name": name, "weights": model.meta.weights, "labels": len(labels),
            "head": model.meta.head.to_dict(), "source": model.meta.extra.get("head_source")}


# -- exporters ----------------------------------------------------------------------------------------
def tiny_model(labels: Sequence[str] = ("cat", "dog", "fox"), input_size: Sequence[int] = (3, 32, 32), seed: int = 0):
    """A small ZooModel (conv backbone + linear head) that needs no plugin: what check_exporter
    exports by default."""
    import torch
    import torch.nn as nn

    from .heads import HeadConfig, build_head
    from .model import ModelMeta, ZooModel
    from .records import Normalization

    c = int(input_size[0])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        backbone = nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
        head = build_head(16, len(labels), HeadConfig())
    norm = Normalization(mean=(0.5,) * c, std=(0.25,) * c, input_size=tuple(int(v) for v in input_size),
                         resize_size=int(math.ceil(int(input_size[-1]) / 0.875)))
    meta = ModelMeta(backbone="testing/tiny", weights=None, normalization=norm, labels=tuple(labels),
                     feature_dim=16, head=HeadConfig())
    return ZooModel(backbone, head, meta).eval()


def check_exporter(format: str, backbone: str | None = None, preprocess: str = "normalize",
                   out: str | Path | None = None, **options: Any) -> dict[str, Any]:
    """Export a model with `format` (a tiny built-in model, or a head on `backbone` with random
    init) through `zoo.export`; validation must run and pass, and the artifact's metadata, when
    the exporter can read it back, must name the model's labels and preprocessing. Returns the
    export report. options: the exporter's own options."""
    from .plugin import registry
    from .plugin.api import check_provider
    from .errors import ExportValidationError
    from .exporting import export

    what = f"exporter {format!r}"
    try:
        exporter = registry.exporters().get(format)
        check_provider(exporter, "exporters")
    except (ZooError, TypeError) as exc:
        _fail(what, str(exc))
    for o in exporter.options:
        try:
            o.parse(o.default)
        except (TypeError, ValueError) as exc:
            _fail(what, f"the default of option {o.name!r} is not valid: {exc}")
    if backbone is None:
        model = tiny_model()
    else:
        from .model import build_model

        model = build_model(backbone, ["cat", "dog", "fox"], weights=None)
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(out) if out is not None else Path(tmp)
        try:
            report = export(model, formats=[format], out=target, preprocess=preprocess, **options)
        except ExportValidationError as exc:
            _fail(what, f"its artifact fails validation: {exc}")
        except ZooError as exc:
            _fail(what, f"export failed: {exc}")
        entry = report["artifacts"][format]
        if entry["status"] != "passed":
            _fail(what, f"status {entry['status']!r} ({entry.get('reason', '')}): implement validate() returning "
                        "zoo.ValidationResult so `zoo export` can check the artifact")
        meta = exporter.read_metadata(entry["path"])
        if meta is not None:
            want = {"labels": list(model.meta.labels), "backbone": model.meta.backbone}
            wrong = {k: meta.get(k) for k, v in want.items() if meta.get(k) != v}
            if wrong:
                _fail(what, f"read_metadata() gives {wrong}, the model has {want}")
    return report
