"""An example third-party backbone-zoo plugin, written on the plugin API v2 alone (docs/plugins.md).

One `zoo.BackboneProvider`, provider "example", with one backbone, `example/tinynet`, whose
normalization stats are its own (the zoo never assumes ImageNet numbers), and two weights tags:

- "seed0" (the default): generated from torch.manual_seed(0), so it needs no file;
- "v1": real weight loading, as a plugin with trained weights does it: a safetensors file (never
  unpickled) from the package `zoo_example_weights` if installed, else from the directory
  $ZOO_EXAMPLE_WEIGHTS (default ~/.cache/zoo-example-plugin); missing, the zoo's offline error names
  the file, the directory and the pip command. The file also holds the pretrained 3-class head
  (`pretrained_head`) and its labels. `python -m zoo_example_plugin.make_weights DIR` writes one.

One `zoo.Exporter`, `example-npz`: every tensor and the metadata in one .npz, validated by
rebuilding the model from the file alone and comparing it with eager PyTorch through
zoo.validation's helpers (model_inputs, run_in_batches, compare).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import zoo

PROVIDER = "example"
FEATURE_DIM = 32
WEIGHTS_FILE = "tinynet-v1.safetensors"
WEIGHTS_PACKAGE = "zoo_example_weights"
WEIGHTS_INSTALL = "pip install zoo-example-weights"
WEIGHTS_ENV = "ZOO_EXAMPLE_WEIGHTS"
V1_LABELS = ("cat", "dog", "fox")

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


# -- weights: a package, else a file in a directory, else the offline error --------------------------------
def weights_dir() -> Path:
    return Path(os.environ.get(WEIGHTS_ENV) or Path.home() / ".cache" / "zoo-example-plugin")


def read_v1() -> tuple[dict, tuple[str, ...]]:
    """The v1 tensors ("backbone.*", "head.*") and the head's labels."""
    from safetensors import safe_open

    from zoo.backbones import offline_weights_error

    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    candidates = [Path(p) / WEIGHTS_FILE for p in (spec.submodule_search_locations or [])] if spec else []
    candidates.append(weights_dir() / WEIGHTS_FILE)
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise offline_weights_error("example/tinynet.v1", WEIGHTS_FILE, weights_dir(), source="zoo-example-weights",
                                    cause=FileNotFoundError(str(candidates[-1])), install=WEIGHTS_INSTALL)
    with safe_open(str(path), framework="pt") as fh:  # safetensors: loading executes nothing
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        labels = tuple(json.loads((fh.metadata() or {}).get("labels", "[]")))
    return tensors, labels


class ExampleBackbones(zoo.BackboneProvider):
    """Backbones named example/...; the specs below must carry provider="example"."""

    name = PROVIDER

    def specs(self):
        yield zoo.BackboneSpec(
            provider=PROVIDER,
            model="tinynet",
            family="tinynet",
            weights=(
                zoo.WeightsInfo(tag="seed0", source="generated: torch.manual_seed(0)", num_classes=None,
                                license="CC0-1.0"),
                zoo.WeightsInfo(tag="v1", source=f"{WEIGHTS_INSTALL}, or {WEIGHTS_FILE} in ${WEIGHTS_ENV}",
                                file_name=WEIGHTS_FILE, num_classes=len(V1_LABELS), license="Apache-2.0"),
            ),
            default_weights="seed0",
            description="A 2-block CNN for examples and tests",
        )

    def normalization(self, spec, weights):
        return TINYNET_NORMALIZATION

    def build(self, spec, weights):
        import torch

        if weights == "seed0":  # generated weights: no file needed
            with torch.random.fork_rng():
                torch.manual_seed(0)
                model = _tinynet()
        else:
            model = _tinynet()
        if weights == "v1":  # trained weights, read from their file
            tensors, _ = read_v1()
            model.load_state_dict({k.removeprefix("backbone."): v for k, v in tensors.items()
                                   if k.startswith("backbone.")})
        groups = [zoo.LayerGroup(name, tuple(n for n, _ in model.named_parameters() if n.startswith(name + ".")))
                  for name in ("stem", "stage1")]
        return zoo.BuiltBackbone(model.eval(), feature_dim=FEATURE_DIM, layer_groups=groups)

    def feature_dim(self, spec):
        return FEATURE_DIM  # known without building it, so `zoo list` shows it

    def pretrained_head(self, spec, weights):
        if weights != "v1":  # random init and seed0 come without a classifier
            return None
        import torch

        tensors, labels = read_v1()
        head = torch.nn.Linear(FEATURE_DIM, len(labels))
        head.load_state_dict({"weight": tensors["head.weight"], "bias": tensors["head.bias"]})
        return zoo.PretrainedHead(labels=labels, module=head.eval())


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
        meta = zoo.exporting.artifact_metadata(model, self.name, options.preprocess, options.embedding)
        save = np.savez_compressed if options["compress"] else np.savez
        with open(path, "wb") as fh:  # a file handle: np.savez would append ".npz" to the name
            save(fh, __zoo_metadata__=np.array(json.dumps(meta)), **tensors)
        return {"path": str(path), "tensors": len(tensors), "metadata": meta}

    def validate(self, model, path, images, options, reference, tolerance, batch_sizes, targets):
        """Rebuild the model from the file alone, run it on the images, compare with eager PyTorch."""
        import copy

        import numpy as np
        import torch
        from zoo.validation import compare, model_inputs, run_in_batches

        with np.load(path) as data:
            meta = json.loads(str(data["__zoo_metadata__"]))
            state = {k: torch.from_numpy(data[k]) for k in data.files if k != "__zoo_metadata__"}
        rebuilt = copy.deepcopy(model).eval()
        rebuilt.load_state_dict(state)
        inputs = model_inputs(images, model.meta.normalization, "none")  # the file holds weights: feed floats

        def run(batch):
            with torch.inference_mode():
                embedding = rebuilt.forward_features(torch.from_numpy(batch))
                logits = rebuilt.forward_head(embedding)
            return {"logits": logits.numpy(), "probabilities": torch.softmax(logits, -1).numpy(),
                    "embedding": embedding.numpy()}

        result = zoo.ValidationResult.from_report(compare(reference, run_in_batches(run, inputs, batch_sizes),
                                                          tolerance, targets=targets),
                                                  runtime=f"torch {torch.__version__} (rebuilt from the .npz)")
        if meta.get("labels") != list(model.meta.labels):
            result.fail("the labels in the file are not the model's")
        return result

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
