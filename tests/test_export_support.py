"""Helpers shared by the export and predict tests (tiny trained models, image files on disk),
and the checks that the helpers themselves do what the other tests rely on."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

LABELS = ("cat", "dog", "fish")


def tiny_model(name: str = "torchvision/resnet18", labels=LABELS, size: int = 64, weights=None, steps: int = 4,
               keep_normalization: bool = False):
    """A ZooModel whose head took a few SGD steps on random data (backbone frozen), fed `size` px
    images (its normalization keeps the plugin's mean/std; resize = size + 8)."""
    import torch
    import torch.nn.functional as F

    from zoo.model import build_model

    torch.manual_seed(0)
    model = build_model(name, list(labels), weights=weights)
    if not keep_normalization:
        norm = dataclasses.replace(model.meta.normalization, input_size=(3, size, size), resize_size=size + 8)
        model.meta = dataclasses.replace(model.meta, normalization=norm)
    c, h, w = model.meta.normalization.input_size
    model.backbone.requires_grad_(False)
    model.eval()
    opt = torch.optim.SGD(model.head.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, c, h, w, generator=g)
    y = torch.arange(6) % len(labels)
    with torch.no_grad():
        feats = model.backbone(x)
    for _ in range(steps):
        loss = F.cross_entropy(model.head(feats), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.head.eval()
    return model


def write_images(root: Path, labels=LABELS, per_class: int = 2, size: tuple[int, int] = (90, 70)) -> list[Path]:
    """Small image files in class-named folders: JPEG, PNG, a grayscale and an RGBA one."""
    from PIL import Image

    rng = np.random.default_rng(7)
    paths = []
    for ci, label in enumerate(labels):
        d = root / label
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.linspace(0, 255, size[0] * size[1] * 3).reshape(size[1], size[0], 3)
            arr = np.clip(base * (0.3 + 0.3 * ci) + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
            img = Image.fromarray(arr)
            if i % 4 == 2:
                img = img.convert("L")
            elif i % 4 == 3:
                img = img.convert("RGBA")
            suffix = ".jpg" if i % 2 == 0 and img.mode != "RGBA" else ".png"
            p = d / f"{label}_{i}{suffix}"
            img.save(p)
            paths.append(p)
    return sorted(paths)


def eager_probabilities(model, paths) -> np.ndarray:
    """What eager PyTorch says about image files, through the reference preprocessing."""
    import torch

    from zoo.preprocess import preprocess_files

    x = torch.from_numpy(preprocess_files([str(p) for p in paths], model.meta.normalization))
    with torch.inference_mode():
        return torch.softmax(model(x), -1).numpy()


def onnx_initializer_perturbed(src: Path, dst: Path, scale: float = 0.5) -> str:
    """Copy an ONNX file with its largest float weight initializer perturbed; returns its name."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(src))
    candidates = [t for t in proto.graph.initializer
                  if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2]
    target = max(candidates, key=lambda t: int(np.prod(t.dims)))
    arr = numpy_helper.to_array(target).copy()
    rng = np.random.default_rng(0)
    arr += scale * (np.abs(arr).mean() + 1e-3) * rng.standard_normal(arr.shape).astype(np.float32)
    target.CopyFrom(numpy_helper.from_array(arr, target.name))
    onnx.save(proto, str(dst))
    return target.name


# -- the helpers' own checks ------------------------------------------------------------------------
def test_tiny_model_head_was_trained_and_backbone_frozen():
    import torch

    from zoo.model import build_model

    torch.manual_seed(0)
    fresh = build_model("torchvision/resnet18", list(LABELS), weights=None)
    model = tiny_model("torchvision/resnet18", size=32, steps=3)
    assert model.meta.normalization.input_size == (3, 32, 32)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    # same seed, same init: only the head moved
    assert torch.equal(fresh.backbone.conv1.weight, model.backbone.conv1.weight)
    assert not torch.equal(fresh.head[-1].weight, model.head[-1].weight)


def test_write_images_gives_decodable_files_in_class_folders(tmp_path):
    from zoo.preprocess import load_image

    paths = write_images(tmp_path, per_class=4)
    assert len(paths) == 12
    assert {p.parent.name for p in paths} == set(LABELS)
    assert {p.suffix for p in paths} == {".jpg", ".png"}
    assert all(load_image(p).mode == "RGB" for p in paths)


@pytest.mark.parametrize("images", [None, "dir", "array"])
def test_validation_images_resolve(tmp_path, images):
    from zoo.records import Normalization
    from zoo.validation import load_validation_images

    norm = Normalization((0.5,) * 3, (0.25,) * 3, (3, 48, 40), 52)
    if images == "dir":
        write_images(tmp_path)
        v = load_validation_images(tmp_path, norm, LABELS)
        assert v.targets == [0, 0, 1, 1, 2, 2]
    elif images == "array":
        v = load_validation_images(np.zeros((5, 48, 40, 3), np.uint8), norm)
    else:
        v = load_validation_images(None, norm)
        assert len(v.names) == 8  # scikit-image photos (when installed) + synthetic ones
        assert len({a.tobytes() for a in v.pixels}) == 8  # all different
    assert v.pixels.dtype == np.uint8 and v.pixels.shape[1:] == (48, 40, 3)
