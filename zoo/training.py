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
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import ZooError

DEFAULT_BACKBONE = "default"  # the backbone (and offline weights) a plugin declares: zoo.registry.default_backbone


@dataclass
class TrainConfig:
    backbone: str = DEFAULT_BACKBONE
    weights: Any = "default"
    data: str | None = None
    csv: str | None = None
    val_data: str | None = None
    val_split: float = 0.2
    freeze: Any = "all"  # "all" or K layer groups
    bn_adapt: bool = False
    head: str = "linear"
    hidden: tuple = (512,)
    dropout: float = 0.0
    head_norm: str | None = None
    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    batch_size: int = 64
    patience: int = 0  # early stopping: epochs without val improvement; 0 = off
    device: str = "auto"
    amp: str = "auto"  # auto | bf16 | fp16 | off
    seed: int = 0
    strict: bool = False
    cache: bool = True
    cache_dir: str | None = None
    augment: bool = False
    views: int = 0
    image_size: int | None = None
    num_workers: int | None = None
    progress: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "hidden" in d:
            d["hidden"] = tuple(d["hidden"])
        return cls(**d)


# Settings that may differ when resuming (they do not change what is computed, or extend it).
RESUMABLE_OVERRIDES = ("epochs", "device", "num_workers", "progress", "cache_dir", "patience")


def select_device(preference: str = "auto"):
    import torch

    pref = (preference or "auto").lower()
    if pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if pref.startswith("cuda") and not torch.cuda.is_available():
        raise ZooError(f"--device {preference}: no CUDA GPU is visible (torch.cuda.is_available() is False); "
                       "use --device auto or --device cpu")
    if pref == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ZooError("--device mps: Apple MPS is not available here; use --device auto or --device cpu")
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


def train(backbone: str = DEFAULT_BACKBONE, data: str | os.PathLike | None = None, *,
          out: str | os.PathLike | None = None, resume: bool = False,
          on_epoch_end: Callable[[int, dict], None] | None = None, **options) -> "Run":  # noqa: F821
    """Train a classifier head; returns a zoo.runs.Run (model, history, metrics, run dir).

    backbone: qualified name (default: the one a plugin declares; timm/tf_efficientnet_lite0.in1k,
    offline ImageNet weights, with the built-ins).
    data: image folder with one subfolder per class; None (and no csv) = the embedded
    Fashion-MNIST sample. options: any TrainConfig field (csv, val_data, val_split, freeze,
    head, hidden, epochs, lr, batch_size, device, seed, strict, cache, augment, views,
    image_size, ...). out: run directory (None: nothing is written). resume: continue the run
    in `out` with its saved config (only epochs/device/workers/progress/patience may change).
    on_epoch_end(epoch, record): called after each epoch's checkpoint is written (an exception
    raised there stops the run; `resume=True` continues it).
    """
    unknown = set(options) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise TypeError(f"train() got unknown options {sorted(unknown)}")
    from . import runs

    if resume:
        if out is None:
            raise ZooError("resume needs the run directory (--out DIR)")
        runs.prepare(out, resume=True)
        saved = TrainConfig.from_dict(runs.read_config(out))
        overrides = {k: v for k, v in options.items() if k in RESUMABLE_OVERRIDES}
        cfg = replace(saved, **overrides)
    else:
        if backbone == DEFAULT_BACKBONE:
            from .registry import default_backbone

            backbone = default_backbone(with_tag=options.get("weights", "default") == "default")
        cfg = TrainConfig(backbone=backbone, data=None if data is None else os.fspath(data), **options)
    return _Trainer(cfg, Path(out) if out is not None else None, resume, on_epoch_end).run()


class _Trainer:
    def __init__(self, cfg: TrainConfig, out: Path | None, resume: bool, on_epoch_end):
        self.cfg, self.out, self.resume, self.on_epoch_end = cfg, out, resume, on_epoch_end

    # ------------------------------------------------------------------ setup
    def run(self):
        import torch

        from . import distributed as D
        from . import runs
        from .data import EvalTransform, TrainTransform, load_data, with_image_size
        from .freezer import build_optimizer, freeze, is_fully_frozen
        from .heads import HeadConfig
        from .model import build_model

        cfg = self.cfg
        t_start = time.perf_counter()
        if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
            raise ZooError(f"epochs, batch size and lr must be positive (got {cfg.epochs}, {cfg.batch_size}, {cfg.lr})")
        if cfg.views < 0:
            raise ZooError(f"--views must be >= 0, got {cfg.views}")
        if cfg.views and not cfg.augment:
            raise ZooError("--views N pre-draws N augmented views per image; it needs --augment")
        device = select_device(cfg.device)
        ctx = D.init_from_env(device.type)
        if ctx.enabled and device.type == "cuda":
            device = torch.device("cuda", ctx.local_rank)
        # Data first: every data error surfaces before a backbone is built or a file written.
        split = load_data(cfg.data, cfg.csv, cfg.val_data, cfg.val_split, cfg.seed, cfg.strict)
        if self.out is not None and ctx.is_main:
            runs.prepare(self.out, self.resume)
            if not self.resume:
                runs.write_config(self.out, cfg.to_dict())
        seed_everything(cfg.seed)
        head_cfg = HeadConfig(kind=cfg.head, hidden=tuple(cfg.hidden), dropout=cfg.dropout, norm=cfg.head_norm)
        model = build_model(cfg.backbone, list(split.classes), weights=cfg.weights, head=head_cfg)
        norm = with_image_size(model.meta.normalization, cfg.image_size)
        report = freeze(model, "all" if str(cfg.freeze) == "all" else int(cfg.freeze), bn_adapt=cfg.bn_adapt)
        full_freeze = is_fully_frozen(model)
        model.meta = replace(model.meta, normalization=norm, frozen_groups=None if full_freeze else report.frozen_groups)
        amp_dtype, use_scaler = amp_settings(device, cfg.amp)
        channels_last = device.type in ("cuda", "cpu")
        workers = cfg.num_workers
        if workers is None:
            in_memory = not any(isinstance(i, (str, os.PathLike)) for i in split.train.items[:1])
            workers = 0 if in_memory else min(4, max(0, (os.cpu_count() or 1) - 1))
        if ctx.is_main and cfg.progress:
            print(f"data: {split.source}: {len(split.train)} train / {len(split.val) if split.val else 0} val "
                  f"images, {len(split.classes)} classes" + (f", {len(split.skipped)} skipped" if split.skipped else ""),
                  file=sys.stderr)
            print(f"model: {model.meta.backbone} ({model.meta.weights or 'random init'}), {report}; device {device}"
                  + (f", amp {str(amp_dtype).replace('torch.', '')}" if amp_dtype else ""), file=sys.stderr)

        eval_tf = EvalTransform(norm)
        train_tf = TrainTransform(norm) if cfg.augment else eval_tf
        cached = full_freeze and (not cfg.augment or cfg.views > 0)
        self.cache_info: dict = {}
        model.to(device)
        if channels_last:
            model.backbone.to(memory_format=torch.channels_last)
        if cached:
            from .features import cached_features, state_digest

            key = {"backbone": model.meta.backbone, "weights": model.meta.weights,
                   "state": state_digest(model.backbone),
                   "precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "float32"}
            common = dict(device=device, cache=cfg.cache, cache_dir=cfg.cache_dir, batch_size=max(cfg.batch_size, 64),
                          num_workers=workers, amp_dtype=amp_dtype, channels_last=channels_last, progress=cfg.progress)
            views = list(range(cfg.views)) if cfg.augment else [None]
            train_feats, s1 = cached_features(model.backbone, split.train, train_tf, norm,
                                              key_fields=dict(key, transform=train_tf.describe(),
                                                              view_seed=cfg.seed if cfg.augment else None),
                                              views=views, view_seed=cfg.seed, desc="train features", **common)
            val_feats = None
            s1h = {"hits": s1.hits, "misses": s1.misses}
            if split.val is not None:
                val_feats, s2 = cached_features(model.backbone, split.val, eval_tf, norm,
                                                key_fields=dict(key, transform=eval_tf.describe(), view_seed=None),
                                                desc="val features", **common)
                s1h = {"hits": s1.hits + s2.hits, "misses": s1.misses + s2.misses}
                val_feats = val_feats[0]
            self.cache_info = dict(s1h, enabled=cfg.cache, seconds=round(s1.seconds + (s2.seconds if split.val else 0), 3))
            self.features = (train_feats, val_feats)
            trainable_module = model.head
        else:
            if cfg.views:
                warnings.warn("--views is ignored: feature caching needs the whole backbone frozen", stacklevel=2)
            # Fully frozen but augmented: the backbone runs every step, without autograd (see
            # _train_epoch); only the head is trained and wrapped by DDP.
            trainable_module = model.head if full_freeze else model
        model.head.to(device)

        train_module = trainable_module
        if ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            train_module = DDP(trainable_module, device_ids=[device.index] if device.type == "cuda" else None)
        optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
        steps_per_epoch = math.ceil(len(split.train) / cfg.batch_size)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine(steps_per_epoch * cfg.epochs))
        scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        self.__dict__.update(model=model, split=split, device=device, ctx=ctx, optimizer=optimizer,
                             scheduler=scheduler, scaler=scaler, amp_dtype=amp_dtype, cached=cached,
                             train_module=train_module, channels_last=channels_last, workers=workers,
                             eval_tf=eval_tf, train_tf=train_tf, norm=norm, report=report,
                             frozen_backbone_step=full_freeze and not cached)
        history: list[dict] = []
        best = {"epoch": 0, "top1": -1.0, "loss": math.inf, "state": None}
        start_epoch, stale = 1, 0
        if self.resume:
            ck = D.broadcast_object(runs.load_checkpoint(self.out) if ctx.is_main else None)
            self._load_trainable(ck["trainable"])
            optimizer.load_state_dict(ck["optimizer"])
            scheduler.load_state_dict(ck["scheduler"])
            scheduler.lr_lambdas[0] = _cosine(steps_per_epoch * cfg.epochs)  # epochs may have been extended
            scheduler.base_lrs = [cfg.lr for _ in scheduler.base_lrs]
            if ck.get("scaler"):
                scaler.load_state_dict(ck["scaler"])
            torch.set_rng_state(ck["rng"])
            history = list(ck["history"])
            best = {"epoch": ck["best_epoch"], "top1": ck["best_top1"], "loss": ck.get("best_loss", math.inf),
                    "state": ck["best_state"]}
            start_epoch, stale = ck["epoch"] + 1, ck["stale"]
            if ctx.is_main and cfg.progress:
                print(f"resuming {self.out} after epoch {ck['epoch']}", file=sys.stderr)

        from tqdm.auto import tqdm

        bar = tqdm(range(start_epoch, cfg.epochs + 1), desc="epochs", disable=not (cfg.progress and ctx.is_main),
                   dynamic_ncols=True, leave=False, initial=start_epoch - 1, total=cfg.epochs)
        stopped_early = False
        for epoch in bar:
            if cfg.patience and stale >= cfg.patience:
                stopped_early = True
                break
            t0 = time.perf_counter()
            tr = self._train_epoch(epoch)
            va = self._evaluate() if split.val is not None else None
            rec = {"epoch": epoch, "train_loss": tr["loss"], "train_top1": tr["top1"],
                   "val_loss": va["loss"] if va else None, "val_top1": va["top1"] if va else None,
                   "val_per_class": va["per_class"] if va else None,
                   "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - t0, 3)}
            history.append(rec)
            score = va["top1"] if va else tr["top1"]
            loss = va["loss"] if va else tr["loss"]
            if score > best["top1"] or (score == best["top1"] and loss < best["loss"]):
                best = {"epoch": epoch, "top1": score, "loss": loss, "state": self._trainable_state()}
                stale = 0
            else:
                stale += 1
            bar.set_postfix(loss=f"{tr['loss']:.3f}", val=f"{100 * va['top1']:.1f}%" if va else "-")
            if self.out is not None and ctx.is_main:
                runs.save_checkpoint(self.out, {
                    "epoch": epoch, "trainable": self._trainable_state(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if use_scaler else None, "rng": torch.get_rng_state(),
                    "history": history, "best_epoch": best["epoch"], "best_top1": best["top1"],
                    "best_loss": best["loss"], "best_state": best["state"], "stale": stale})
            D.barrier()
            if self.on_epoch_end is not None:
                self.on_epoch_end(epoch, rec)
        bar.close()
        if cfg.patience and stale >= cfg.patience and len(history) < cfg.epochs:
            stopped_early = True
        if best["state"] is not None:
            self._load_trainable(best["state"])
        final = self._evaluate() if split.val is not None else {}
        model.eval()
        extra = dict(model.meta.extra)
        extra["training"] = {"val_top1": final.get("top1"), "best_epoch": best["epoch"], "epochs_run": len(history),
                             "stopped_early": stopped_early, "train_images": len(split.train),
                             "val_images": len(split.val) if split.val else 0, "data": split.source,
                             "seed": cfg.seed, "image_size": norm.input_size[-1]}
        model.meta = replace(model.meta, extra=extra)
        model.to("cpu")
        if channels_last:
            model.backbone.to(memory_format=torch.contiguous_format)
        run = runs.Run(dir=self.out, model=model, history=history, best_epoch=best["epoch"],
                       best_val_top1=best["top1"] if split.val is not None else None, final=final,
                       config=cfg.to_dict(), freeze_report=report, device=str(device), cache=self.cache_info,
                       seconds=time.perf_counter() - t_start)
        if self.out is not None and ctx.is_main:
            from .model import save_model

            runs.write_history(self.out, history, {k: v for k, v in final.items()}
                               | {"best_epoch": best["epoch"], "labels": list(split.classes),
                                  "skipped": [list(s) for s in split.skipped]})
            runs.plot_curves(self.out, history)
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

        for gb in D.global_batches(len(self.split.train), self.cfg.batch_size, self.cfg.seed, epoch):
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
            source = ((view[torch.as_tensor(mine)], labels_all[torch.as_tensor(mine)], len(gb))
                      for gb, mine in self._batches(epoch))
        else:
            source = self._image_batches(epoch)
        for x, y, global_len in source:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
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
        n = len(self.split.train)
        return {"loss": float(loss_sum[0]) / n, "top1": float(loss_sum[1]) / n}

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
        k = len(self.split.classes)
        confusion = torch.zeros((k, k), dtype=torch.int64)
        loss_sum = torch.zeros(1, dtype=torch.float64)
        loss_fn = self._loss_fn()
        module = self.model.head if self.cached else self.model
        module.eval()
        with torch.inference_mode():
            if self.cached:  # every rank holds all val features; evaluation is cheap
                batches = [(self.features[1], torch.as_tensor(val.labels))]
            else:
                batches = self._val_image_batches()
            for x, y in batches:
                x, y = x.to(self.device), y.to(self.device)
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    logits = module(x).float()
                loss_sum += loss_fn(logits, y).item()
                pred = logits.argmax(1).cpu()
                confusion += torch.bincount(y.cpu() * k + pred, minlength=k * k).reshape(k, k)
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


def evaluate(model, data: str | os.PathLike | None = None, csv: str | os.PathLike | None = None, *,
             batch_size: int = 64, device: str = "auto", num_workers: int | None = None,
             strict: bool = False) -> dict:
    """Top-1, loss, per-class accuracy and confusion matrix of a ZooModel on a labelled folder/CSV
    (class names must be among the model's labels). data=None and csv=None: the embedded val set."""
    import torch
    from torch.utils.data import DataLoader

    from .data import EvalTransform, ImageDataset, Samples, embedded_samples, normalize_batch, read_csv, scan_folder
    from .data import verify_images
    from .errors import DataError

    labels = list(model.labels)
    if data is None and csv is None:
        samples = embedded_samples()[1]
        skipped: list = []
    elif csv is not None:
        samples, skipped = read_csv(csv, root=data, classes=labels)
    else:
        samples, skipped = scan_folder(data)
        unknown = [c for c in samples.classes if c not in labels]
        if unknown:
            raise DataError(f"{str(data)!r} has class folders {unknown} the model does not know; its labels are "
                            f"{labels}")
        remap = np.array([labels.index(c) for c in samples.classes])
        samples = Samples(samples.items, remap[samples.labels], tuple(labels))
    samples, skipped = verify_images(samples, strict, already_skipped=skipped)
    dev = select_device(device)
    norm = model.normalization
    model = model.to(dev).eval()
    k = len(labels)
    workers = num_workers if num_workers is not None else min(4, max(0, (os.cpu_count() or 1) - 1))
    idx = list(range(len(samples)))
    loader = DataLoader(ImageDataset(samples, EvalTransform(norm)),
                        batch_sampler=[idx[i:i + batch_size] for i in range(0, len(idx), batch_size)],
                        num_workers=workers if len(idx) > batch_size else 0)
    confusion = torch.zeros((k, k), dtype=torch.int64)
    loss_sum = 0.0
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    with torch.inference_mode():
        for images, y, _ in loader:
            logits = model(normalize_batch(images, norm, dev)).float().cpu()
            loss_sum += float(loss_fn(logits, y))
            confusion += torch.bincount(y * k + logits.argmax(1), minlength=k * k).reshape(k, k)
    out = _metrics(loss_sum, confusion.numpy())
    out["labels"] = labels
    out["skipped"] = [list(s) for s in skipped]
    return out
