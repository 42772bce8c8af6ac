#!/usr/bin/env python
"""Build the small Fashion-MNIST sample embedded in the package for the offline demo.

Reads the official Fashion-MNIST IDX files (gzip-compressed) directly with gzip +
numpy, takes a seeded, class-balanced subset -- ``--train-per-class`` images per
class from the official *train* split and ``--val-per-class`` per class from the
official *test* split (used as validation) -- and writes:

* ``--out`` (default ``zoo/assets/fashion_mnist_sample.npz``), a compressed npz
  holding uint8 ``train_images`` (N, 28, 28), ``train_labels`` (N,), ``val_images``,
  ``val_labels``, the unicode array ``classes`` (10 names), and
  ``train_source_indices`` / ``val_source_indices`` (uint16 positions of each
  image in its official split, for provenance);
* ``FASHION_MNIST_LICENSE.txt`` next to it: the dataset's COPYRIGHT file plus a
  note on which subset was taken and by which script.

Within each split the chosen images keep the order of the official file (which
is already class-mixed).  The npz is written with fixed zip timestamps, so the
same inputs and seed give a byte-identical file.

Usage (from the repository root)::

    python scripts/build_embedded_dataset.py                    # defaults below
    python scripts/build_embedded_dataset.py --source DIR --out zoo/assets/fashion_mnist_sample.npz
"""

from __future__ import annotations

import argparse
import gzip
import io
import pathlib
import sys
import zipfile

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO_ROOT / ".." / "shared" / "data" / "fashion-mnist"
DEFAULT_OUT = REPO_ROOT / "zoo" / "assets" / "fashion_mnist_sample.npz"
LICENSE_NAME = "FASHION_MNIST_LICENSE.txt"

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

_IDX_UBYTE = 0x08  # IDX data-type code for unsigned byte


def read_idx(path: pathlib.Path) -> np.ndarray:
    """Parse a (gzip-compressed) IDX file of unsigned bytes into an array.

    IDX header: two zero bytes, a data-type byte (0x08 = ubyte), the number of
    dimensions, then one big-endian uint32 per dimension; the data follows.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic {raw[:4].hex()})")
    if raw[2] != _IDX_UBYTE:
        raise ValueError(f"{path}: IDX data type 0x{raw[2]:02x}, expected unsigned byte")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise ValueError(f"{path}: {len(raw)} bytes, header {shape} implies {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def load_split(source: pathlib.Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_name, labels_name = FILES[split]
    images = read_idx(source / images_name)
    labels = read_idx(source / labels_name)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{split} images have shape {images.shape}, expected (N, 28, 28)")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{split}: {labels.shape[0]} labels for {images.shape[0]} images")
    if labels.max() >= len(CLASSES):
        raise ValueError(f"{split}: label {labels.max()} out of range")
    return images, labels


def balanced_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """``per_class`` distinct indices of each class, drawn with ``rng``, sorted."""
    chosen = []
    for c in range(len(CLASSES)):
        pool = np.flatnonzero(labels == c)
        if pool.size < per_class:
            raise ValueError(f"class {c} ({CLASSES[c]}) has only {pool.size} images, need {per_class}")
        chosen.append(rng.choice(pool, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def build(source: pathlib.Path, train_per_class: int, val_per_class: int, seed: int) -> dict[str, np.ndarray]:
    # One generator per split, derived from the seed, so changing one split's
    # size does not reshuffle the other.
    train_rng, val_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    train_x, train_y = load_split(source, "train")
    test_x, test_y = load_split(source, "test")
    ti = balanced_indices(train_y, train_per_class, train_rng)
    vi = balanced_indices(test_y, val_per_class, val_rng)
    return {
        "train_images": train_x[ti],
        "train_labels": train_y[ti],
        "val_images": test_x[vi],
        "val_labels": test_y[vi],
        "classes": np.array(CLASSES, dtype=np.str_),
        "train_source_indices": ti.astype(np.uint16),
        "val_source_indices": vi.astype(np.uint16),
    }


def write_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed`` but reproducible (fixed zip entry timestamps)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with zipfile.ZipFile(tmp, "w") as zf:
        for name, array in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    tmp.replace(path)


def license_text(source: pathlib.Path, out: pathlib.Path, train_per_class: int,
                 val_per_class: int, seed: int) -> str:
    copyright_file = source / "COPYRIGHT"
    if not copyright_file.is_file():
        raise FileNotFoundError(f"{copyright_file} is missing; refusing to ship the data without its license")
    n_train, n_val = train_per_class * len(CLASSES), val_per_class * len(CLASSES)
    return (
        "Fashion-MNIST sample embedded in backbone-zoo\n"
        "=============================================\n"
        "\n"
        f"{out.name} is a subset of Fashion-MNIST by Zalando Research\n"
        "(https://github.com/zalandoresearch/fashion-mnist), MIT (Expat) license,\n"
        "Copyright (c) 2017 Zalando SE. It contains "
        f"{n_train} training images ({train_per_class} per class,\n"
        f"from the official train split) and {n_val} validation images ({val_per_class} per class, from\n"
        f"the official test split), chosen at random with seed {seed} and kept at\n"
        "the original 28x28 uint8 resolution, unmodified. The subset was taken by\n"
        "scripts/build_embedded_dataset.py in the backbone-zoo repository; the\n"
        "position of each image in its official split is stored alongside it\n"
        "(train_source_indices, val_source_indices).\n"
        "\n"
        "The license of the source data follows (its COPYRIGHT file, verbatim).\n"
        "\n"
        "----------------------------------------------------------------------\n"
        + copyright_file.read_text(encoding="utf-8")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=pathlib.Path, default=DEFAULT_SOURCE,
                        help="folder with the Fashion-MNIST *-ubyte.gz files and COPYRIGHT "
                             "(default: ../shared/data/fashion-mnist from the repository root)")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT,
                        help=f"npz to write; {LICENSE_NAME} goes next to it "
                             "(default: zoo/assets/fashion_mnist_sample.npz)")
    parser.add_argument("--train-per-class", type=int, default=40)
    parser.add_argument("--val-per-class", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    source = args.source.resolve()
    out = args.out.resolve()
    if out.suffix != ".npz":
        parser.error("--out must name an .npz file")
    text = license_text(source, out, args.train_per_class, args.val_per_class, args.seed)
    arrays = build(source, args.train_per_class, args.val_per_class, args.seed)
    write_npz(out, arrays)
    (out.parent / LICENSE_NAME).write_text(text, encoding="utf-8")
    print(f"wrote {out} ({out.stat().st_size / 1024:.1f} KiB): "
          f"train {arrays['train_images'].shape}, val {arrays['val_images'].shape}; "
          f"license -> {out.parent / LICENSE_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
