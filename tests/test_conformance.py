"""Conformance tests parametrized over the registry itself (as timm tests its catalogue), with
the kit plugin authors use (zoo.testing).

For a bounded, deterministic sample of every built-in provider, random init, small inputs:
the model builds; the feature dimension the plugin reports (statically and after building)
equals the width of its real output; the stats are valid; the layer groups cover every
parameter exactly once, under unique names. The kit also passes on the example plugin and the
built-in exporters, and fails on deliberately wrong plugins.
"""

from __future__ import annotations

import hashlib
import warnings

import pytest
import torch

import zoo
from zoo.plugin import registry
from zoo.testing import ConformanceError, check_backbone, check_backbones, check_exporter

# Always covered: one of each head layout the plugins must discover.
PINNED = {
    "torchvision": ["resnet18", "vgg11", "mobilenet_v2", "mobilenet_v3_small", "squeezenet1_1", "densenet121",
                    "googlenet", "shufflenet_v2_x0_5", "convnext_tiny", "vit_b_32", "efficientnet_b0",
                    "regnet_x_400mf", "mnasnet0_5", "swin_t"],
    "timm": ["resnet18", "tf_efficientnet_lite0", "mobilenetv3_small_100", "vit_tiny_patch16_224", "convnext_atto",
             "efficientvit_b0", "levit_128s"],
}
SAMPLED = {"torchvision": 8, "timm": 16}  # plus this many drawn deterministically from the catalogue
MAX_PARAMS = 25_000_000  # keep CI time bounded; counted on the meta device (no memory, no compute)


def _meta_params(name: str) -> int:
    rec, _ = registry.backbones().resolve(name)
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            module = registry.backbones().provider(rec).build(rec.spec, None).module
        return sum(p.numel() for p in module.parameters())
    except Exception:  # noqa: BLE001 - cannot be sized on meta: skip it in sampling
        return MAX_PARAMS + 1


def _sample(provider: str) -> list[str]:
    names = zoo.list_models(provider=provider)
    pinned = [f"{provider}/{m}" for m in PINNED[provider]]
    ranked = sorted((n for n in names if n not in pinned), key=lambda n: hashlib.sha1(n.encode()).hexdigest())
    picked: list[str] = []
    for name in ranked:
        if len(picked) == SAMPLED[provider]:
            break
        if _meta_params(name) <= MAX_PARAMS:
            picked.append(name)
    return pinned + picked


SAMPLE = [n for p in ("torchvision", "timm") for n in _sample(p)]


def _input_size(name: str, info) -> tuple[int, int, int]:
    c, h, w = info.normalization.input_size
    rec, _ = registry.backbones().resolve(name)
    fixed = rec.spec.family in ("vit", "maxvit", "swin") or name.startswith("timm/") and _timm_fixed(rec.spec.model)
    return (c, h, w) if fixed else (c, 96, 96)


def _timm_fixed(arch: str) -> bool:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    return bool(cfg and cfg.fixed_input_size)


@pytest.mark.parametrize("name", SAMPLE)
def test_backbone_conforms(name):
    try:  # small inputs are a speed-up only; some models need their record's size
        result = check_backbone(name, input_size=_input_size(name, zoo.get_info(name, None)))
    except (AssertionError, RuntimeError) as exc:
        if isinstance(exc, ConformanceError) and "does not build" in str(exc):
            raise
        result = check_backbone(name)
    assert result["listed_feature_dim"] == result["feature_dim"], f"{name}: the shipped table is stale"
    assert result["layer_groups"] >= 2


@pytest.mark.parametrize("provider", ["torchvision", "timm"])
def test_every_default_weights_record_has_valid_stats(provider):
    reg = registry.backbones()
    for name in zoo.list_models(provider=provider):
        rec, _ = reg.resolve(name)
        for tag in rec.spec.weight_tags[:3] or (None,):
            reg.normalization(rec, tag).validate(f"{name}.{tag}")


def test_vgg_feature_choice_is_fc7():
    """Documented choice: VGG heads receive fc7 (4096), the first two classifier layers kept."""
    model, info = zoo.create_backbone("torchvision/vgg16", weights=None)
    assert info.feature_dim == 4096
    assert [g.name for g in info.layer_groups][-2:] == ["classifier.0", "classifier.3"]


def test_the_example_plugins_own_tests_pass(example_plugin):
    """examples/zoo-example-plugin/tests (which use the kit), run against the installed example."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "zoo-example-plugin" / "tests" / "test_tinynet.py"
    spec = importlib.util.spec_from_file_location("example_plugin_tests", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tests = [getattr(module, n) for n in sorted(vars(module)) if n.startswith("test_")]
    assert len(tests) >= 3
    for test in tests:
        test()


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_kit_passes_on_the_builtin_exporters(fmt):
    report = check_exporter(fmt)
    assert report["artifacts"][fmt]["validation"]["max_abs_logit_diff"] <= 1e-4


WRONG = {
    "groups": (r"layer groups must cover every parameter exactly once: .*0\.bias", """
        def build(self, spec, weights):
            m = tiny(8)
            return BuiltBackbone(m, feature_dim=8, layer_groups=[LayerGroup("conv", ("0.weight",))])  # no 0.bias
    """),
    "listing": ("feature_dim 16", """
        def feature_dim(self, spec):
            return 16   # the module outputs 8
    """),
    "unpooled": ("pooled features", """
        def build(self, spec, weights):
            return BuiltBackbone(torch.nn.Conv2d(3, 8, 3), feature_dim=8)
    """),
}


@pytest.mark.parametrize("kind", sorted(WRONG))
def test_kit_fails_on_a_deliberately_wrong_plugin(kind, fresh_plugins):
    import textwrap
    import types

    from test_plugins import plugin

    fragment, body = WRONG[kind]
    mod = types.ModuleType(f"wrong_{kind}")
    exec(plugin("from zoo import LayerGroup\nclass P(Base):\n    name = 'wrong'\n" + textwrap.indent(textwrap.dedent(body), "    ")
                + "\n@hookimpl\ndef zoo_register_backbones(register):\n    register(P())\n"), mod.__dict__)
    assert fresh_plugins.get_host().register(mod, "wrong")
    registry.reset()
    with pytest.raises(ConformanceError, match=fragment) as err:
        check_backbones(provider="wrong")
    assert str(err.value).startswith("wrong/net: ")


def test_kit_fails_on_an_exporter_without_a_verdict(fresh_plugins):
    import types

    mod = types.ModuleType("verdictless")
    exec(VERDICTLESS, mod.__dict__)
    assert fresh_plugins.get_host().register(mod, "verdictless")
    registry.reset()
    with pytest.raises(ConformanceError, match=r"validate\(\) returned dict without a boolean 'passed'"):
        check_exporter("no-verdict")


VERDICTLESS = """
import numpy as np
import zoo

class NoVerdict(zoo.Exporter):
    name = "no-verdict"
    suffix = ".npy"
    def export(self, model, path, options):
        with open(path, "wb") as fh:
            np.save(fh, np.zeros(3))
        return {}
    def validate(self, model, path, images, options, reference, tolerance, batch_sizes, targets):
        return {"max_abs_logit_diff": 0.0}   # numbers, but no verdict

@zoo.hookimpl
def zoo_register_exporters(register):
    register(NoVerdict())
"""
