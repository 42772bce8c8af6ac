"""The small Fashion-MNIST sample shipped with the package, for the offline demo.

``zoo/assets/fashion_mnist_sample.npz`` holds 400 training images (40 per class,
from the official Fashion-MNIST train split) and 200 validation images (20 per
class, from the official test split), 28x28 uint8 grayscale, built by
``scripts/build_embedded_dataset.py``.  Fashion-MNIST is (c) 2017 Zalando SE,
MIT license; see ``zoo/assets/FASHION_MNIST_LICENSE.txt``.

Only numpy is needed here (no torch import), so the demo can inspect the data
before any deep-learning stack is loaded.
"""

from __future__ import annotations

import dataclasses
import importlib.resources

import numpy as np

ASSET_PACKAGE = "zoo.assets"
ASSET_NAME = "fashion_mnist_sample.npz"
LICENSE_NAME = "FASHION_MNIST_LICENSE.txt"


@dataclasses.dataclass(frozen=True)
class EmbeddedDataset:
    """Images are uint8 (N, 28, 28); labels uint8 (N,) indexing ``classes``."""

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int]:
        return tuple(self.train_images.shape[1:])


def load_embedded_dataset() -> EmbeddedDataset:
    """Load the embedded Fashion-MNIST sample (read-only arrays, no pickle)."""
    resource = importlib.resources.files(ASSET_PACKAGE).joinpath(ASSET_NAME)
    with resource.open("rb") as f, np.load(f, allow_pickle=False) as npz:
        arrays = {
            name: npz[name]
            for name in ("train_images", "train_labels", "val_images", "val_labels")
        }
        classes = tuple(str(c) for c in npz["classes"])
    for array in arrays.values():
        array.setflags(write=False)
    return EmbeddedDataset(classes=classes, **arrays)


def license_text() -> str:
    """The Fashion-MNIST license/provenance note shipped next to the data."""
    return importlib.resources.files(ASSET_PACKAGE).joinpath(LICENSE_NAME).read_text(encoding="utf-8")
