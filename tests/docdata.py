"""Small folders of real photos for the docs suite and the journey test: crops of scikit-image's
bundled pictures (scikit-image is a dependency), one class per picture."""

from __future__ import annotations

import shutil
from pathlib import Path


def _photos():
    """(class name, RGB uint8 array) of real photos bundled with scikit-image (a dependency)."""
    import numpy as np
    import skimage.data as skdata

    out = []
    for cls, name in (("cat", "chelsea"), ("coffee", "coffee"), ("rocket", "rocket"), ("astronaut", "astronaut")):
        out.append((cls, np.asarray(getattr(skdata, name)(), dtype=np.uint8)))
    return out


def _crops(arr, count: int, seed: int):
    """`count` different real images from one photo: random crops (60-95% of each side), flips and
    sizes, so a class has varied members and no two files are the same bytes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = arr.shape[:2]
    for _ in range(count):
        fh, fw = rng.uniform(0.6, 0.95, size=2)
        ch, cw = int(h * fh), int(w * fw)
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        img = Image.fromarray(arr[y:y + ch, x:x + cw])
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        side = int(rng.integers(120, 200))
        yield img.resize((side, int(side * ch / cw)), Image.Resampling.BILINEAR)


def make_doc_data(cwd: Path) -> None:
    """teapots/ (32 per class: enough that `zoo train`'s default holdout of 0.1 is used), holdout/ (4 per
    class), photos/ (one per class) and photo.jpg."""
    for k, (cls, arr) in enumerate(_photos()):
        for folder, count, seed in (("teapots", 32, 100 + k), ("holdout", 4, 200 + k)):
            d = cwd / folder / cls
            d.mkdir(parents=True, exist_ok=True)
            for n, img in enumerate(_crops(arr, count, seed)):
                img.save(d / f"{cls}_{n:02d}.jpg", quality=90)
        (cwd / "photos").mkdir(exist_ok=True)
        next(_crops(arr, 1, 300 + k)).save(cwd / "photos" / f"{cls}.jpg", quality=90)
    shutil.copy(cwd / "photos" / "cat.jpg", cwd / "photo.jpg")
