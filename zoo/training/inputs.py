"""The inputs of a training run: the extraction pass (cached features) and the holdout."""

from __future__ import annotations

MIN_HOLDOUT_IMAGES = 10


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
    with DecodePool(sources, device, workers) as pool:
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
    total = CacheStats()
    for st in feature_stats:
        total.add(st)
    info = {"hits": total.hits, "misses": total.misses, "enabled": cfg.cache, "seconds": round(total.seconds, 3),
            "engine": dict(total.engine)}
    return (train_feats, val_feats), info, feature_stats
