"""Small data and weights for the trainer tests (tiny images, random-init ResNet-18 from a file)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLORS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}
BACKBONE = "torchvision/resnet18"


def make_image_folder(root: Path, per_class: int = 8, size: int = 40, seed: int = 0,
                      classes=("red", "green", "blue")) -> Path:
    """One subfolder per class; each image a noisy patch of the class colour on a random background
    (a task a random-init CNN's features separate easily)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    palette = list(COLORS.values())
    for k, c in enumerate(classes):
        color = np.array(COLORS.get(c, palette[k % len(palette)]))
        (root / c).mkdir(exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 256, (size, size, 3)).astype(np.float32) * 0.3
            s = rng.integers(size // 2, size)
            y, x = rng.integers(0, size - s + 1, 2)
            img[y:y + s, x:x + s] = color * rng.uniform(0.7, 1.2) + rng.normal(0, 15, (s, s, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / c / f"{c}_{i:03d}.png")
    return root


def random_weights_file(path: Path, seed: int = 0, name: str = BACKBONE) -> Path:
    """A random-init backbone saved as .safetensors, with non-trivial BN running stats, so
    'unchanged' is a real claim (and the weights id carries its digest)."""
    import torch

    from zoo.backbones import create_backbone
    from zoo.io import save_safetensors

    torch.manual_seed(seed)
    module, _ = create_backbone(name, weights=None)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    save_safetensors(module.state_dict(), path)
    return path


def state_of(module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def train_kwargs(tmp_path: Path, **kw) -> dict:
    # device="cpu": these numbers (and exact-equality checks) are the CPU's; on a GPU machine "auto"
    # would pick CUDA. The CUDA tests pass device="cuda" themselves.
    base = dict(image_size=32, epochs=3, batch_size=8, lr=3e-3, progress=False, num_workers=0, device="cpu",
                cache_dir=str(tmp_path / "cache"), val_split=0.25, seed=0)
    base.update(kw)
    return base
