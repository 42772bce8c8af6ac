"""The inputs of a training run: the extraction pass (cached features), the holdout, the heads
(standardized by the training rows' statistics), and the batches each epoch trains on.

Two paths, chosen here:
  cached   the backbone is fully frozen and the transform deterministic (no augmentation, or N
           pre-drawn augmented views): features are extracted once (zoo.features, cached on disk)
           and the head trains on tensors.
  images   augmentation without views, or a partial freeze: images go through the model each step
           (DataLoader workers, pinned memory; AMP and channels_last on CUDA).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

MIN_HOLDOUT_IMAGES = 10


@dataclass(frozen=True)
class Inputs:
    """What the fits read. `model` is the run's ZooModel (its head is swapped for a standardized
    fresh one by the main fit); `initial_head` a copy of the seeded head before any training."""

    model: Any
    device: Any
    norm: Any
    cached: bool
    frozen_backbone_step: bool  # fully frozen, uncached: features without autograd, then the head
    train_tf: Any
    eval_tf: Any
    train_features: Any  # (views, N, D) when cached
    val_features: Any  # (N, D) or None
    cache_info: dict
    feature_stats: tuple
    initial_head: Any
    standardize: bool
    workers: int
    channels_last: bool
    augment: bool
    prefix: Any = None  # PrefixSplit: partial freeze, the frozen prefix's outputs computed once (zoo.training.prefix)
    prefix_train: Any = None  # (N, C, H, W) fp16
    prefix_val: Any = None
    prefix_info: dict | None = None  # {"used": bool, "why": ..., "hits", "misses"}

    def everything(self):
        import torch

        return torch.arange(self.train_features.shape[1])

    def fresh_head(self, stat_index=None):
        """A copy of the initial head on the device; on cached features (with --standardize) it
        standardizes them by the statistics of the rows `stat_index` (the rows it is fit on)."""
        head = copy.deepcopy(self.initial_head)
        if self.cached and self.standardize:
            from ..heads import feature_statistics, standardized

            rows = self.train_features if stat_index is None else self.train_features[:, stat_index]
            mean, std = feature_statistics(rows)
            head = standardized(head, mean, std)
        return head.to(self.device)

    def train_module(self, setup, lr_mult=()):
        """(the module each step runs forward, the parameters it trains: with a partial freeze,
        optimizer groups per trained layer group with their learning-rate multipliers, lr_mult
        listing them from the last group back; the head's is 1)."""
        full = self.cached or self.frozen_backbone_step
        module = self.model.head if full else self.model
        if self.prefix is not None:
            from .prefix import suffix_model

            module = suffix_model(self.prefix.suffix, self.model.head)
        params = list(self.model.head.parameters()) if full else self.param_groups(lr_mult)
        if setup.ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            module = DDP(module, device_ids=[setup.device.index] if setup.device.type == "cuda" else None)
        return module, params

    def param_groups(self, lr_mult=()) -> list[dict]:
        from ..freezer import _groups

        named = dict(self.model.backbone.named_parameters())
        trained = [g for g in _groups(self.model) if any(named[p].requires_grad for p in g.parameters if p in named)]
        groups = [{"params": list(self.model.head.parameters()), "lr_mult": 1.0}]
        seen: set[str] = set()
        for back, g in enumerate(reversed(trained)):
            mult = float(lr_mult[min(back, len(lr_mult) - 1)]) if lr_mult else 1.0
            ps = [named[p] for p in g.parameters if p in named and named[p].requires_grad]
            seen.update(g.parameters)
            groups.append({"params": ps, "lr_mult": mult, "group": g.name})
        rest = [p for n, p in named.items() if p.requires_grad and n not in seen]
        if rest:  # parameters outside every group (none for the built-ins) train at the base rate
            groups.append({"params": rest, "lr_mult": 1.0})
        return groups

    def suffix_features(self):
        """The frozen-then-suffix features of every training image, the backbone in eval mode
        (the head-only first stage of --unfreeze-after), (1, N, D) fp32."""
        import torch

        suffix = self.prefix.suffix
        suffix.eval()
        out = []
        with torch.no_grad():
            for i in range(0, len(self.prefix_train), 64):
                out.append(suffix(self._prefix_input(self.prefix_train[i:i + 64], _Dev(self.device))).float().cpu())
        return torch.cat(out).unsqueeze(0)

    def snapshot(self) -> dict:
        """The trainable state a checkpoint keeps (the frozen part is the backbone's file)."""
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad} | {
            n: b.detach().cpu().clone() for n, b in self.model.named_buffers()
            if n.startswith("head.") or not self.cached}

    def restore(self, state: dict) -> None:
        import torch

        params = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t.to(params[n].device))

    def batches(self, setup, data, index, cfg):
        """epoch -> (inputs of the train module, labels, global batch length) for this rank."""
        from .fit import feature_batches

        if self.cached:
            return feature_batches(self.train_features, data.split.train.labels, index, cfg.batch_size, cfg.seed,
                                   setup.ctx)
        if self.prefix is not None:
            rows = feature_batches(self.prefix_train.unsqueeze(0), data.split.train.labels, index, cfg.batch_size,
                                   cfg.seed, setup.ctx)
            return lambda epoch: ((self._prefix_input(x, setup), y, n) for x, y, n in rows(epoch))
        return lambda epoch: self._image_batches(setup, data, index, cfg, epoch)

    def _prefix_input(self, x, setup):
        import torch

        x = x.to(setup.device, non_blocking=True).float()
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def val_prefix_batches(self, setup, labels, batch_size: int):
        import torch

        labels = torch.as_tensor(labels)
        for i in range(0, len(labels), batch_size):
            yield self._prefix_input(self.prefix_val[i:i + batch_size], setup), labels[i:i + batch_size]

    def eval_module(self):
        if self.cached:
            return self.model.head
        if self.prefix is not None:
            from .prefix import suffix_model

            return suffix_model(self.prefix.suffix, self.model.head)
        return self.model

    def _image_batches(self, setup, data, index, cfg, epoch: int):
        import torch
        from torch.utils.data import DataLoader

        from .. import distributed as D
        from ..data import ImageDataset, normalize_batch, sample_seed

        index = np.asarray(index)
        plan = [(gb, index[D.rank_slice(gb, setup.ctx)])
                for gb in D.global_batches(len(index), cfg.batch_size, cfg.seed, epoch)]
        keyed = [[(int(i), sample_seed(cfg.seed, epoch, int(i))) if self.augment else int(i) for i in mine]
                 for _, mine in plan]
        loader = DataLoader(ImageDataset(data.split.train, self.train_tf), batch_sampler=keyed,
                            num_workers=self.workers, pin_memory=setup.device.type == "cuda")
        backbone = self.model.backbone
        for (gb, _), (images, labels, _) in zip(plan, loader):
            x = normalize_batch(images, self.norm, setup.device, self.channels_last)
            if self.frozen_backbone_step:  # frozen, uncached: features without autograd, then the head
                backbone.eval()
                with torch.no_grad(), torch.autocast(setup.device.type, dtype=setup.amp_dtype,
                                                     enabled=setup.amp_dtype is not None):
                    x = backbone(x)
            yield x, labels, len(gb)

    def val_image_batches(self, setup, data, cfg):
        from torch.utils.data import DataLoader

        from .. import distributed as D
        from ..data import ImageDataset, normalize_batch

        mine = D.shard_indices(len(data.split.val), setup.ctx).tolist()
        bs = max(cfg.batch_size, 64)
        loader = DataLoader(ImageDataset(data.split.val, self.eval_tf),
                            batch_sampler=[mine[i:i + bs] for i in range(0, len(mine), bs)],
                            num_workers=self.workers, pin_memory=setup.device.type == "cuda")
        for images, labels, _ in loader:
            yield normalize_batch(images, self.norm, setup.device, self.channels_last), labels


@dataclass(frozen=True)
class _Dev:
    device: Any


def prepare_inputs(cfg, setup, data, built) -> Inputs:
    """Move the model to the device and decide the path: cached features (extracted here, the one
    extraction call of a run) or images through the model every step."""
    import torch

    from ..data import EvalTransform, TrainTransform

    model, split = built.model, data.split
    eval_tf = EvalTransform(built.norm)
    train_tf = TrainTransform(built.norm) if cfg.augment else eval_tf
    cached = built.full_freeze and (not cfg.augment or cfg.views > 0)
    model.to(setup.device)
    if setup.channels_last:
        model.backbone.to(memory_format=torch.channels_last)
    feats, val_feats, info, stats = None, None, {}, ()
    if cached:
        (feats, val_feats), info, stats = extract_features(
            model, split, cfg, train_tf, eval_tf, built.norm, device=setup.device, amp_dtype=setup.amp_dtype,
            workers=data.workers, channels_last=setup.channels_last)
    elif cfg.views:
        warnings.warn("--views is ignored: feature caching needs the whole backbone frozen", stacklevel=4)
    prefix, prefix_train, prefix_val, prefix_info = None, None, None, None
    if not cached and not built.full_freeze and not cfg.augment and built.report.frozen_groups > 0:
        prefix, prefix_train, prefix_val, prefix_info = _prefix_inputs(cfg, setup, data, built, eval_tf)
    initial_head = copy.deepcopy(model.head).to(setup.device)
    return Inputs(model=model, device=setup.device, norm=built.norm, cached=cached,
                  frozen_backbone_step=built.full_freeze and not cached, train_tf=train_tf, eval_tf=eval_tf,
                  train_features=feats, val_features=val_feats, cache_info=info, feature_stats=tuple(stats),
                  initial_head=initial_head, standardize=cfg.standardize, workers=data.workers,
                  channels_last=setup.channels_last, augment=cfg.augment, prefix=prefix, prefix_train=prefix_train,
                  prefix_val=prefix_val, prefix_info=prefix_info)


def _prefix_inputs(cfg, setup, data, built, eval_tf):
    """--freeze N without augmentation: cut the backbone after its frozen groups and compute their
    output once per image (zoo.training.prefix). (None, None, None, why) where that cannot be done."""
    from ..digest import model_key
    from .prefix import PrefixTooLarge, limit_bytes, prefix_outputs, split_backbone

    if setup.ctx.enabled:
        return None, None, None, {"used": False, "why": "not under torchrun (each rank would cache its own copy)"}
    model = built.model
    frozen = {n for n, p in model.backbone.named_parameters() if not p.requires_grad}
    split, why = split_backbone(model.backbone, frozen)
    if split is None:
        warnings.warn(f"--freeze {cfg.freeze}: the frozen layers run every step: {why}", stacklevel=5)
        return None, None, None, {"used": False, "why": why}
    key = dict(model_key(model, setup.amp_dtype), cut=split.cut, frozen_groups=built.report.frozen_groups,
               transform=eval_tf.describe())
    common = dict(key=key, device=setup.device, amp_dtype=setup.amp_dtype, channels_last=setup.channels_last,
                  batch_size=max(cfg.batch_size, 32), workers=data.workers, cache=cfg.cache, cache_dir=cfg.cache_dir,
                  progress=cfg.progress and setup.ctx.is_main)
    try:
        train, info = prefix_outputs(split, data.split.train, eval_tf, built.norm, desc="frozen-prefix outputs",
                                     **common)
        val = None
        if data.split.val is not None:
            val, vinfo = prefix_outputs(split, data.split.val, eval_tf, built.norm, desc="frozen-prefix outputs (val)",
                                        **common)
            info = info | {"hits": info["hits"] + vinfo["hits"], "misses": info["misses"] + vinfo["misses"]}
    except PrefixTooLarge as exc:
        why = (f"the frozen prefix's outputs would take {exc.need / (1 << 20):,.0f} MiB in fp16, over the "
               f"{limit_bytes() / (1 << 20):,.0f} MiB limit (ZOO_PREFIX_CACHE_GB={limit_bytes() / (1 << 30):g})")
        warnings.warn(f"--freeze {cfg.freeze}: the frozen layers run every step: {why}; raise ZOO_PREFIX_CACHE_GB "
                      "to cache them", stacklevel=5)
        return None, None, None, {"used": False, "why": why}
    return split, train, val, {"used": True, "cut": split.cut, "dtype": "float16"} | info


def hold_out(cfg, labels, cached: bool):
    """--holdout F: a stratified part of the training images (features) to choose the epoch and
    the weight decay on, so the reported validation split never takes part in a choice.
    Returns (fit rows, holdout rows or None, why there is none or None)."""
    import torch

    labels = np.asarray(labels)
    n = len(labels)
    note = None
    held: list[int] = []
    if cached:
        rng = np.random.default_rng(cfg.seed + 7919)  # its own stream: the val split is drawn elsewhere
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            if len(idx) >= 3:  # at least two left to fit on
                held.extend(rng.permutation(idx)[:max(1, round(cfg.holdout * len(idx)))].tolist())
        if len(held) < MIN_HOLDOUT_IMAGES or len(np.unique(labels[held])) < 2:
            note = (f"too few training images to hold out {cfg.holdout:g} of them "
                    f"({len(held)} would be held out); the last epoch is kept")
            held = []
    else:
        note = ("the last epoch is kept: choosing it on a holdout needs cached features (the whole "
                "backbone frozen, and --views with --augment)")
    mask = np.ones(n, dtype=bool)
    mask[held] = False
    fit_index = torch.as_tensor(np.flatnonzero(mask))
    return fit_index, (torch.as_tensor(np.sort(np.asarray(held))) if held else None), note


def extract_features(model, split, cfg, train_tf, eval_tf, norm, *, device, amp_dtype, workers: int,
                     channels_last: bool) -> tuple[tuple, dict, list]:
    """The extraction phase: ((train features (views, N, D), val features (N, D) or None), the
    cache statistics summed, the per-pass CacheStats). Reads only the frozen backbone, the split
    and the transforms."""
    from ..features import CacheStats, DecodePool, cached_features, model_key

    key = model_key(model, amp_dtype)
    # One set of decoding workers for the train and validation passes (started at the first
    # miss, none on a warm run): worker start-up is paid once per run.
    sources = [(split.train, train_tf)] + ([(split.val, eval_tf)] if split.val is not None else [])
    with DecodePool(sources, device, workers, max_pixels=cfg.max_image_pixels) as pool:
        common = dict(device=device, cache=cfg.cache, cache_dir=cfg.cache_dir,
                      batch_size=max(cfg.batch_size, 64), amp_dtype=amp_dtype, pool=pool,
                      channels_last=channels_last, progress=cfg.progress, engine=cfg.engine,
                      jpeg_draft=cfg.jpeg_draft, gpu_decode=cfg.gpu_decode)
        views = list(range(cfg.views)) if cfg.augment else [None]
        train_feats, stats = cached_features(
            model.backbone, split.train, train_tf, norm,
            key_fields=dict(key, transform=train_tf.describe(), view_seed=cfg.seed if cfg.augment else None),
            views=views, view_seed=cfg.seed, desc="train features", **common)
        feature_stats = [stats]
        val_feats = None
        if split.val is not None:
            val_feats, val_stats = cached_features(
                model.backbone, split.val, eval_tf, norm,
                key_fields=dict(key, transform=eval_tf.describe(), view_seed=None), desc="val features",
                **common)
            feature_stats.append(val_stats)
            val_feats = val_feats[0]
    for samples in (split.train, split.val):  # files that never reached the extraction (skipped): nothing
        if samples is not None and samples.held is not None:  # of their bytes outlives the phase
            samples.held.clear()
    total = CacheStats()
    for st in feature_stats:
        total.add(st)
    info = {"hits": total.hits, "misses": total.misses, "enabled": cfg.cache, "seconds": round(total.seconds, 3),
            "engine": dict(total.engine), "read_again": total.reread}
    return (train_feats, val_feats), info, feature_stats
