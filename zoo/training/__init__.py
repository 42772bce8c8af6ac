"""zoo.train: a classifier head on a frozen (or partly frozen) backbone, on GPU or CPU.

Two paths, chosen automatically:
  cached   the backbone is fully frozen and the transform deterministic (no augmentation, or N
           pre-drawn augmented views): features are extracted once (zoo.features, cached on disk)
           and the head trains on tensors. This is the default wherever it is valid.
  full     augmentation without views, or a partial freeze: images go through the model each step
           (DataLoader workers, pinned memory; AMP and channels_last on CUDA).

Both use the same global-batch schedule (zoo.distributed), AdamW over trainable parameters only,
label smoothing, a per-step cosine schedule, early stopping on validation top-1 (the best epoch's
weights are kept), and seeded RNG everywhere, so a run is reproducible and a resumed run ends
where an uninterrupted one would.
"""

from __future__ import annotations

import os
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import ZooError
from ..options import DEFAULT_BACKBONE, RESUMABLE_OVERRIDES, OptionError, TrainConfig, flag_of
from .evaluation import evaluate, score
from .fit import NonFiniteError

if TYPE_CHECKING:
    from ..runs import Run

__all__ = ["NonFiniteError", "evaluate", "resumed_config", "score", "train"]


def train(backbone: str | None = None, data: str | os.PathLike | None = None, *,
          out: str | os.PathLike | None = None, resume: bool = False,
          on_epoch_end: Callable[[int, dict], None] | None = None, **options) -> Run:
    """Train a classifier head; returns a zoo.runs.Run (model, history, metrics, run dir).

    backbone: qualified name (default: the one a plugin declares; timm/tf_efficientnet_lite0.in1k,
    offline ImageNet weights, with the built-ins).
    data: image folder with one subfolder per class; None (and no csv) = the embedded
    Fashion-MNIST sample. options: any TrainConfig field (csv, val_data, val_split, freeze,
    head, hidden, epochs, lr, batch_size, device, seed, strict, cache, augment, views,
    image_size, ...), checked on construction (OptionError names the flag). out: run directory
    (None: nothing is written). resume: continue the run in `out` with its saved config; only
    RESUMABLE_OVERRIDES (epochs, device, workers, progress, cache, patience) may change, and the
    changes are saved; any other option that differs from the saved one is refused.
    on_epoch_end(epoch, record): called after each epoch's checkpoint is written (an exception
    raised there stops the run; `resume=True` continues it).
    """
    unknown = set(options) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise TypeError(f"train() got unknown options {sorted(unknown)}")
    from .. import runs
    from .trainer import _Trainer

    given = dict(options)
    if backbone is not None:
        given["backbone"] = backbone
    if data is not None:
        given["data"] = os.fspath(data)
    for k in ("val_data", "csv", "cache_dir"):  # paths given as Path objects, like `data`
        if isinstance(given.get(k), os.PathLike):
            given[k] = os.fspath(given[k])
    if resume:
        if out is None:
            raise ZooError("resume needs the run directory (--out DIR)")
        runs.prepare(out, resume=True)
        cfg = resumed_config(TrainConfig.from_dict(runs.read_config(out)), given, out)
    else:
        given.setdefault("backbone", DEFAULT_BACKBONE)
        if given["backbone"] == DEFAULT_BACKBONE:
            from ..plugin.registry import default_backbone

            given["backbone"] = default_backbone(with_tag=given.get("weights", "default") == "default")
        cfg = TrainConfig(**given)
    return _Trainer(cfg, Path(out) if out is not None else None, resume, on_epoch_end).run()


def resumed_config(saved: TrainConfig, given: dict, out) -> TrainConfig:
    """The saved config with the allowed changes applied; any other option given with a value
    other than the saved one is refused (listing each), since the run would silently ignore it."""
    saved_d = saved.to_dict()
    differ = []
    for k, v in given.items():
        if k in RESUMABLE_OVERRIDES:
            continue
        v = list(v) if isinstance(v, tuple) else v
        if v != saved_d.get(k):
            differ.append(f"{flag_of(TrainConfig, k)} {v!r} (saved: {saved_d.get(k)!r})")
    if differ:
        raise OptionError(f"--resume continues {str(out)!r} with its saved options, but these differ: "
                          f"{', '.join(differ)}; drop them to resume, or start a new run with another --out "
                          f"(only {', '.join(flag_of(TrainConfig, k) for k in RESUMABLE_OVERRIDES)} may change)")
    return replace(saved, **{k: v for k, v in given.items() if k in RESUMABLE_OVERRIDES})
