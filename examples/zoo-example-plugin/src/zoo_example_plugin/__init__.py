"""An example third-party backbone-zoo plugin.

It registers one backbone, `example/tinynet`, with normalization stats of its own (the zoo
never assumes ImageNet numbers), and one export format, `example-npz` (tensors and metadata in one .npz).
"""

from __future__ import annotations

import json
from pathlib import Path

from zoo import BackboneSpec, ExporterSpec, Normalization, WeightsInfo, hookimpl

PROVIDER = "example"
FEATURE_DIM = 32

# Stats of the (imaginary) dataset tinynet was trained on. Plugins own these numbers.
TINYNET_NORMALIZATION = Normalization(
    mean=(0.5, 0.4, 0.3),
    std=(0.25, 0.25, 0.25),
    input_size=(3, 64, 64),
    resize_size=72,
    interpolation="bilinear",
    crop_mode="center",
)


def _tinynet():
    import torch.nn as nn

    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    model = nn.Sequential()
    model.add_module("stem", block(3, 16))
    model.add_module("pool", nn.MaxPool2d(2))
    model.add_module("stage1", block(16, FEATURE_DIM))
    model.add_module("gap", nn.AdaptiveAvgPool2d(1))
    model.add_module("flatten", nn.Flatten())
    return model


@hookimpl
def register_backbones(register):
    register(BackboneSpec(
        provider=PROVIDER,
        model="tinynet",
        family="tinynet",
        weights=(WeightsInfo(tag="seed0", source="generated: torch.manual_seed(0)", num_classes=None),),
        default_weights="seed0",
        description="A 2-block CNN for examples and tests",
    ))


@hookimpl
def backbone_normalization(spec, weights):
    return TINYNET_NORMALIZATION


@hookimpl
def create_backbone(spec, weights):
    import torch

    if weights == "seed0":  # "pretrained" weights a real plugin would load from a file
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return _tinynet()
    return _tinynet()


@hookimpl
def backbone_feature_dim(spec, model):
    return FEATURE_DIM  # known without building it


@hookimpl
def backbone_layer_groups(spec, model):
    from zoo import LayerGroup

    return [
        LayerGroup(name, tuple(n for n, _ in model.named_parameters() if n.startswith(name + ".")))
        for name in ("stem", "stage1")
    ]


def export_npz(model, path, **options):
    """Write every tensor of the model, plus its metadata as JSON, into one .npz (self-describing;
    `zoo export` adds its own `<artifact>.json` sidecar beside it)."""
    import numpy as np

    path = Path(path)
    tensors = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    meta = model.meta.to_dict() if hasattr(model, "meta") else {}
    with open(path, "wb") as fh:  # a file handle: np.savez would append ".npz" to a staging name
        np.savez(fh, __zoo_metadata__=np.array(json.dumps(meta)), **tensors)
    return {"path": str(path), "tensors": len(tensors)}


@hookimpl
def register_exporters(register):
    register(ExporterSpec(name="example-npz", suffix=".npz", export=export_npz,
                          description="all tensors as a NumPy .npz plus a JSON sidecar"))
