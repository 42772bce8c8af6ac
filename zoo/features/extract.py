"""Extraction: extract_into / extract (one pass of a backbone over samples, through the chosen
engine) and cached_features (the trainer's entry: cache lookup, extraction of the misses streamed
into shards, gather over ranks).
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from .. import distributed as D
from ..data import Samples, normalize_batch, sample_seed
from ..digest import state_digest
from ..errors import ZooError
from ..records import Normalization
from . import cache as C
from .cache import CacheStats, FeatureCache, ReadableSet, cache_root
from .decode import (
    DecodePool,
    DeviceJpegDecoder,
    _has_device_decoder,
    bound_heap_growth,
    default_workers,
)
from .engines import NonFiniteFeatures


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False, dynamic_ncols=True)


_SELECTIONS: dict = {}  # (id(backbone), ...) -> Selection: train and val extraction share one choice


def _engine_for(backbone, x, device, engine: str, allow_reduced: bool, total: int, cache_dir, batch_size: int,
                say):
    from . import engines as E

    key = (id(backbone), str(device), batch_size, engine, allow_reduced)
    sel = _SELECTIONS.get(key)
    if sel is not None and sel[0]() is backbone:
        return sel[1], False
    import weakref

    choice_key = f"{E.machine_id(device)}|{state_digest(backbone)[:16]}|{type(backbone).__qualname__}|" \
                 f"b{batch_size}|{tuple(x.shape[1:])}|{'reduced' if allow_reduced else 'fp32'}"
    s = E.select(engine, backbone, x, device, allow_reduced=allow_reduced, total=total,
                 cache_root=None if cache_dir is False else cache_root(cache_dir), choice_key=choice_key, say=say,
                 may_probe=D.context().is_main)
    _SELECTIONS.clear()
    _SELECTIONS[key] = (weakref.ref(backbone), s)
    return s, True


class NonFiniteFeaturesError(ZooError):
    """The backbone gave NaN/inf features for some images: nothing of them was cached."""


def _non_finite(backbone: str, engine: str, samples: Samples, keys: Sequence, rows: Sequence[int]):
    files = [samples.describe(k[0] if isinstance(k, tuple) else int(k)) for k in (keys[r] for r in rows)]
    shown = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
    return NonFiniteFeaturesError(
        f"backbone {backbone} (engine {engine}) gave NaN/inf features for {len(files)} image(s): {shown}; nothing "
        "of them was cached. Check those files (remove or re-save them) and the backbone's weights "
        "(--weights default), then run again")


def engine_numerics(engine: str, device: torch.device, allow_reduced: bool) -> str:
    """The numerics an extraction will have, known before any image is read (for the cache key):
    `auto` chooses among fp32 engines unless reduced precision is allowed (--amp bf16, or CUDA's
    default autocast) and native bf16 exists, then it uses bf16."""
    from . import engines as E

    if engine == "auto":
        return "bf16" if allow_reduced and E.bf16_supported(device) else "fp32"
    return E.numerics_of(engine)


def extract_into(backbone: nn.Module, samples: Samples, keys: Sequence, transform, norm: Normalization,
                 device: torch.device, out, positions: Sequence[int], *, batch_size: int = 64,
                 num_workers: int = 0, engine: str = "auto", allow_reduced: bool = False, total: int | None = None,
                 cache_dir=None, on_batch=None, progress: bool = False, desc: str = "features",
                 draft_target: int | None = None, device_decode: bool = False, say=None,
                 pool: DecodePool | None = None, name: str | None = None):
    """Extract keys[j] into out[positions[j]] (out: a (rows, D) tensor, or a callable(D) -> tensor
    allocating it once D is known); on_batch(js, feats) sees every batch (for streaming shards).
    pool: the run's DecodePool (its workers, persistent); None: one for this call (num_workers).
    name: the backbone's name, for errors. A batch with NaN/inf features raises NonFiniteFeaturesError
    naming the files (earlier batches' rows stay valid; the bad batch reaches neither out nor on_batch)
    Returns (out, engine Selection or None)."""
    keys = list(keys)
    if not keys:
        return out, None
    if pool is None:
        with DecodePool([(samples, transform)], device, num_workers) as pool:
            return extract_into(backbone, samples, keys, transform, norm, device, out, positions,
                                batch_size=batch_size, engine=engine, allow_reduced=allow_reduced, total=total,
                                cache_dir=cache_dir, on_batch=on_batch, progress=progress, desc=desc,
                                draft_target=draft_target, device_decode=device_decode, say=say, pool=pool,
                                name=name)
    bound_heap_growth()
    backbone.eval()
    kind = "bytes" if device_decode else ("draft", int(draft_target)) if draft_target else "plain"
    batches, loader = pool.batches(samples, transform, keys, batch_size, kind)
    if device_decode:
        decoder = DeviceJpegDecoder(samples, transform, norm, device)
        loader = map(decoder, loader)
    sel = None
    with _progress(len(keys), desc, progress) as bar:
        for js, (images, _, _) in zip(batches, loader):
            x = normalize_batch(images, norm, device, channels_last=False)
            fresh = False
            if sel is None:
                try:
                    sel, fresh = _engine_for(backbone, x, device, engine, allow_reduced, total or len(keys),
                                             cache_dir, batch_size, say)
                except NonFiniteFeatures as exc:  # in the eager reference rows of the first batch
                    raise _non_finite(name or type(backbone).__name__, exc.engine, samples,
                                      [keys[j] for j in js], exc.rows) from None
            if fresh:
                f = sel.features  # the check batch, already computed by the chosen engine
            else:
                with torch.inference_mode():
                    f = sel.engine.run(x).float().cpu()
            if not bool(torch.isfinite(f).all()):  # never into the cache, never into a head
                raise _non_finite(name or type(backbone).__name__, sel.engine.name, samples,
                                  [keys[j] for j in js], torch.nonzero(~torch.isfinite(f).all(1)).flatten().tolist())
            if callable(out):
                out = out(f.shape[1])
            out[torch.as_tensor([positions[j] for j in js])] = f
            if on_batch is not None:
                on_batch(js, f)
            bar.update(len(images))
    return out, sel


def extract(backbone: nn.Module, samples: Samples, keys: Sequence, transform, norm: Normalization,
            device: torch.device, batch_size: int = 64, num_workers: int = 0, engine: str = "eager",
            progress: bool = False, desc: str = "features", **kw) -> torch.Tensor:
    """Features (len(keys), D) float32 on CPU, in RAM. keys: dataset keys (index, or (index, seed))."""
    keys = list(keys)
    if not keys:
        return torch.empty(0)
    out, _ = extract_into(backbone, samples, keys, transform, norm, device, lambda d: torch.empty((len(keys), d)),
                          range(len(keys)), batch_size=batch_size, num_workers=num_workers, engine=engine,
                          progress=progress, desc=desc, **kw)
    return out


def _memmapped(shape: tuple[int, ...], where: Path | None) -> torch.Tensor:
    """A zero-filled float32 tensor backed by an unlinked temporary file (the page cache holds it,
    not the heap): training on it reads features memory-mapped."""
    if where is not None:
        where.mkdir(parents=True, exist_ok=True)
    f = tempfile.TemporaryFile(dir=where, prefix="zoo-features-")
    nbytes = int(np.prod(shape)) * 4
    if nbytes == 0:
        return torch.empty(shape)
    f.truncate(nbytes)
    m = np.memmap(f, dtype=np.float32, mode="r+", shape=shape)
    f.close()  # the mapping keeps the (unlinked) file alive
    return torch.from_numpy(m)


@contextlib.contextmanager
def _rng_untouched():
    """Extraction must not move the global RNG (a DataLoader draws its base seed from it): the head
    trains the same whether features were extracted (cold) or read from the cache (warm)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        yield


def cached_features(backbone: nn.Module, samples: Samples, transform, norm: Normalization, *,
                    key_fields: dict, device: torch.device, views: Sequence[int | None] = (None,),
                    view_seed: int = 0, cache: bool = True, cache_dir=None, batch_size: int = 64,
                    num_workers: int | None = None, engine: str = "auto", allow_reduced: bool = False,
                    amp_dtype=None, channels_last: bool = True, jpeg_draft: bool = False, gpu_decode: bool = False,
                    progress: bool = False, desc: str = "features",
                    pool: DecodePool | None = None) -> tuple[torch.Tensor, CacheStats]:
    """(len(views), N, D) features, from the cache where possible; extraction sharded over ranks.

    views: None = the deterministic (eval) transform; an int v = augmented view v, seeded by
    (view_seed, v, image content) so it is the same whoever computes it. gpu_decode: JPEGs of the eval
    view decoded in batches by torchvision on a CUDA device (DeviceJpegDecoder); elsewhere the CPU
    path is used and said so ("any": torchvision's decoder on whatever device, for tests). engine: zoo.features.engines name
    or "auto" (amp_dtype not None also allows reduced precision). The cache key gets the engine's
    numerics and the decoding; key_fields' own "precision" is replaced by them. pool: the run's
    DecodePool, whose workers also serve its other passes; None: one for this call (num_workers,
    default_workers when None), closed at the end.
    """
    with _rng_untouched(), contextlib.ExitStack() as stack:
        if pool is None:
            workers = default_workers(samples, device) if num_workers is None else num_workers
            pool = stack.enter_context(DecodePool([(samples, transform)], device, workers))
        return _cached_features(backbone, samples, transform, norm, key_fields, device, list(views), view_seed,
                                cache, cache_dir, batch_size, pool, engine,
                                allow_reduced or amp_dtype is not None, jpeg_draft, gpu_decode, progress, desc)


def _cached_features(backbone, samples, transform, norm, key_fields, device, views, view_seed, cache, cache_dir,
                     batch_size, pool, engine, allow_reduced, jpeg_draft, gpu_decode, progress, desc):
    t0 = time.perf_counter()
    ctx = D.context()
    n = len(samples)
    numerics = engine_numerics(engine, device, allow_reduced)
    # auto with reduced precision allowed is the bf16 engine; otherwise auto picks among fp32 engines
    asked = "bf16" if engine == "auto" and numerics == "bf16" else engine
    draft_target = int(norm.resize_size) if jpeg_draft else None
    device_decode = bool(gpu_decode) and (device.type == "cuda" or gpu_decode == "any") and _has_device_decoder()
    if gpu_decode and not device_decode and progress and ctx.is_main:
        print(f"gpu decode: not available on {device} (torchvision.io.decode_jpeg on CUDA); decoding on the CPU",
              file=sys.stderr)
    key = {k: v for k, v in key_fields.items() if k != "precision"} | {"numerics": numerics}
    if device_decode:
        key["decode"], draft_target = DeviceJpegDecoder.KEY, None
    elif draft_target:
        key["decode"] = "jpeg-draft-2x"
    fc = FeatureCache(cache_root(cache_dir), key) if cache else None
    mine = D.shard_indices(n, ctx)
    single = not ctx.enabled
    stats = CacheStats()
    say = (lambda msg: print(msg, file=sys.stderr)) if progress and ctx.is_main else (lambda msg: None)
    readable = ReadableSet(cache_root(cache_dir)) if cache else None

    # 1. Where each row comes from: the cache (one index read) or extraction.
    plan = []
    for v in views:
        names = [samples.content_hash(int(i)) if v is None else f"{samples.content_hash(int(i))}.v{v}" for i in mine]
        where = fc.locate(names) if fc is not None else [None] * len(names)
        plan.append((v, names, where))
    missing_total = sum(w is None for _, _, where in plan for w in where)

    # 2. The output: (views, rows, D), memory-mapped when this process holds all rows.
    dim = fc.dim() if fc is not None and missing_total < len(views) * len(mine) else None
    shape_rows = n if single else len(mine)
    out: torch.Tensor | None = None

    def allocate(d: int) -> torch.Tensor:
        nonlocal out
        if out is None:
            out = (_memmapped((len(views), shape_rows, d), fc.dir.parent.parent / "tmp" if fc else None)
                   if single else torch.empty((len(views), shape_rows, d)))
        return out

    if dim is not None:
        allocate(dim)

    # 3. Extract the misses, streaming shards to disk as they fill.
    sel = None
    for vi, (v, names, where) in enumerate(plan):
        miss = [j for j, w in enumerate(where) if w is None]
        stats.misses += len(miss)
        stats.hits += len(where) - len(miss)
        if miss:
            buf_names: list[str] = []
            buf: list[torch.Tensor] = []

            def flush():
                if fc is not None and buf_names:
                    fc.write_shard(buf_names, torch.cat(buf))
                if readable is not None and v is None:
                    readable.add(nm for nm in buf_names)
                buf_names.clear()
                buf.clear()

            def on_batch(js, f, miss=miss, names=names):
                buf_names.extend(names[miss[j]] for j in js)
                buf.append(f)
                if len(buf_names) >= C.SHARD_ROWS:
                    flush()

            def key_of(i: int, v=v):
                return int(i) if v is None else (int(i), sample_seed(view_seed, v, samples.content_hash(int(i))))

            te = time.perf_counter()
            target = (lambda d, vi=vi: allocate(d)[vi]) if out is None else out[vi]
            _, s = extract_into(backbone, samples, [key_of(mine[j]) for j in miss], transform, norm, device,
                                target, miss, batch_size=batch_size, pool=pool, engine=asked,
                                allow_reduced=False, total=missing_total,
                                cache_dir=cache_dir if cache else False,  # False: write nothing (no choice memo)
                                on_batch=on_batch, progress=progress and ctx.is_main,
                                desc=desc if v is None else f"{desc} (view {v})", draft_target=draft_target,
                                device_decode=device_decode and v is None, say=say,
                                name=key_fields.get("backbone"))
            flush()
            stats.extract_seconds += time.perf_counter() - te
            sel = sel or s
        hits = [j for j, w in enumerate(where) if w is not None]
        if hits:
            fc.read_into(out[vi], hits, [where[j] for j in hits])
    if out is None:  # nothing at all (no rows on this rank)
        out = torch.empty((len(views), shape_rows, 0))

    # 4. Every rank gets every row.
    if not single:
        dims = [d for d in D.all_gather_object(out.shape[2]) if d]
        if dims and out.shape[2] != dims[0]:
            out = torch.empty((len(views), len(mine), dims[0]))
        out = torch.stack([D.gather_rows(out[vi], mine, n) for vi in range(len(views))])
        counts = D.all_gather_object((stats.hits, stats.misses))
        stats.hits, stats.misses = sum(h for h, _ in counts), sum(m for _, m in counts)
    if sel is not None:
        stats.engine = {"name": sel.engine.name, "numerics": sel.engine.numerics, "how": sel.how,
                        "check_cosine_min": round(sel.cosine_min, 7), "note": sel.engine.note,
                        "rejected": dict(sel.rejected)}
        stats._selection = sel  # the check batch, for the head-predictions check
    else:
        stats.engine = {"name": None, "numerics": numerics, "how": "all cached"}
    if fc is not None:
        stats.damaged = list(fc.damaged)
    stats.seconds = time.perf_counter() - t0
    return out, stats


def head_predictions_agree(head: nn.Module, stats: CacheStats) -> tuple[int, int] | None:
    """(agreeing, total) predictions of `head` on the engine's check-batch features vs eager fp32
    ones; None when nothing was extracted in this process."""
    sel = getattr(stats, "_selection", None)
    if sel is None:
        return None
    p = next(head.parameters(), None)
    dev = p.device if p is not None else torch.device("cpu")
    was = head.training
    head.eval()
    with torch.inference_mode():
        a = head(sel.features[:len(sel.reference)].to(dev)).argmax(1)
        b = head(sel.reference.to(dev)).argmax(1)
    head.train(was)
    return int((a == b).sum()), len(a)
