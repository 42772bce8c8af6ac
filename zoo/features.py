"""Feature extraction and the on-disk feature cache.

With the backbone fully frozen and a deterministic transform, an image's features never change, so
the trainer extracts them once and trains the head on cached tensors. The cache lives under
``$ZOO_CACHE_DIR`` (default ``~/.cache/backbone-zoo``) in ``features/<model key>/``, where the model
key hashes everything that determines a feature vector except the image:

  backbone name, weights id, a digest of the backbone's actual state dict (so random init, local
  files and plugin changes are covered too), the preprocessing (normalization record and transform:
  eval, or the augmentation parameters and seed of a view), the compute precision, a format version.

Inside, shard files (safetensors) map ``<sha256 of the image bytes>[.v<view>]`` to a float32 vector,
so a second run with another head, or on a superset of the images, reuses what is there, and any
change to the key is a different directory (never a stale hit). Writes are atomic.
Extraction runs under ``torch.inference_mode``, batched, ``channels_last``, autocast when asked.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from . import distributed as D
from .data import ImageDataset, Samples, normalize_batch, sample_seed
from .io import save_safetensors, write_json
from .records import Normalization

FEATURE_FORMAT = 1


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("ZOO_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "backbone-zoo"


def state_digest(module: nn.Module) -> str:
    d = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        d.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        d.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return d.hexdigest()


def model_key(model, amp_dtype: torch.dtype | None = None) -> dict:
    """The model part of a feature-cache key (see the module docstring): what determines a
    feature vector apart from the image and its transform. The caller adds `transform` and
    `view_seed`; FeatureCache adds the format version."""
    return {"backbone": model.meta.backbone, "weights": model.meta.weights, "state": state_digest(model.backbone),
            "precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "float32"}


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    seconds: float = 0.0

    def add(self, other: "CacheStats") -> None:
        self.hits += other.hits
        self.misses += other.misses
        self.seconds += other.seconds


class FeatureCache:
    def __init__(self, root: str | os.PathLike, key_fields: dict):
        self.key_fields = dict(key_fields, feature_format=FEATURE_FORMAT)
        blob = json.dumps(self.key_fields, sort_keys=True, default=str).encode()
        self.key = hashlib.sha256(blob).hexdigest()[:32]
        self.dir = Path(root) / "features" / self.key

    def lookup(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        wanted, found = set(keys), {}
        if not self.dir.is_dir():
            return found
        for shard in sorted(self.dir.glob("*.safetensors")):
            try:
                with safe_open(str(shard), framework="pt") as f:
                    for k in wanted.intersection(f.keys()) - found.keys():
                        found[k] = f.get_tensor(k)
            except Exception:  # noqa: BLE001 - a damaged shard is a miss, not a crash
                continue
            if len(found) == len(wanted):
                break
        return found

    def store(self, items: dict[str, torch.Tensor]) -> None:
        if not items:
            return
        if not (self.dir / "key.json").exists():
            write_json(self.dir / "key.json", self.key_fields)
        name = hashlib.sha256("".join(sorted(items)).encode()).hexdigest()[:24]
        save_safetensors({k: v.float().contiguous() for k, v in items.items()}, self.dir / f"{name}.safetensors")


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False, dynamic_ncols=True)


@torch.inference_mode()
def extract(backbone: nn.Module, samples: Samples, keys: Sequence, transform, norm: Normalization,
            device: torch.device, batch_size: int = 64, num_workers: int = 0,
            amp_dtype: torch.dtype | None = None, channels_last: bool = True, progress: bool = False,
            desc: str = "features") -> torch.Tensor:
    """Features (len(keys), D) float32 on CPU. keys: dataset keys (index, or (index, seed))."""
    from torch.utils.data import DataLoader

    keys = list(keys)
    if not keys:
        return torch.empty(0)
    backbone.eval()
    if channels_last:
        backbone.to(memory_format=torch.channels_last)
    batches = [keys[i:i + batch_size] for i in range(0, len(keys), batch_size)]
    loader = DataLoader(ImageDataset(samples, transform), batch_sampler=batches, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    out = []
    with _progress(len(keys), desc, progress) as bar:
        for images, _, _ in loader:
            x = normalize_batch(images, norm, device, channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                f = backbone(x)
            out.append(f.float().flatten(1).cpu())
            bar.update(len(images))
    return torch.cat(out)


def cached_features(backbone: nn.Module, samples: Samples, transform, norm: Normalization, *,
                    key_fields: dict, device: torch.device, views: Sequence[int | None] = (None,),
                    view_seed: int = 0, cache: bool = True, cache_dir=None, batch_size: int = 64,
                    num_workers: int = 0, amp_dtype=None, channels_last: bool = True, progress: bool = False,
                    desc: str = "features") -> tuple[torch.Tensor, CacheStats]:
    """(len(views), N, D) features, from the cache where possible; extraction sharded over ranks.

    views: None = the deterministic (eval) transform; an int v = augmented view v, seeded by
    (view_seed, v, image content) so it is the same whoever computes it.
    """
    t0 = time.perf_counter()
    ctx = D.context()
    n = len(samples)
    fc = FeatureCache(cache_root(cache_dir), key_fields) if cache else None
    mine = D.shard_indices(n, ctx)
    stats = CacheStats()
    per_view = []
    for v in views:
        def name(i: int) -> str:
            h = samples.content_hash(int(i))
            return h if v is None else f"{h}.v{v}"

        def key(i: int):
            return int(i) if v is None else (int(i), sample_seed(view_seed, v, samples.content_hash(int(i))))

        names = [name(i) for i in mine] if fc is not None else []
        found = fc.lookup(names) if fc is not None else {}
        missing = [i for i, nm in zip(mine, names or [None] * len(mine)) if nm not in found] if fc else list(mine)
        new = extract(backbone, samples, [key(i) for i in missing], transform, norm, device, batch_size,
                      num_workers, amp_dtype, channels_last, progress and ctx.is_main,
                      desc if v is None else f"{desc} (view {v})")
        new_map = {int(i): new[j] for j, i in enumerate(missing)}
        dim = next(iter(found.values())).numel() if found else (new.shape[1] if len(missing) else 0)
        dims = [d for d in D.all_gather_object(dim) if d]
        dim = dims[0] if dims else 0
        rows = torch.empty((len(mine), dim))
        for j, i in enumerate(mine):
            rows[j] = new_map[int(i)] if int(i) in new_map else found[names[j]]
        full = D.gather_rows(rows, mine, n)
        stats.hits += len(mine) - len(missing)
        stats.misses += len(missing)
        if fc is not None:
            new_names = D.all_gather_object({name(i): new_map[int(i)] for i in missing})
            if ctx.is_local_main:
                fc.store({k: t for part in new_names for k, t in part.items()})
        per_view.append(full)
    hits = D.all_gather_object((stats.hits, stats.misses))
    stats.hits, stats.misses = sum(h for h, _ in hits), sum(m for _, m in hits)
    stats.seconds = time.perf_counter() - t0
    return torch.stack(per_view), stats
