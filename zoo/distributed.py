"""torchrun / DistributedDataParallel support: rank info, sharding, collectives. gloo on CPU, nccl on CUDA.

The trainer splits every *global* batch (a seeded permutation shared by all ranks) into per-rank
slices and scales each rank's summed loss by world_size / global_batch_len. DDP averages gradients,
so each step uses exactly the gradient a single process would get on the whole global batch:
two processes train the same head as one, up to floating-point reduction order. Feature extraction
is sharded (rank r takes images r, r+world, ...) and the features all-gathered. Only rank 0 writes
the run directory; local rank 0 of each machine writes its feature cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def context() -> DistContext:
    dist = _dist()
    if dist is None:
        return DistContext()
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def init_from_env(device_type: str = "cpu") -> DistContext:
    """Join the process group torchrun describes (WORLD_SIZE > 1), once; else a single process."""
    import torch
    import torch.distributed as dist

    if _dist() is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return context()


def barrier() -> None:
    dist = _dist()
    if dist is not None:
        dist.barrier()


def all_reduce_sum(tensor):
    """In place on a CPU copy when the backend is gloo; returns the summed tensor."""
    dist = _dist()
    if dist is None:
        return tensor
    dist.all_reduce(tensor)
    return tensor


def all_gather_object(obj) -> list:
    dist = _dist()
    if dist is None:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    dist = _dist()
    if dist is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shard_indices(n: int, ctx: DistContext | None = None) -> np.ndarray:
    ctx = ctx or context()
    return np.arange(ctx.rank, n, ctx.world_size, dtype=np.int64)


def gather_rows(rows, indices: np.ndarray, n: int):
    """Every rank holds rows for `indices` (its shard); return the full (n, ...) tensor on all ranks."""
    import torch

    dist = _dist()
    if dist is None:
        full = torch.empty((n, *rows.shape[1:]), dtype=rows.dtype)
        full[torch.as_tensor(indices)] = rows
        return full
    parts = all_gather_object((np.asarray(indices), rows.cpu()))
    full = torch.empty((n, *rows.shape[1:]), dtype=rows.dtype)
    for idx, part in parts:
        full[torch.as_tensor(idx)] = part
    return full


def global_batches(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True) -> list[np.ndarray]:
    """The same list of global batches on every rank: a permutation seeded by (seed, epoch)."""
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def rank_slice(batch: np.ndarray, ctx: DistContext | None = None) -> np.ndarray:
    ctx = ctx or context()
    return batch[ctx.rank::ctx.world_size]
