"""An example third-party backbone-zoo plugin.

Written on the plugin API v2 alone (docs/plugins.md): one `zoo.BackboneProvider` with one
backbone, `example/tinynet`, whose normalization stats are its own (the zoo never assumes
ImageNet numbers), and one `zoo.Exporter`, `example-npz` (tensors and metadata in one .npz,
validated by reloading every tensor).
"""

from __future__ import annotations

import json

import zoo

PROVIDER = "example"
FEATURE_DIM = 32

# Stats of the (imaginary) dataset tinynet was trained on. Plugins own these numbers.
TINYNET_NORMALIZATION = zoo.Normalization(
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


class ExampleBackbones(zoo.BackboneProvider):
    """Backbones named example/...; the specs below must carry provider="example"."""

    name = PROVIDER

    def specs(self):
        yield zoo.BackboneSpec(
            provider=PROVIDER,
            model="tinynet",
            family="tinynet",
            weights=(zoo.WeightsInfo(tag="seed0", source="generated: torch.manual_seed(0)", num_classes=None),),
            default_weights="seed0",
            description="A 2-block CNN for examples and tests",
        )

    def normalization(self, spec, weights):
        return TINYNET_NORMALIZATION

    def build(self, spec, weights):
        import torch

        if weights == "seed0":  # "pretrained" weights a real plugin would load from a file
            with torch.random.fork_rng():
                torch.manual_seed(0)
                model = _tinynet()
        else:
            model = _tinynet()
        groups = [zoo.LayerGroup(name, tuple(n for n, _ in model.named_parameters() if n.startswith(name + ".")))
                  for name in ("stem", "stage1")]
        return zoo.BuiltBackbone(model, feature_dim=FEATURE_DIM, layer_groups=groups)

    def feature_dim(self, spec):
        return FEATURE_DIM  # known without building it, so `zoo list` shows it


class NpzExporter(zoo.Exporter):
    """All tensors of the model, plus its metadata as JSON, in one .npz (self-describing;
    `zoo export` adds its own `<artifact>.json` sidecar beside it)."""

    name = "example-npz"
    suffix = ".npz"
    description = "all tensors as a NumPy .npz, metadata inside"
    requires = ("numpy",)
    options = (zoo.ExportOption("compress", False, "write a compressed .npz", type=bool),)

    def export(self, model, path, options):
        import numpy as np

        tensors = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        meta = model.meta.to_dict()
        save = np.savez_compressed if options["compress"] else np.savez
        with open(path, "wb") as fh:  # a file handle: np.savez would append ".npz" to a staging name
            save(fh, __zoo_metadata__=np.array(json.dumps(meta)), **tensors)
        return {"path": str(path), "tensors": len(tensors), "metadata": meta}

    def validate(self, model, path, images, options, reference, tolerance, batch_sizes, targets):
        """Reload every tensor and compare it with the model's own: the format is lossless."""
        import numpy as np

        problems = []
        with np.load(path) as data:
            meta = json.loads(str(data["__zoo_metadata__"]))
            for key, value in model.state_dict().items():
                if key not in data.files:
                    problems.append(f"tensor {key!r} is missing")
                elif not np.array_equal(data[key], value.detach().cpu().numpy()):
                    problems.append(f"tensor {key!r} differs")
        if meta.get("labels") != list(model.meta.labels):
            problems.append("the labels in the file are not the model's")
        return zoo.ValidationResult(passed=not problems, problems=problems, runtime=f"numpy {np.__version__}")

    def read_metadata(self, artifact):
        import numpy as np

        with np.load(artifact) as data:
            return json.loads(str(data["__zoo_metadata__"]))


@zoo.hookimpl
def zoo_register_backbones(register):
    register(ExampleBackbones())


@zoo.hookimpl
def zoo_register_exporters(register):
    register(NpzExporter())
