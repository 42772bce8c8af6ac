"""Extraction: extract_into / extract (one pass of a backbone over samples, through the chosen
engine) and cached_features (the trainer's entry: cache lookup, extraction of the misses streamed
into shards, gather over ranks).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from .. import distributed as D
from ..data import HeldBytes, Samples, normalize_batch, sample_seed
from ..errors import DataError
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
from .engines import NonFiniteFeaturesError, choose, engine_numerics


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False, dynamic_ncols=True)


def _non_finite(backbone: str, engine: str, samples: Samples, keys: Sequence, rows: Sequence[int]):
    files = [samples.describe(k[0] if isinstance(k, tuple) else int(k)) for k in (keys[r] for r in rows)]
    shown = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
    return NonFiniteFeaturesError(engine, list(rows), files=files, message=
        f"backbone {backbone} (engine {engine}) gave NaN/inf features for {len(files)} image(s): {shown}; nothing "
        "of them was cached. Check those files (remove or re-save them) and the backbone's weights "
        "(--weights default), then run again")


def extract_into(backbone: nn.Module, samples: Samples, keys: Sequence, transform, norm: Normalization,
                 device: torch.device, out, positions: Sequence[int], *, batch_size: int = 64,
                 num_workers: int = 0, engine: str = "auto", allow_reduced: bool = False, total: int | None = None,
                 cache_dir=None, on_batch=None, progress: bool = False, desc: str = "features",
                 draft_target: int | None = None, device_decode: bool = False, say=None,
                 pool: DecodePool | None = None, name: str | None = None, hashes: Sequence[str] | None = None,
                 failed: list | None = None, decoded: list | None = None, data: Sequence[bytes | None] | None = None):
    """Extract keys[j] into out[positions[j]] (out: a (rows, D) tensor, or a callable(D) -> tensor
    allocating it once D is known); on_batch(js, feats) sees every batch (for streaming shards).
    pool: the run's DecodePool (its workers, persistent); None: one for this call (num_workers).
    name: the backbone's name, for errors. A batch with NaN/inf features raises NonFiniteFeaturesError
    naming the files (earlier batches' rows stay valid; the bad batch reaches neither out nor on_batch)
    hashes[j]: keys[j]'s planned content hash; its file is read once, checked against it and decoded
    from those bytes; data[j]: keys[j]'s bytes as read for that hash (then the file is not read
    again), None where not held. failed: collects (j, reason) for files that did not decode or changed since
    they were listed (their rows reach neither out nor on_batch); None: such a file raises DataError.
    decoded: collects (j, pixel count) of the files decoded here (the readable set's entries).
    Returns (out, the engine Chooser or None when nothing was extracted)."""
    keys = list(keys)
    if not keys:
        return out, None
    if pool is None:
        with DecodePool([(samples, transform)], device, num_workers) as pool:
            return extract_into(backbone, samples, keys, transform, norm, device, out, positions,
                                batch_size=batch_size, engine=engine, allow_reduced=allow_reduced, total=total,
                                cache_dir=cache_dir, on_batch=on_batch, progress=progress, desc=desc,
                                draft_target=draft_target, device_decode=device_decode, say=say, pool=pool,
                                name=name, hashes=hashes, failed=failed, decoded=decoded, data=data)
    bound_heap_growth()
    backbone.eval()
    kind = "bytes" if device_decode else ("draft", int(draft_target)) if draft_target else "plain"
    batches, loader = pool.batches(samples, transform, keys, batch_size, kind, hashes, data)
    if device_decode:
        decoder = DeviceJpegDecoder(samples, transform, norm, device)
        loader = map(decoder, loader)
    chooser = None
    with _progress(len(keys), desc, progress) as bar:
        for js, batch in zip(batches, loader):
            images, reasons, pixels = (batch[0], batch[3], batch[4]) if len(batch) == 5 else batch
            bad = [r for r, why in enumerate(reasons) if why]
            if bad:
                if failed is None:
                    raise DataError("; ".join(f"{samples.describe(_index(keys[js[r]]))}: {reasons[r]}" for r in bad)
                                    + ": remove or fix the file(s), then run again")
                failed.extend((js[r], reasons[r]) for r in bad)
            if decoded is not None:
                decoded.extend((j, int(px)) for j, px, why in zip(js, pixels, reasons) if not why and int(px))
            x = normalize_batch(images, norm, device, channels_last=False)
            if chooser is None:
                chooser = choose(backbone, device, engine, allow_reduced=allow_reduced, total=total or len(keys),
                                 cache_root=None if cache_dir is False else cache_root(cache_dir),
                                 batch_size=batch_size, input_shape=tuple(x.shape[1:]), say=say,
                                 may_probe=D.context().is_main)
            try:
                f = chooser.run(x)  # while auto is probing, a candidate's timed batches are real output
            except NonFiniteFeaturesError as exc:  # in the eager reference rows of the first batch
                if exc.files is not None:
                    raise
                raise _non_finite(name or type(backbone).__name__, exc.engine, samples,
                                  [keys[j] for j in js], exc.rows) from None
            if bad:  # the rows of files that failed reach neither the output nor the cache
                keep = [r for r in range(len(js)) if not reasons[r]]
                js, f = [js[r] for r in keep], f[keep]
                if not js:
                    bar.update(len(images))
                    continue
            if not bool(torch.isfinite(f).all()):  # never into the cache, never into a head
                raise _non_finite(name or type(backbone).__name__, chooser.engine_name, samples,
                                  [keys[j] for j in js], torch.nonzero(~torch.isfinite(f).all(1)).flatten().tolist())
            if callable(out):
                out = out(f.shape[1])
            out[torch.as_tensor([positions[j] for j in js])] = f
            if on_batch is not None:
                on_batch(js, f)
            bar.update(len(images))
    return out, chooser


def _index(key) -> int:
    return int(key[0]) if isinstance(key, tuple) else int(key)


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


@dataclass
class _Job:
    """What one cached_features call works with, decided up front (before any image is read)."""

    samples: Samples
    held: HeldBytes  # the files' bytes as read for their content hash, until decoded or found cached
    views: list
    fc: FeatureCache | None
    readable: ReadableSet | None
    mine: list  # this rank's sample indices
    single: bool  # one process holds every row
    numerics: str
    asked: str  # the engine asked of extraction ("auto" with reduced precision allowed -> "bf16")
    draft_target: int | None
    device_decode: bool


def _cached_features(backbone, samples, transform, norm, key_fields, device, views, view_seed, cache, cache_dir,
                     batch_size, pool, engine, allow_reduced, jpeg_draft, gpu_decode, progress, desc):
    """plan -> allocate -> extract the misses -> gather; see cached_features."""
    t0 = time.perf_counter()
    ctx = D.context()
    stats = CacheStats()
    job = _job(samples, views, key_fields, device, cache, cache_dir, engine, allow_reduced, norm, jpeg_draft,
               gpu_decode, progress and ctx.is_main, ctx)
    plan = _plan(job, stats)
    try:
        out = _Out(job, _known_dim(job, plan))
        sel = _extract_misses(job, plan, out, stats, backbone, transform, norm, device, view_seed, cache_dir if cache
                              else False, batch_size, pool, progress and ctx.is_main, desc, key_fields.get("backbone"))
    finally:  # whatever was not decoded (a failure, another rank's rows) is not held past the job
        job.held.drop(nm.split(".v")[0] for p in plan[:1] for nm in p.names if nm is not None)
    feats = _gather(job, plan, out, stats)
    _finish_stats(stats, sel, job)
    stats.seconds = time.perf_counter() - t0
    return feats, stats


def _job(samples, views, key_fields, device, cache, cache_dir, engine, allow_reduced, norm, jpeg_draft, gpu_decode,
         loud, ctx) -> _Job:
    numerics = engine_numerics(engine, device, allow_reduced)
    draft_target = int(norm.resize_size) if jpeg_draft else None
    device_decode = bool(gpu_decode) and (device.type == "cuda" or gpu_decode == "any") and _has_device_decoder()
    if gpu_decode and not device_decode and loud:
        print(f"gpu decode: not available on {device} (torchvision.io.decode_jpeg on CUDA); decoding on the CPU",
              file=sys.stderr)
    key = {k: v for k, v in key_fields.items() if k != "precision"} | {"numerics": numerics}
    if device_decode:
        key["decode"], draft_target = DeviceJpegDecoder.KEY, None
    elif draft_target:
        key["decode"] = "jpeg-draft-2x"
    root = cache_root(cache_dir)
    # The bytes read for a content hash are kept for the decode: one read per image (a run's
    # load_data has hashed them already with its own store; hashing here fills this one).
    return _Job(samples, samples.hold_bytes(), list(views), FeatureCache(root, key) if cache else None, ReadableSet(root) if cache else None,
                list(D.shard_indices(len(samples), ctx)), not ctx.enabled, numerics,
                "bf16" if engine == "auto" and numerics == "bf16" else engine, draft_target, device_decode)


@dataclass
class _ViewPlan:
    view: int | None
    names: list  # row names: content hash [+ ".v<view>"]; None for a file that cannot be hashed
    where: list  # (shard, row) of a cached row, None for a miss


def _plan(job: _Job, stats: CacheStats) -> list[_ViewPlan]:
    """Where each row comes from: the cache (one index read) or extraction. A file that vanished
    since it was listed cannot be hashed: it is a failure of this run (stats.unreadable), not a crash.
    The bytes of a file whose rows are all cached are let go here (a warm run decodes nothing)."""
    hashes: list[str | None] = []
    for i in job.mine:
        try:
            hashes.append(job.samples.content_hash(int(i)))
        except OSError as exc:
            hashes.append(None)
            why = "file not found (deleted after the run listed it)" if isinstance(exc, FileNotFoundError) else \
                f"cannot read ({type(exc).__name__}: {exc.strerror or exc})"
            stats.unreadable.append((job.samples.describe(int(i)), why))
    plan = []
    for v in job.views:
        names = [h if v is None or h is None else f"{h}.v{v}" for h in hashes]
        known = [nm for nm in names if nm is not None]
        found = iter(job.fc.locate(known) if job.fc is not None else [None] * len(known))
        plan.append(_ViewPlan(v, names, [next(found) if nm is not None else None for nm in names]))
    job.held.drop(h for j, h in enumerate(hashes) if h is not None and all(p.where[j] is not None for p in plan))
    return plan


def _known_dim(job: _Job, plan: list[_ViewPlan]) -> int | None:
    any_hit = any(w is not None for p in plan for w in p.where)
    return job.fc.dim() if job.fc is not None and any_hit else None


class _Out:
    """The output (views, rows, D), allocated once D is known: from the cache's shards, or from the
    first extracted batch. Memory-mapped when this process holds all rows."""

    def __init__(self, job: _Job, dim: int | None):
        self.job = job
        self.rows = len(job.samples) if job.single else len(job.mine)
        self.tensor: torch.Tensor | None = None
        if dim is not None:
            self.allocate(dim)

    def allocate(self, d: int) -> torch.Tensor:
        if self.tensor is None:
            job = self.job
            shape = (len(job.views), self.rows, d)
            self.tensor = (_memmapped(shape, job.fc.dir.parent.parent / "tmp" if job.fc else None) if job.single
                           else torch.empty(shape))
        return self.tensor

    def view(self, vi: int):
        return self.tensor[vi] if self.tensor is not None else (lambda d: self.allocate(d)[vi])


def _extract_misses(job: _Job, plan: list[_ViewPlan], out: _Out, stats: CacheStats, backbone, transform, norm,
                    device, view_seed, choice_root, batch_size, pool, loud, desc, name):
    """Extract every miss of every view, streaming shards to disk as they fill; the extraction's
    decode is the verification (files that fail or changed go to stats.unreadable)."""
    samples, fc = job.samples, job.fc
    missing_total = sum(w is None and nm is not None for p in plan for nm, w in zip(p.names, p.where))
    say = (lambda msg: print(msg, file=sys.stderr)) if loud else (lambda msg: None)
    failed_once: set[int] = set()
    sel = None
    for vi, p in enumerate(plan):
        miss = [j for j, (nm, w) in enumerate(zip(p.names, p.where)) if w is None and nm is not None
                and j not in failed_once]
        stats.misses += len(miss)
        stats.hits += sum(w is not None for w in p.where)
        if not miss:
            continue
        shard = _ShardWriter(fc)
        hashes = [p.names[j].split(".v")[0] for j in miss]
        # the held bytes go with the keys (let go after the last view that decodes the file)
        data = [job.held.get(h) for h in hashes]
        stats.reread += sum(d is None and isinstance(samples.items[int(job.mine[j])], (str, os.PathLike))
                            for d, j in zip(data, miss))
        keys = [int(job.mine[j]) if p.view is None else
                (int(job.mine[j]), sample_seed(view_seed, p.view, hashes[k])) for k, j in enumerate(miss)]
        failed: list = []
        decoded: list = []
        te = time.perf_counter()
        _, ch = extract_into(backbone, samples, keys, transform, norm, device, out.view(vi), miss,
                            batch_size=batch_size, pool=pool, engine=job.asked, allow_reduced=False,
                            total=missing_total, cache_dir=choice_root,  # False: write nothing (no choice memo)
                            on_batch=lambda js, f, p=p, miss=miss, shard=shard: shard.add(
                                [p.names[miss[j]] for j in js], f),
                            progress=loud, desc=desc if p.view is None else f"{desc} (view {p.view})",
                            draft_target=job.draft_target, device_decode=job.device_decode and p.view is None,
                            say=say, name=name, hashes=hashes, failed=failed, decoded=decoded, data=data)
        del data
        job.held.drop(h for h, j in zip(hashes, miss) if not any(q.where[j] is None for q in plan[vi + 1:]))
        shard.flush()
        if job.readable is not None and decoded:
            job.readable.add((hashes[k], px) for k, px in decoded)
        for k, why in failed:
            failed_once.add(miss[k])
            stats.unreadable.append((samples.describe(int(job.mine[miss[k]])), why))
            stats.misses -= 1
        stats.extract_seconds += time.perf_counter() - te
        sel = sel or (ch.finish() if ch is not None else None)
    return sel


class _ShardWriter:
    """Extracted rows buffered into shards of SHARD_ROWS (written atomically as they fill)."""

    def __init__(self, fc: FeatureCache | None):
        self.fc, self.names, self.rows = fc, [], []

    def add(self, names: list, f: torch.Tensor) -> None:
        self.names.extend(names)
        self.rows.append(f)
        if len(self.names) >= C.SHARD_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.fc is not None and self.names:
            self.fc.write_shard(self.names, torch.cat(self.rows))
        self.names, self.rows = [], []


def _gather(job: _Job, plan: list[_ViewPlan], out: _Out, stats: CacheStats) -> torch.Tensor:
    """The cached rows into the output, then every rank gets every row."""
    for vi, p in enumerate(plan):
        hits = [j for j, w in enumerate(p.where) if w is not None]
        if hits:
            job.fc.read_into(out.tensor[vi], hits, [p.where[j] for j in hits])
    feats = out.tensor if out.tensor is not None else torch.empty((len(job.views), out.rows, 0))
    if not job.single:
        n = len(job.samples)
        dims = [d for d in D.all_gather_object(feats.shape[2]) if d]
        if dims and feats.shape[2] != dims[0]:
            feats = torch.empty((len(job.views), len(job.mine), dims[0]))
        feats = torch.stack([D.gather_rows(feats[vi], job.mine, n) for vi in range(len(job.views))])
        counts = D.all_gather_object((stats.hits, stats.misses, stats.unreadable))
        stats.hits, stats.misses = sum(c[0] for c in counts), sum(c[1] for c in counts)
        stats.unreadable = [u for c in counts for u in c[2]]
    return feats


def _finish_stats(stats: CacheStats, sel, job: _Job) -> None:
    if sel is not None:
        stats.engine = {"name": sel.engine.name, "numerics": sel.engine.numerics, "how": sel.how,
                        "check_cosine_min": round(sel.cosine_min, 7), "note": sel.engine.note,
                        "rejected": dict(sel.rejected), "rates": {k: round(v, 1) for k, v in sel.rates.items()},
                        "rates_lower_bounds": sorted(sel.lower_bounds),  # measured beside a preparation
                        "probe_seconds": round(sel.probe_seconds, 3),
                        "overhead_seconds": round(sel.overhead_seconds, 3),
                        "prepare_seconds": {k: round(v, 2) for k, v in sel.prepare_seconds.items()}}
        stats._selection = sel  # the check batch, for the head-predictions check
    else:
        stats.engine = {"name": None, "numerics": job.numerics, "how": "all cached"}
    if job.fc is not None:
        stats.damaged = list(job.fc.damaged)


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
