"""The embedded Fashion-MNIST sample (zoo/assets/fashion_mnist_sample.npz)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
import pytest

from zoo.embedded import EmbeddedDataset, license_text, load_embedded_dataset

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "build_embedded_dataset.py"
ASSET = REPO_ROOT / "zoo" / "assets" / "fashion_mnist_sample.npz"
SOURCE = REPO_ROOT / ".." / "shared" / "data" / "fashion-mnist"

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


@pytest.fixture(scope="module")
def data() -> EmbeddedDataset:
    return load_embedded_dataset()


def test_shapes_and_dtypes(data):
    assert data.train_images.shape == (400, 28, 28)
    assert data.val_images.shape == (200, 28, 28)
    assert data.train_labels.shape == (400,) and data.val_labels.shape == (200,)
    for array in (data.train_images, data.train_labels, data.val_images, data.val_labels):
        assert array.dtype == np.uint8
    assert data.classes == CLASSES
    assert data.num_classes == 10 and data.image_shape == (28, 28)


def test_class_balance(data):
    assert np.bincount(data.train_labels, minlength=10).tolist() == [40] * 10
    assert np.bincount(data.val_labels, minlength=10).tolist() == [20] * 10


def test_images_are_real_and_distinct(data):
    for images in (data.train_images, data.val_images):
        assert images.max() > 200 and images.min() == 0
        flat = images.reshape(len(images), -1)
        assert len(np.unique(flat, axis=0)) == len(images)  # no duplicates
    # Mean intensity is close to Fashion-MNIST's (0.286 * 255 ~= 73).
    assert 55 < data.train_images.mean() < 90


def test_deterministic_and_read_only(data):
    again = load_embedded_dataset()
    for name in ("train_images", "train_labels", "val_images", "val_labels"):
        np.testing.assert_array_equal(getattr(data, name), getattr(again, name))
    assert again.classes == data.classes
    assert not data.train_images.flags.writeable


def test_license_shipped():
    text = license_text()
    assert "Zalando" in text and "Expat" in text
    assert "build_embedded_dataset.py" in text


def test_loader_does_not_import_torch():
    code = ("import sys, zoo; before = 'torch' in sys.modules\n"
            "from zoo.embedded import load_embedded_dataset; load_embedded_dataset()\n"
            "assert before or 'torch' not in sys.modules, 'zoo.embedded imported torch'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


@pytest.mark.skipif(not (SOURCE / "train-images-idx3-ubyte.gz").is_file(),
                    reason=f"Fashion-MNIST source files not found in {SOURCE}")
def test_build_script_reproduces_committed_asset(tmp_path):
    out = tmp_path / "sample.npz"
    subprocess.run([sys.executable, str(SCRIPT), "--source", str(SOURCE), "--out", str(out)],
                   check=True, capture_output=True)
    assert out.read_bytes() == ASSET.read_bytes()
    assert (tmp_path / "FASHION_MNIST_LICENSE.txt").is_file()
