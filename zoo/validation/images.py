"""Validation images: what every artifact is checked on (`load_validation_images`: given files,
folders or arrays; scikit-image's photos topped up with synthetic images by default) and, for
`--preprocess full`, the same images at their own sizes (`full_validation_images`).

numpy and Pillow only; no torch."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import DataError
from ..preprocess import list_images, load_image, resize_crop, to_uint8_hwc

NUM_DEFAULT_IMAGES = 8
MAX_IMAGES = 256
# scikit-image's bundled sample photos (RGB or gray; none needs a download)
SKIMAGE_SAMPLES = ("chelsea", "coffee", "astronaut", "rocket", "immunohistochemistry", "hubble_deep_field",
                   "colorwheel", "camera")


@dataclass
class ValidationImages:
    """Geometry-preprocessed uint8 (N, H, W, 3) images, their names, and labels when known;
    `raw`: the same images decoded at their own sizes (uint8 (H, W, 3) each), when asked for."""

    pixels: np.ndarray
    names: list[str]
    source: str
    targets: list[int | None]
    raw: list[np.ndarray] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"count": int(len(self.names)), "source": self.source, "names": self.names[:16],
                "labelled": sum(t is not None for t in self.targets)}


def synthetic_image(index: int, size: int = 256):
    """A deterministic, non-trivial RGB test image: gradients, rings and seeded noise."""
    from PIL import Image

    rng = np.random.default_rng(1000 + index)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cx, cy = rng.uniform(0.2, 0.8, 2)
    rings = 0.5 + 0.5 * np.sin(2 * math.pi * (3 + index) * np.hypot(xx - cx, yy - cy))
    noise = rng.normal(0.0, 0.08, (size, size, 3)).astype(np.float32)
    phase = rng.uniform(0, 2 * math.pi, 3).astype(np.float32)
    rgb = np.stack([0.5 + 0.5 * np.sin(2 * math.pi * (xx * (c + 1) + yy * (index % 3)) + phase[c]) for c in range(3)], -1)
    img = 0.55 * rgb + 0.35 * rings[..., None] + noise
    w = size * (3 + index % 3) // 4  # a few aspect ratios, so resize + crop is exercised
    arr = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(arr).resize((w, size))


def sample_photos(limit: int = NUM_DEFAULT_IMAGES) -> list[tuple[str, Any]]:
    """(name, PIL RGB image) for scikit-image's bundled photos; [] when scikit-image is absent."""
    try:
        import skimage.data as skdata
    except ImportError:
        return []
    from PIL import Image

    from ..preprocess import to_rgb

    out = []
    for name in SKIMAGE_SAMPLES[:limit]:
        try:
            arr = getattr(skdata, name)()
        except Exception:  # noqa: BLE001 - a sample that needs a download, or is gone
            continue
        out.append((f"skimage:{name}", to_rgb(Image.fromarray(np.asarray(arr, dtype=np.uint8)))))
    return out


def load_validation_images(images: Any, norm, labels: Sequence[str] = (), count: int = NUM_DEFAULT_IMAGES,
                           raw: bool = False) -> ValidationImages:
    """Resolve what the user passed into reference-preprocessed validation images.

    images: None (scikit-image's sample photos, topped up with deterministic synthetic images to
    `count`), a directory or image file, a list of image files, or a uint8 (N, H, W, 3) array
    already at the input size. Images in a folder named like a class label are labelled.
    raw=True also keeps the decoded images at their own sizes (`.raw`), for `--preprocess full`."""
    c, h, w = tuple(norm.input_size)
    if isinstance(images, np.ndarray):
        arr = np.asarray(images)
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1:] != (h, w, 3):
            raise DataError(f"validation images given as an array must be uint8 (N, {h}, {w}, 3), "
                            f"got {arr.dtype} {arr.shape}")
        return ValidationImages(arr, [f"array[{i}]" for i in range(len(arr))], "array", [None] * len(arr),
                                list(arr) if raw else None)
    if images is None:
        named = sample_photos(count)
        source = "scikit-image sample photos" if named else ""
        n_synth = max(0, count - len(named))
        named += [(f"synthetic:{i}", synthetic_image(i)) for i in range(n_synth)]
        source = " + ".join(s for s in (source, f"{n_synth} synthetic" if n_synth else "") if s)
        pixels = np.stack([to_uint8_hwc(resize_crop(img, norm)) for _, img in named])
        return ValidationImages(pixels, [n for n, _ in named], source, [None] * len(named),
                                [to_uint8_hwc(img) for _, img in named] if raw else None)
    paths: list[str] = []
    for item in ([images] if isinstance(images, (str, os.PathLike)) else list(images)):
        found = list_images(item)
        if not found and not os.path.exists(item):
            raise DataError(f"validation images: {os.fspath(item)!r} does not exist")
        paths.extend(found)
    if not paths:
        raise DataError(f"validation images: no image files found in {images!r}")
    if len(paths) > MAX_IMAGES:
        paths = paths[:: math.ceil(len(paths) / MAX_IMAGES)]
    index = {name: i for i, name in enumerate(labels)}
    if raw:  # decoded once, kept at their own sizes
        if len(paths) > MAX_FULL_IMAGES:  # each runs alone through the artifact
            paths = paths[:: math.ceil(len(paths) / MAX_FULL_IMAGES)]
        decoded = [load_image(p) for p in paths]
    pixels = np.stack([to_uint8_hwc(resize_crop(decoded[i] if raw else load_image(p), norm))
                       for i, p in enumerate(paths)])
    targets = [index.get(Path(p).parent.name) for p in paths]
    return ValidationImages(pixels, [str(p) for p in paths], f"{len(paths)} files", targets,
                            [to_uint8_hwc(img) for img in decoded] if raw else None)


# -- images at their own sizes, for --preprocess full ------------------------------------------------
class SizedImages(list):
    """uint8 (H, W, 3) images of different sizes (a list), with their names: what a `full`
    artifact's validate() receives; "synthetic:" names are not photos."""

    def __init__(self, images: Iterable[np.ndarray], names: Sequence[str]):
        super().__init__(images)
        self.names = list(names)


MAX_FULL_IMAGES = 64
# (height, width) of the synthetic images added for `full`: portrait and landscape at odd sizes,
# one smaller than a typical crop (the resize enlarges it), and a pair of one size (a batch of N > 1)
FULL_SYNTHETIC_SIZES = ((517, 301), (301, 517), (150, 200), (360, 480), (360, 480))


def full_validation_images(vimages: ValidationImages, norm) -> ValidationImages:
    """`vimages` (loaded with raw=True) plus synthetic images at FULL_SYNTHETIC_SIZES, with their
    reference-preprocessed pixels: what a `--preprocess full` artifact is validated on."""
    from PIL import Image

    raw = list(vimages.raw if vimages.raw is not None else vimages.pixels)
    names, targets = list(vimages.names), list(vimages.targets)
    for i, (h, w) in enumerate(FULL_SYNTHETIC_SIZES):
        img = synthetic_image(100 + i, size=max(h, w)).resize((w, h), Image.Resampling.BICUBIC)
        raw.append(to_uint8_hwc(img))
        names.append(f"synthetic:{h}x{w}#{i}")
        targets.append(None)
    pixels = np.stack([to_uint8_hwc(resize_crop(Image.fromarray(r), norm)) for r in raw])
    sizes = sorted({f"{r.shape[0]}x{r.shape[1]}" for r in raw})
    return ValidationImages(pixels, names, f"{vimages.source} at their own sizes + {len(FULL_SYNTHETIC_SIZES)} "
                                           f"synthetic ({len(sizes)} sizes)", targets, SizedImages(raw, names))

