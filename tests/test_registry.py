"""Registry behaviour on the real built-in plugins: names, globs, suggestions, ambiguity."""

import pytest

import zoo
from zoo.plugin import registry
from zoo.errors import AmbiguousBackboneError, UnknownBackboneError, UnknownWeightsError


def test_both_resnet18s_are_addressable():
    names = zoo.list_models("resnet18*")
    assert "torchvision/resnet18" in names and "timm/resnet18" in names
    rec, tag = registry.backbones().resolve("timm/resnet18.a1_in1k")
    assert (rec.name, tag) == ("timm/resnet18", "a1_in1k")
    rec, tag = registry.backbones().resolve("torchvision/resnet18")
    assert (rec.plugin, tag) == ("torchvision", None)


def test_bare_name_must_be_unambiguous():
    with pytest.raises(AmbiguousBackboneError, match="torchvision/resnet18"):
        registry.backbones().resolve("resnet18")
    rec, _ = registry.backbones().resolve("alexnet")  # only torchvision has it
    assert rec.name == "torchvision/alexnet"


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UnknownBackboneError) as err:
        registry.backbones().resolve("torchvision/resnet81")
    assert "torchvision/resnet18" in err.value.suggestions
    assert "did you mean" in str(err.value)


def test_unknown_weights_tag_lists_available():
    with pytest.raises(UnknownWeightsError, match="IMAGENET1K_V1"):
        registry.backbones().resolve("torchvision/resnet50.NOPE")


def test_include_exclude_provider_filters():
    vgg = zoo.list_models("vgg*", exclude="*_bn")
    assert vgg == sorted(vgg, key=lambda n: n.split("/")[1]) and vgg
    assert not any(n.endswith("_bn") for n in vgg)
    assert all(n.startswith("timm/") for n in zoo.list_models("resnet*", provider="timm"))
    assert zoo.list_models("torchvision/vgg11") == ["torchvision/vgg11"]


def test_stats_come_from_the_plugins():
    n = zoo.get_normalization("timm/tf_efficientnet_lite0")
    assert n.mean == (0.5, 0.5, 0.5) and n.std == (0.5, 0.5, 0.5) and n.interpolation == "bicubic"
    v1 = zoo.get_normalization("torchvision/resnet50", "IMAGENET1K_V1")
    v2 = zoo.get_normalization("torchvision/resnet50", "IMAGENET1K_V2")
    assert (v1.resize_size, v2.resize_size) == (256, 232)  # per-weights stats, from torchvision's enum
    assert v1.mean == pytest.approx((0.485, 0.456, 0.406))


def test_provider_counts_cover_the_catalogues():
    import timm
    import torchvision.models as tvm

    assert len(zoo.list_models(provider="torchvision")) == len(tvm.list_models(module=tvm))
    assert len(zoo.list_models(provider="timm")) == len(timm.list_models())


@pytest.mark.parametrize("name", ["torchvision/resnet18", "torchvision/vgg11", "torchvision/regnet_x_400mf",
                                  "timm/tf_efficientnet_lite0", "timm/vit_small_patch16_rope_224"])
def test_zoo_info_describes_the_architecture_the_random_init_build_has(name):
    """`zoo info` counts parameters and layer groups and measures the feature dim on an architecture
    built without weights (meta device where it builds there): the same numbers as a real build."""
    import torch

    from zoo.backbones import describe_backbone

    rng = torch.random.get_rng_state()
    _, described = describe_backbone(name)
    untouched = torch.equal(torch.random.get_rng_state(), rng)
    module, built = zoo.create_backbone(name, weights=None)
    assert (described.num_params, described.feature_dim) == (built.num_params, built.feature_dim) != (None, None)
    assert described.layer_groups == built.layer_groups and len(built.layer_groups) > 1
    assert not any(p.is_meta for p in module.parameters())  # create_backbone's own build is real
    if name in ("torchvision/resnet18", "torchvision/vgg11"):
        assert untouched  # nothing was initialized
