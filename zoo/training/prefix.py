"""Partial fine-tuning without rerunning the frozen prefix.

With `--freeze N` and no augmentation, the first N layer groups are frozen and see the same image
every epoch: their output is the same every epoch. So the backbone is cut (torch.fx) after the last
node that reads a frozen parameter; the prefix runs once per image (eval mode, no autograd, as the
frozen layers run in the per-step path: their norm layers are locked in eval there too), its output
is stored in fp16, content-addressed on disk like the feature cache (key: the backbone state, the
cut, the transform, the image's sha256), and every epoch runs only the suffix and the head.

A backbone whose graph cannot be cut at one tensor (not traceable, a skip connection across the
cut, a stochastic layer in the prefix) keeps the per-step path, with the reason in the run's
record. The stored outputs are bounded by ZOO_PREFIX_CACHE_GB (default 8 GiB): a run whose
outputs would exceed it keeps the per-step path, and the warning says the size and the variable.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PREFIX_FORMAT = 1
DEFAULT_LIMIT_GB = 8.0


@dataclass(frozen=True)
class PrefixSplit:
    prefix: Any  # fx.GraphModule: image -> the last frozen group's output
    suffix: Any  # fx.GraphModule: that output -> features (shares the backbone's parameters)
    cut: str  # the node the graph is cut after


def split_backbone(backbone, frozen: set[str]) -> tuple[PrefixSplit | None, str | None]:
    """(the split, None) or (None, why it cannot be cut)."""
    import torch
    from torch import fx

    try:
        gm = fx.symbolic_trace(backbone)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: the per-step path
        return None, f"the backbone is not traceable by torch.fx ({type(exc).__name__})"
    nodes = list(gm.graph.nodes)
    modules = dict(gm.named_modules())

    def params_of(n) -> set[str]:
        if n.op == "call_module":
            return {f"{n.target}.{p}" for p, _ in modules[n.target].named_parameters()}
        if n.op == "get_attr":
            return {str(n.target)}
        return set()

    last = max((i for i, n in enumerate(nodes) if params_of(n) & frozen), default=None)
    if last is None:
        return None, "no frozen parameter is read"
    # The cut: the first point at or after the last frozen read where the graph passes through a
    # single tensor (a residual add after a block's last frozen layer joins the skip there).
    while True:
        prefix_nodes = nodes[:last + 1]
        inside = set(prefix_nodes)
        frontier = [n for n in prefix_nodes if any(u not in inside for u in n.users)]
        if len(frontier) == 1 or last + 1 >= len(nodes) or params_of(nodes[last + 1]) or \
                nodes[last + 1].op == "output":
            break
        last += 1
    if any(params_of(n) - frozen for n in prefix_nodes):
        return None, "a trainable parameter is read before the last frozen one"
    for n in prefix_nodes:
        if n.op == "call_module":
            m = modules[n.target]
            p = getattr(m, "p", None) if isinstance(m, torch.nn.modules.dropout._DropoutNd) else \
                getattr(m, "drop_prob", None)
            if p:
                return None, f"the frozen prefix holds a stochastic layer ({n.target}) that trains differently"
    if len(frontier) != 1 or frontier[0].op == "placeholder":
        return None, "the graph does not pass through one tensor after the frozen groups (a skip across the cut)"
    cut = frontier[0]
    g1 = fx.Graph()
    env: dict = {}
    for n in prefix_nodes:
        env[n] = g1.node_copy(n, lambda a: env[a])
    g1.output(env[cut])
    g2 = fx.Graph()
    env2: dict = {cut: g2.placeholder("x")}
    for n in nodes[last + 1:]:
        env2[n] = g2.node_copy(n, lambda a: env2[a])
    return PrefixSplit(fx.GraphModule(gm, g1), fx.GraphModule(gm, g2), cut.name), None


def suffix_model(suffix, head):
    """What each step runs: the backbone's suffix, then the head."""
    import torch

    class _Suffix(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.suffix, self.head = suffix, head

        def forward(self, x):
            return self.head(self.suffix(x))

    return _Suffix()


def limit_bytes() -> int:
    return int(float(os.environ.get("ZOO_PREFIX_CACHE_GB", DEFAULT_LIMIT_GB)) * (1 << 30))


def prefix_outputs(split: PrefixSplit, samples, transform, norm, *, key: dict, device, amp_dtype, channels_last: bool,
                   batch_size: int, workers: int, cache: bool, cache_dir, progress: bool, desc: str):
    """(N, C, H, W) fp16 CPU tensor of the prefix's outputs, read from the prefix cache where
    present; misses computed and written. Returns (outputs, {"hits", "misses"}), or raises
    PrefixTooLarge (the caller keeps the per-step path)."""
    import torch
    from safetensors.torch import load_file
    from torch.utils.data import DataLoader

    from ..data import ImageDataset, normalize_batch
    from ..features import cache_root
    from ..io import save_safetensors

    root = cache_root(cache_dir) / "prefix" / hashlib.sha256(
        json.dumps(key | {"format": PREFIX_FORMAT}, sort_keys=True, default=str).encode()).hexdigest()[:32]
    names = [samples.content_hash(i) for i in range(len(samples))]
    out: torch.Tensor | None = None
    hits = [i for i, h in enumerate(names) if cache and (root / f"{h}.safetensors").is_file()]
    miss = [i for i in range(len(samples)) if i not in set(hits)]

    def allocate(shape) -> torch.Tensor:
        nonlocal out
        if out is None:
            need = int(np.prod(shape)) * 2 * len(samples)
            if need > limit_bytes():
                raise PrefixTooLarge(need)
            out = torch.empty((len(samples), *shape), dtype=torch.float16)
        return out

    for i in hits:
        t = load_file(str(root / f"{names[i]}.safetensors"))["x"]
        allocate(tuple(t.shape))[i] = t
    if miss:
        split.prefix.eval()
        loader = DataLoader(ImageDataset(samples, transform), batch_sampler=[miss[j:j + batch_size]
                                                                             for j in range(0, len(miss), batch_size)],
                            num_workers=workers)
        if cache:
            root.mkdir(parents=True, exist_ok=True)
        done = 0
        for images, _, idx in loader:
            x = normalize_batch(images, norm, device, channels_last)
            with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                y = split.prefix(x).float()
            if not bool(torch.isfinite(y).all()):
                from ..errors import ZooError

                raise ZooError(f"the frozen prefix's output holds NaN/inf for {samples.describe(int(idx[0]))} "
                               "(or another image of its batch); check the weights and the data")
            y = y.to("cpu", torch.float16).contiguous()
            dest = allocate(tuple(y.shape[1:]))
            for r, i in enumerate(idx.tolist()):
                dest[i] = y[r]
                if cache:
                    save_safetensors({"x": y[r].clone()}, root / f"{names[i]}.safetensors")
            done += len(idx)
            if progress:
                print(f"\r{desc}: {done}/{len(miss)}", end="", file=sys.stderr)
        if progress:
            print(file=sys.stderr)
    assert out is not None
    return out, {"hits": len(hits), "misses": len(miss), "dir": str(root)}


class PrefixTooLarge(Exception):
    def __init__(self, need: int):
        super().__init__(need)
        self.need = need


def prefix_cache_dir(cache_dir) -> Path:
    from ..features import cache_root

    return cache_root(cache_dir) / "prefix"
