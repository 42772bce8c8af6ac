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

import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import ZooError

from .options import DEFAULT_BACKBONE, RESUMABLE_OVERRIDES, OptionError, TrainConfig, flag_of  # noqa: F401


class NonFiniteError(ZooError):
    """Training produced a NaN or infinite loss or weight."""


def select_device(preference: str = "auto", allow_mps: bool = True):
    """The one device selection: auto = CUDA, then MPS (when allowed), then CPU; an explicit
    device that is not there is an error naming the fix."""
    import torch

    pref = (preference or "auto").lower()
    if pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if allow_mps and mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if pref.startswith("cuda") and not torch.cuda.is_available():
        raise ZooError(f"--device {preference}: no CUDA GPU is visible (torch.cuda.is_available() is False); "
                       "use --device auto or --device cpu")
    if pref == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ZooError("--device mps: Apple MPS is not available here; use --device auto or --device cpu")
    if pref == "mps" and not allow_mps:
        raise ZooError("--device mps is not supported here; use --device auto, cpu or cuda")
    if pref not in ("cpu", "mps") and not pref.startswith("cuda"):
        raise ZooError(f"--device must be auto, cpu, cuda[:N] or mps, got {preference!r}")
    return torch.device(pref)


def amp_settings(device, amp: str):
    """-> (autocast dtype or None, use GradScaler)."""
    import torch

    amp = (amp or "auto").lower()
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None, False
    if amp == "auto":
        return (torch.bfloat16, False) if torch.cuda.is_bf16_supported() else (torch.float16, True)
    if amp == "bf16":
        return torch.bfloat16, False
    if amp == "fp16":
        return torch.float16, device.type == "cuda"
    raise ZooError(f"amp must be auto, bf16, fp16 or off, got {amp!r}")


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _cosine(total_steps: int):
    def f(step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))
    return f


def _metrics(loss_sum: float, confusion) -> dict:
    cm = np.asarray(confusion, dtype=np.int64)
    count = int(cm.sum())
    per_class = [float(cm[i, i] / cm[i].sum()) if cm[i].sum() else None for i in range(len(cm))]
    return {"loss": loss_sum / max(1, count), "top1": float(np.trace(cm) / max(1, count)), "count": count,
            "per_class": per_class, "confusion": cm.tolist()}


def train(backbone: str | None = None, data: str | os.PathLike | None = None, *,
          out: str | os.PathLike | None = None, resume: bool = False,
          on_epoch_end: Callable[[int, dict], None] | None = None, **options) -> "Run":  # noqa: F821
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
    from . import runs

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
            from .plugin.registry import default_backbone

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


# The weight-decay grid (AdamW, decoupled, lr 1e-3 by default). It reaches 10 because standardized
# features want strong decay: on Fashion-MNIST lite0 features 0..0.1 tied on the holdout and only
# ~10 improved it (+1 point), as scikit-learn's chosen C does for its logistic regression.
TUNE_WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0, 10.0)
MIN_HOLDOUT_IMAGES = 10


@dataclass
class _FitState:
    """Where the epoch loop stands: what a checkpoint saves and a resume restores."""

    history: list = field(default_factory=list)
    best_epoch: int = 0
    best_top1: float = -1.0
    best_loss: float = math.inf
    best_state: dict | None = None
    next_epoch: int = 1
    stale: int = 0  # epochs since the best one (early stopping)


class _Trainer:
    """One training run. `run` reads top to bottom as its phases; each phase sets the attributes
    the later ones use (device/ctx, split, model/norm/report, the inputs, the optimization)."""

    def __init__(self, cfg: TrainConfig, out: Path | None, resume: bool, on_epoch_end):
        self.cfg, self.out, self.resume, self.on_epoch_end = cfg, out, resume, on_epoch_end

    def run(self):
        t_start = time.perf_counter()
        self._select_device()
        self._load_data()  # every data error surfaces before a backbone is built or a file written
        self._build_model()
        self._open_run_dir()
        try:
            self._prepare_inputs()  # cached features (the extraction phase) or the per-step image pipeline
            self._tune_weight_decay()  # the weight decay, chosen on the holdout
            self._build_optimization()
            state = self._restore() if self.resume else self._start()
            state, stopped_early = self._fit(state)
            self._refit(state)  # the chosen epochs again, on all the training images
        except BaseException:
            self._discard_unstarted_run_dir()
            raise
        return self._finish(state, stopped_early, t_start)

    # ------------------------------------------------------------------ phases
    def _select_device(self) -> None:
        import torch

        from . import distributed as D

        device = select_device(self.cfg.device)
        self.ctx = D.init_from_env(device.type)
        if self.ctx.enabled and device.type == "cuda":
            device = torch.device("cuda", self.ctx.local_rank)
        self.device = device
        self.amp_dtype, self.use_scaler = amp_settings(device, self.cfg.amp)
        self.channels_last = device.type in ("cuda", "cpu")

    def _load_data(self) -> None:
        from .data import load_data
        from .features import default_workers, readable_hashes

        cfg = self.cfg
        # Images the cache has seen decode are only hashed, not decoded again (the warm path).
        self.split = load_data(cfg.data, cfg.csv, cfg.val_data, cfg.val_split, cfg.seed, cfg.strict,
                               csv_outside_root=cfg.csv_outside_root, max_pixels=cfg.max_image_pixels,
                               known_readable=readable_hashes(cfg.cache_dir) if cfg.cache else None)
        self.workers = cfg.num_workers if cfg.num_workers is not None else default_workers(self.split.train,
                                                                                           self.device)

    def _build_model(self) -> None:
        from .data import with_image_size
        from .freezer import freeze, is_fully_frozen
        from .heads import HeadConfig
        from .model import build_model

        cfg = self.cfg
        seed_everything(cfg.seed)  # the head's initial weights
        head_cfg = HeadConfig(kind=cfg.head, hidden=tuple(cfg.hidden), dropout=cfg.dropout, norm=cfg.head_norm)
        model = build_model(cfg.backbone, list(self.split.classes), weights=cfg.weights, head=head_cfg)
        self.norm = with_image_size(model.meta.normalization, cfg.image_size)
        self.report = freeze(model, "all" if str(cfg.freeze) == "all" else int(cfg.freeze), bn_adapt=cfg.bn_adapt)
        self.full_freeze = is_fully_frozen(model)
        model.meta = replace(model.meta, normalization=self.norm,
                             frozen_groups=None if self.full_freeze else self.report.frozen_groups)
        self.model = model
        if self.ctx.is_main and cfg.progress:
            split = self.split
            print(f"data: {split.source}: {len(split.train)} train / {len(split.val) if split.val else 0} val "
                  f"images, {len(split.classes)} classes" + (f", {len(split.skipped)} skipped" if split.skipped else ""),
                  file=sys.stderr)
            print(f"model: {model.meta.backbone} ({model.meta.weights or 'random init'}), {self.report}; device "
                  f"{self.device}" + (f", amp {str(self.amp_dtype).replace('torch.', '')}" if self.amp_dtype else ""),
                  file=sys.stderr)

    def _open_run_dir(self) -> None:
        """Create the run directory and write config.json (on resume: with the allowed changes,
        e.g. more epochs, so a later resume sees them)."""
        from . import runs

        self.created_dir = False
        if self.out is not None and self.ctx.is_main:
            self.created_dir = not self.out.exists()
            runs.prepare(self.out, self.resume)
            runs.write_config(self.out, self.cfg.to_dict())

    def _discard_unstarted_run_dir(self) -> None:
        """A run that fails before its first checkpoint leaves nothing behind (its config.json
        would only block reusing --out)."""
        from . import runs

        if self.out is None or not self.ctx.is_main or self.resume or (self.out / runs.CHECKPOINT).exists():
            return
        (self.out / runs.CONFIG).unlink(missing_ok=True)
        if self.created_dir and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()

    def _prepare_inputs(self) -> None:
        """Move the model to the device and decide the path: cached features (extracted here) or
        images through the model every step."""
        import torch

        from .data import EvalTransform, TrainTransform

        cfg, model = self.cfg, self.model
        self.eval_tf = EvalTransform(self.norm)
        self.train_tf = TrainTransform(self.norm) if cfg.augment else self.eval_tf
        self.cached = self.full_freeze and (not cfg.augment or cfg.views > 0)
        self.frozen_backbone_step = self.full_freeze and not self.cached
        self.cache_info: dict = {}
        model.to(self.device)
        if self.channels_last:
            model.backbone.to(memory_format=torch.channels_last)
        if self.cached:
            self.features, self.cache_info = self._extract_features()
        elif cfg.views:
            warnings.warn("--views is ignored: feature caching needs the whole backbone frozen", stacklevel=3)
        self._hold_out()
        if self.cached and cfg.standardize:
            from .heads import feature_statistics, standardized

            mean, std = feature_statistics(self.features[0][:, self.fit_index])
            model.head = standardized(model.head, mean, std)
        model.head.to(self.device)
        self.initial_head = {k: v.detach().clone() for k, v in model.head.state_dict().items()}
        self.weight_decay, self.tuned = cfg.weight_decay, None

    def _hold_out(self) -> None:
        """Set aside a stratified part of the training images (features) to choose the best epoch
        and weight decay on, so the reported validation split never takes part in a choice."""
        import torch

        cfg, labels = self.cfg, np.asarray(self.split.train.labels)
        n = len(labels)
        self.holdout_index, self.holdout_note = None, None
        held: list[int] = []
        if cfg.holdout and self.cached:
            rng = np.random.default_rng(cfg.seed + 7919)  # its own stream: the val split is drawn elsewhere
            for c in np.unique(labels):
                idx = np.flatnonzero(labels == c)
                if len(idx) >= 3:  # at least two left to fit on
                    held.extend(rng.permutation(idx)[:max(1, round(cfg.holdout * len(idx)))].tolist())
            if len(held) < MIN_HOLDOUT_IMAGES or len(np.unique(labels[held])) < 2:
                self.holdout_note = (f"too few training images to hold out {cfg.holdout:g} of them "
                                     f"({len(held)} would be held out); the last epoch is kept")
                held = []
        elif cfg.holdout:
            self.holdout_note = ("the last epoch is kept: choosing it on a holdout needs cached features (the whole "
                                 "backbone frozen, and --views with --augment)")
        if self.holdout_note:
            if cfg.tune == "on":
                raise ZooError(f"--tune cannot choose a weight decay: {self.holdout_note.split(';')[0]}")
            warnings.warn(self.holdout_note, stacklevel=4)
        mask = np.ones(n, dtype=bool)
        mask[held] = False
        self.fit_index = torch.as_tensor(np.flatnonzero(mask))
        if held:
            self.holdout_index = torch.as_tensor(np.sort(np.asarray(held)))

    def _extract_features(self) -> tuple[tuple, dict]:
        """The extraction phase: (train features (views, N, D), val features (N, D) or None) and the
        cache statistics. Reads only the frozen backbone, the split and the transforms."""
        from .features import CacheStats, DecodePool, cached_features, model_key

        cfg, split = self.cfg, self.split
        key = model_key(self.model, self.amp_dtype)
        # One set of decoding workers for the train and validation passes (started at the first
        # miss, none on a warm run): worker start-up is paid once per run.
        sources = [(split.train, self.train_tf)] + ([(split.val, self.eval_tf)] if split.val is not None else [])
        with DecodePool(sources, self.device, self.workers) as pool:
            common = dict(device=self.device, cache=cfg.cache, cache_dir=cfg.cache_dir,
                          batch_size=max(cfg.batch_size, 64), amp_dtype=self.amp_dtype, pool=pool,
                          channels_last=self.channels_last, progress=cfg.progress, engine=cfg.engine,
                          jpeg_draft=cfg.jpeg_draft, gpu_decode=cfg.gpu_decode)
            views = list(range(cfg.views)) if cfg.augment else [None]
            train_feats, stats = cached_features(
                self.model.backbone, split.train, self.train_tf, self.norm,
                key_fields=dict(key, transform=self.train_tf.describe(), view_seed=cfg.seed if cfg.augment else None),
                views=views, view_seed=cfg.seed, desc="train features", **common)
            self.feature_stats = [stats]
            val_feats = None
            if split.val is not None:
                val_feats, val_stats = cached_features(
                    self.model.backbone, split.val, self.eval_tf, self.norm,
                    key_fields=dict(key, transform=self.eval_tf.describe(), view_seed=None), desc="val features",
                    **common)
                self.feature_stats.append(val_stats)
                val_feats = val_feats[0]
        total = CacheStats()
        for st in self.feature_stats:
            total.add(st)
        info = {"hits": total.hits, "misses": total.misses, "enabled": cfg.cache, "seconds": round(total.seconds, 3),
                "engine": dict(total.engine)}
        return (train_feats, val_feats), info

    def _build_optimization(self) -> None:
        import torch

        from .freezer import build_optimizer

        cfg, model = self.cfg, self.model
        # Fully frozen (cached, or augmented without views): the backbone runs without autograd
        # (see _train_epoch); only the head is trained and wrapped by DDP.
        trainable_module = model.head if self.full_freeze else model
        self.train_module = trainable_module
        if self.ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.train_module = DDP(trainable_module,
                                    device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = build_optimizer(model, cfg.lr, self.weight_decay)
        self.total_steps = math.ceil(len(self.fit_index) / cfg.batch_size) * cfg.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _cosine(self.total_steps))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.use_scaler)

    def _start(self) -> _FitState:
        # Extraction draws from the global RNG only when it extracts (each DataLoader takes a base
        # seed), so a cold and a warm cache would start the loop at different RNG states and give
        # different dropout masks: reseed, so the head's result does not depend on the cache.
        seed_everything(self.cfg.seed)
        return _FitState()

    def _restore(self) -> _FitState:
        import torch

        from . import distributed as D
        from . import runs

        ck = D.broadcast_object(runs.load_checkpoint(self.out) if self.ctx.is_main else None)
        self._load_trainable(ck["trainable"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.scheduler.lr_lambdas[0] = _cosine(self.total_steps)  # epochs may have been extended
        self.scheduler.base_lrs = [self.cfg.lr for _ in self.scheduler.base_lrs]
        if ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        torch.set_rng_state(ck["rng"])
        if self.ctx.is_main and self.cfg.progress:
            print(f"resuming {self.out} after epoch {ck['epoch']}", file=sys.stderr)
        return _FitState(history=list(ck["history"]), best_epoch=ck["best_epoch"], best_top1=ck["best_top1"],
                         best_loss=ck.get("best_loss", math.inf), best_state=ck["best_state"],
                         next_epoch=ck["epoch"] + 1, stale=ck["stale"])

    def _fit(self, state: _FitState) -> tuple[_FitState, bool]:
        """The epoch loop: train, validate, keep the best, checkpoint, stop early."""
        from tqdm.auto import tqdm

        from . import distributed as D

        cfg = self.cfg
        bar = tqdm(range(state.next_epoch, cfg.epochs + 1), desc="epochs",
                   disable=not (cfg.progress and self.ctx.is_main), dynamic_ncols=True, leave=False,
                   initial=state.next_epoch - 1, total=cfg.epochs)
        stopped_early = False
        for epoch in bar:
            if cfg.patience and state.stale >= cfg.patience:
                stopped_early = True
                break
            t0 = time.perf_counter()
            try:
                tr = self._train_epoch(epoch)
            except RuntimeError as exc:  # torch refuses a step whose numbers overflow float32
                if "overflow" not in str(exc):
                    raise
                tr = {"loss": math.inf}
            self._check_finite(epoch, tr["loss"])
            va = self._evaluate() if self.split.val is not None else None  # reported, never chosen on
            ho = self._evaluate_holdout()
            rec = {"epoch": epoch, "train_loss": tr["loss"], "train_top1": tr["top1"],
                   "holdout_loss": ho["loss"] if ho else None, "holdout_top1": ho["top1"] if ho else None,
                   "val_loss": va["loss"] if va else None, "val_top1": va["top1"] if va else None,
                   "val_per_class": va["per_class"] if va else None,
                   "lr": self.optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - t0, 3)}
            state.history.append(rec)
            # the choice: the holdout's top-1 (then loss); without a holdout, simply the last epoch
            score, loss = (ho["top1"], ho["loss"]) if ho else (float(epoch), 0.0)
            if score > state.best_top1 or (score == state.best_top1 and loss < state.best_loss):
                state.best_epoch, state.best_top1, state.best_loss = epoch, score, loss
                state.best_state = self._trainable_state()
                state.stale = 0
            else:
                state.stale += 1
            state.next_epoch = epoch + 1
            bar.set_postfix(loss=f"{tr['loss']:.3f}", holdout=f"{100 * ho['top1']:.1f}%" if ho else "-",
                            val=f"{100 * va['top1']:.1f}%" if va else "-")
            self._checkpoint(state)
            D.barrier()
            if self.on_epoch_end is not None:
                self.on_epoch_end(epoch, rec)
        bar.close()
        if cfg.patience and state.stale >= cfg.patience and len(state.history) < cfg.epochs:
            stopped_early = True
        return state, stopped_early

    def _check_finite(self, epoch: int, loss: float) -> None:
        """Stop before a NaN/inf loss or weight is checkpointed or saved: the last good
        checkpoint stays as it is. (The loss is summed over all ranks, the weights are the same
        on every rank, so every rank stops together.)"""
        import torch

        bad = None
        if not math.isfinite(loss):
            bad = f"the training loss is {loss}"
        else:
            for name, p in self.model.named_parameters():
                if p.requires_grad and not bool(torch.isfinite(p).all()):
                    bad = f"parameter {name} holds NaN/inf values"
                    break
        if bad is None:
            return
        kept = (f"the last good checkpoint (epoch {epoch - 1}) is kept in {str(self.out)!r}"
                if self.out is not None and epoch > 1 else "nothing was saved")
        raise NonFiniteError(f"training diverged in epoch {epoch}: {bad} (lr {self.cfg.lr:g}, weight decay "
                             f"{self.cfg.weight_decay:g}); {kept}. Lower --lr, check the data, and start a new run")

    def _checkpoint(self, state: _FitState) -> None:
        import torch

        from . import runs

        if self.out is None or not self.ctx.is_main:
            return
        runs.save_checkpoint(self.out, {
            "epoch": state.next_epoch - 1, "trainable": self._trainable_state(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.use_scaler else None, "rng": torch.get_rng_state(),
            "history": state.history, "best_epoch": state.best_epoch, "best_top1": state.best_top1,
            "best_loss": state.best_loss, "best_state": state.best_state, "stale": state.stale})

    def _check_engine_predictions(self) -> None:
        """Reduced-precision engines: do the trained head's predictions on the engine's check batch
        move against eager fp32 features? Recorded in the run's cache info; a warning if any do."""
        from .features import head_predictions_agree

        engine = self.cache_info.get("engine") or {}
        agree = next((a for a in (head_predictions_agree(self.model.head, s) for s in self.feature_stats) if a), None)
        if agree is None or not engine:
            return
        engine["head_predictions_unchanged"] = f"{agree[0]}/{agree[1]}"
        if agree[0] < agree[1] and engine.get("numerics") != "fp32":
            warnings.warn(f"{agree[1] - agree[0]} of {agree[1]} check-batch predictions differ between "
                          f"{engine.get('name')} and eager fp32 features; use --engine channels_last (fp32) "
                          "if that matters", stacklevel=3)

    def _finish(self, state: _FitState, stopped_early: bool, t_start: float):
        """Keep the best epoch's weights, score them, and write the model and its reports."""
        import torch

        from . import distributed as D
        from . import runs

        cfg, split, model = self.cfg, self.split, self.model
        if state.best_state is not None:
            self._load_trainable(state.best_state)
        from .heads import fold_standardization

        model.head = fold_standardization(model.head)  # exports, predict and evaluate see a plain head
        if self.cached:
            self._check_engine_predictions()
        final = self._evaluate() if split.val is not None else {}
        model.eval()
        extra = dict(model.meta.extra)
        extra["training"] = {"val_top1": final.get("top1"), "best_epoch": state.best_epoch,
                             "epochs_run": len(state.history), "stopped_early": stopped_early,
                             "train_images": len(split.train), "val_images": len(split.val) if split.val else 0,
                             "data": split.source, "seed": cfg.seed, "image_size": self.norm.input_size[-1],
                             "selection": {
                                 "on": "holdout" if self.holdout_index is not None else "last epoch",
                                 "holdout_images": 0 if self.holdout_index is None else len(self.holdout_index),
                                 "holdout_top1": state.best_top1 if self.holdout_index is not None else None,
                                 "note": self.holdout_note, "weight_decay": self.weight_decay, "tune": self.tuned,
                                 "refit": getattr(self, "refit", None), "standardized": bool(self.cached and cfg.standardize)}}
        model.meta = replace(model.meta, extra=extra)
        model.to("cpu")
        if self.channels_last:
            model.backbone.to(memory_format=torch.contiguous_format)
        run = runs.Run(dir=self.out, model=model, history=state.history, best_epoch=state.best_epoch,
                       best_val_top1=final.get("top1") if split.val is not None else None, final=final,
                       config=cfg.to_dict(), freeze_report=self.report, device=str(self.device),
                       cache=self.cache_info, seconds=time.perf_counter() - t_start)
        if self.out is not None and self.ctx.is_main:
            from .model import save_model

            runs.write_history(self.out, state.history, dict(final)
                               | {"best_epoch": state.best_epoch, "labels": list(split.classes),
                                  "skipped": [list(s) for s in split.skipped]})
            runs.write_validation(self.out, split)
            runs.plot_curves(self.out, state.history)
            if final:
                runs.plot_confusion(self.out, final["confusion"], split.classes)
            save_model(model, self.out)
        D.barrier()
        return run

    # ------------------------------------------------------------------ state
    def _trainable_state(self) -> dict:
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad} | {
            n: b.detach().cpu().clone() for n, b in self.model.named_buffers()
            if n.startswith("head.") or not self.cached}

    def _load_trainable(self, state: dict) -> None:
        import torch

        params = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t.to(params[n].device))

    # ------------------------------------------------------------------ loops
    def _loss_fn(self):
        import torch

        return torch.nn.CrossEntropyLoss(reduction="sum", label_smoothing=self.cfg.label_smoothing)

    def _batches(self, epoch: int):
        from . import distributed as D

        for gb in D.global_batches(len(self.fit_index), self.cfg.batch_size, self.cfg.seed, epoch):
            yield gb, D.rank_slice(gb, self.ctx)

    def _train_epoch(self, epoch: int) -> dict:
        import torch

        from . import distributed as D

        cfg, device = self.cfg, self.device
        loss_fn = self._loss_fn()
        world = self.ctx.world_size
        self.train_module.train()  # frozen norm layers stay in eval: zoo.freezer's hooks
        labels_all = torch.as_tensor(self.split.train.labels)
        loss_sum = torch.zeros(2, dtype=torch.float64)  # loss, correct
        if self.cached:
            feats = self.features[0]
            view = feats[(epoch - 1) % feats.shape[0]]
            fit = self.fit_index  # the training images less the holdout
            source = ((view[fit[torch.as_tensor(mine)]], labels_all[fit[torch.as_tensor(mine)]], len(gb))
                      for gb, mine in self._batches(epoch))
        else:
            source = self._image_batches(epoch)
        for x, y, global_len in source:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            # Cached: only the head runs, on fp32 features; autocast would buy nothing and round its
            # logits and gradients to bf16/fp16. Mixed precision is for the backbone's convolutions.
            with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None and not self.cached):
                if self.frozen_backbone_step:  # frozen, uncached: features without autograd, then the head
                    self.model.backbone.eval()
                    with torch.no_grad():
                        x = self.model.backbone(x)
                logits = self.train_module(x)
                loss = loss_fn(logits.float(), y)
            # Sum over this rank's slice, scaled so DDP's gradient average is the global-batch mean.
            scaled = loss * (world / global_len)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(scaled).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            loss_sum += torch.tensor([loss.item(), (logits.argmax(1) == y).sum().item()], dtype=torch.float64)
        D.all_reduce_sum(loss_sum)
        n = len(self.fit_index)
        return {"loss": float(loss_sum[0]) / n, "top1": float(loss_sum[1]) / n}

    def _evaluate_holdout(self) -> dict | None:
        import torch

        if self.holdout_index is None:
            return None
        feats = self.features[0][0][self.holdout_index]
        labels = torch.as_tensor(self.split.train.labels)[self.holdout_index]
        loss_sum, confusion = score(self.model.head, [(feats, labels)], len(self.split.classes), self.device, None,
                                    self.cfg.label_smoothing)
        return _metrics(float(loss_sum[0]), confusion.numpy())

    def _reset_head(self) -> None:
        import torch

        seed_everything(self.cfg.seed)
        with torch.no_grad():
            self.model.head.load_state_dict(self.initial_head)

    def _tune_weight_decay(self) -> None:
        """--tune: train the head once per weight decay in TUNE_WEIGHT_DECAYS on the fit part and
        keep the one whose best epoch scores highest on the holdout (cached features make each
        candidate a few seconds). Candidates are not checkpointed; a resumed run tunes again
        (deterministically) before continuing."""
        if self.cfg.tune == "off" or self.holdout_index is None:
            return
        if self.cfg.tune == "auto" and self.cfg.head != "linear":
            return  # an MLP costs ~10x a linear head per candidate (784 s vs 42 s measured): --tune asks for it
        results = []
        for wd in TUNE_WEIGHT_DECAYS:
            self._reset_head()
            self.weight_decay = wd
            self._build_optimization()
            best = (-1.0, -math.inf)
            for epoch in range(1, self.cfg.epochs + 1):
                self._train_epoch(epoch)
                ho = self._evaluate_holdout()
                best = max(best, (ho["top1"], -ho["loss"]))
            results.append({"weight_decay": wd, "holdout_top1": best[0], "holdout_loss": -best[1]})
        chosen = max(results, key=lambda r: (r["holdout_top1"], -r["holdout_loss"], r["weight_decay"]))
        self.weight_decay, self.tuned = chosen["weight_decay"], results
        self._reset_head()
        if self.ctx.is_main and self.cfg.progress:
            print(f"tune: weight decay {self.weight_decay:g} (holdout top-1 {100 * chosen['holdout_top1']:.1f}%; grid "
                  + ", ".join(f"{r['weight_decay']:g}: {100 * r['holdout_top1']:.1f}%" for r in results) + ")",
                  file=sys.stderr)

    def _refit(self, state: _FitState) -> None:
        """With the epoch chosen on the holdout, train again from the same start on every training
        image (holdout included) for that many epochs, under the same schedule; that head is kept.
        Only on cached features: a fine-tuned backbone is not retrained twice."""
        import torch

        if self.holdout_index is None or not state.best_epoch:
            return
        self._reset_head()
        self.fit_index = torch.arange(len(self.split.train))
        self._build_optimization()
        for epoch in range(1, state.best_epoch + 1):
            tr = self._train_epoch(epoch)
            self._check_finite(epoch, tr["loss"])
        state.best_state = self._trainable_state()
        self.refit = {"epochs": state.best_epoch, "images": len(self.split.train)}

    def _image_batches(self, epoch: int):
        import torch
        from torch.utils.data import DataLoader

        from .data import ImageDataset, normalize_batch, sample_seed

        plan = [(gb, mine) for gb, mine in self._batches(epoch)]
        keyed = [[(int(i), sample_seed(self.cfg.seed, epoch, int(i))) if self.cfg.augment else int(i) for i in mine]
                 for _, mine in plan]
        loader = DataLoader(ImageDataset(self.split.train, self.train_tf), batch_sampler=keyed,
                            num_workers=self.workers, pin_memory=self.device.type == "cuda")
        for (gb, _), (images, labels, _) in zip(plan, loader):
            yield normalize_batch(images, self.norm, self.device, self.channels_last), labels, len(gb)

    def _evaluate(self) -> dict:
        import torch

        from . import distributed as D

        val = self.split.val
        module = self.model.head if self.cached else self.model
        if self.cached:  # every rank holds all val features; evaluation is cheap
            batches = [(self.features[1], torch.as_tensor(val.labels))]
        else:
            batches = self._val_image_batches()
        loss_sum, confusion = score(module, batches, len(self.split.classes), self.device,
                                    None if self.cached else self.amp_dtype,  # the cached head runs in fp32
                                    self.cfg.label_smoothing)
        if not self.cached:
            D.all_reduce_sum(confusion)
            D.all_reduce_sum(loss_sum)
        return _metrics(float(loss_sum[0]), confusion.numpy())

    def _val_image_batches(self):
        from torch.utils.data import DataLoader

        from . import distributed as D
        from .data import ImageDataset, normalize_batch

        mine = D.shard_indices(len(self.split.val), self.ctx).tolist()
        bs = max(self.cfg.batch_size, 64)
        loader = DataLoader(ImageDataset(self.split.val, self.eval_tf),
                            batch_sampler=[mine[i:i + bs] for i in range(0, len(mine), bs)],
                            num_workers=self.workers, pin_memory=self.device.type == "cuda")
        for images, labels, _ in loader:
            yield normalize_batch(images, self.norm, self.device, self.channels_last), labels


def score(module, batches, num_classes: int, device, amp_dtype=None, label_smoothing: float = 0.0):
    """The one evaluation loop: (loss sum as a float64 tensor of one, confusion matrix (K, K)) of
    `module` in eval mode over (inputs, labels) batches. Training's validation and evaluate() use it."""
    import torch

    k = num_classes
    confusion = torch.zeros((k, k), dtype=torch.int64)
    loss_sum = torch.zeros(1, dtype=torch.float64)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum", label_smoothing=label_smoothing)
    module.eval()
    with torch.inference_mode():
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = module(x).float()
            loss_sum += loss_fn(logits, y).item()
            pred = logits.argmax(1).cpu()
            confusion += torch.bincount(y.cpu() * k + pred, minlength=k * k).reshape(k, k)
    return loss_sum, confusion


def evaluate(model, data: str | os.PathLike | None = None, csv: str | os.PathLike | None = None, *,
             batch_size: int = 64, device: str = "auto", num_workers: int | None = None,
             strict: bool = False, max_image_pixels: int | None = None) -> dict:
    """Top-1, loss, per-class accuracy and confusion matrix of a ZooModel (or a run directory)
    on a labelled folder/CSV. The folder may hold only some of the model's classes; a class the
    model does not know is an error listing them. With no data/csv, a run directory is scored on
    the validation split it recorded (a clear error if it has none)."""
    from torch.utils.data import DataLoader

    from . import runs
    from .data import EvalTransform, ImageDataset, align_labels, normalize_batch, read_csv, scan_folder
    from .data import verify_images
    from .model import ZooModel, load_model
    from .options import EvaluateConfig

    run_dir = None if isinstance(model, ZooModel) else Path(model)
    EvaluateConfig(run=str(run_dir or "<model>"), data=None if data is None else os.fspath(data),
                   csv=None if csv is None else os.fspath(csv), batch_size=batch_size, device=device,
                   num_workers=num_workers, strict=strict,
                   **({"max_image_pixels": max_image_pixels} if max_image_pixels else {}))
    model = load_model(run_dir) if run_dir is not None else model
    labels = list(model.labels)
    # the labelled images, indexed by the model's labels
    if data is None and csv is None:
        if run_dir is None:
            raise ZooError("evaluate(model) needs data= or csv= (or pass the run directory, to score its recorded "
                           "validation split)")
        samples, source = runs.recorded_validation(run_dir, labels)
        skipped: list = []
    elif csv is not None:
        samples, skipped = read_csv(csv, root=data, classes=labels, min_classes=1)
        source = os.fspath(csv)
    else:
        samples, skipped = scan_folder(data, min_classes=1)
        samples = align_labels(samples, labels, repr(os.fspath(data)))
        source = os.fspath(data)
    samples, skipped = verify_images(samples, strict, already_skipped=skipped, max_pixels=max_image_pixels)
    # the model over them
    dev = select_device(device)
    norm = model.normalization
    model = model.to(dev)
    workers = num_workers if num_workers is not None else min(4, max(0, (os.cpu_count() or 1) - 1))
    idx = list(range(len(samples)))
    loader = DataLoader(ImageDataset(samples, EvalTransform(norm)),
                        batch_sampler=[idx[i:i + batch_size] for i in range(0, len(idx), batch_size)],
                        num_workers=workers if len(idx) > batch_size else 0)
    batches = ((normalize_batch(images, norm, dev), y) for images, y, _ in loader)
    loss_sum, confusion = score(model, batches, len(labels), dev)
    out = _metrics(float(loss_sum[0]), confusion.numpy())
    out["labels"] = labels
    out["source"] = source
    out["skipped"] = [list(s) for s in skipped]
    return out
