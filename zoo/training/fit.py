"""Fitting a head (or the unfrozen part of a model): one `Fitter.fit` serves the main run, the
weight-decay search, the refit and cross-validation, with other arguments each time.

A `Fitter` is frozen: the settings every fit of a run shares (lr, batch size, label smoothing,
seed, device, mixed precision). `fit(...)` builds its own optimizer, per-step cosine schedule and
scaler, runs the epoch loop, and returns a frozen `FitResult`; nothing it computes is left on an
object for a later phase to read.

`cross_validate(features, labels, ...)` chooses the epoch and the weight decay by stratified k-fold
cross-validation on in-memory (cached) features; `CVResult` is what it returns.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ZooError


class NonFiniteError(ZooError):
    """Training produced a NaN or infinite loss or weight."""


def _cosine(total_steps: int):
    def f(step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))
    return f


# The weight-decay grid (AdamW, decoupled, lr 1e-3 by default). It reaches 10 because standardized
# features want strong decay: on Fashion-MNIST lite0 features 0..0.1 tied on the holdout and only
# ~10 improved it (+1 point), as scikit-learn's chosen C does for its logistic regression.
TUNE_WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0, 10.0)


@dataclass(frozen=True)
class FitResult:
    """What one fit returns. `kept_state` is the trainable state of the kept epoch (`kept_epoch`):
    the best by `choose` when one was given, else the last epoch run."""

    history: tuple[dict, ...]
    kept_epoch: int
    kept_score: float
    kept_loss: float
    kept_state: dict | None
    stopped_early: bool


Batches = Callable[[int], Iterable[tuple[Any, Any, int]]]  # epoch -> (inputs, labels, global batch length)


@dataclass(frozen=True)
class Fitter:
    """The settings every fit of a run shares. `ctx`: a zoo.distributed.DistContext (None: one
    process)."""

    lr: float
    batch_size: int
    label_smoothing: float = 0.0
    seed: int = 0
    device: Any = "cpu"
    amp_dtype: Any = None
    use_scaler: bool = False
    ctx: Any = None
    # Intra-op threads while fitting on the CPU (None: torch's setting). A head on cached features
    # runs ops on (64, D) tensors, far too small to split: one thread avoids waiting on descheduled
    # siblings (on a loaded 2-core machine a (64, 1280) subtraction took 11 ms with 2 threads,
    # 0.2 ms with 1).
    cpu_threads: int | None = None

    def fit(self, module, params: Sequence, batches: Batches, n_items: int, *, weight_decay: float,
            epochs: int, schedule_epochs: int | None = None, snapshot: Callable[[], dict],
            observe: Callable[[int], dict] | None = None,
            choose: Callable[[dict], tuple[float, float]] | None = None,
            patience: int = 0, resume: dict | None = None, restore: Callable[[dict], None] | None = None,
            checkpoint: Callable[[dict], None] | None = None,
            on_epoch_end: Callable[[int, dict], None] | None = None,
            check_finite: Callable[[int, float], None] | None = None,
            lr_mults: Sequence[float] | None = None, progress: bool = False) -> FitResult:
        """Train `module` (forward on the batches' inputs) over `params` (a list of parameters,
        or of optimizer param groups: dicts with "params" and an optional "lr_mult") for epochs
        1..`epochs`, the cosine schedule spanning `schedule_epochs` (default `epochs`).

        batches(epoch) yields (x, y, global batch length) for this rank. After each epoch,
        observe(epoch) returns the scores to record (e.g. {"holdout_top1", "holdout_loss",
        "val_top1", ...}); choose(record) -> (score, loss) ranks epochs (highest score, then
        lowest loss; the first such epoch is kept); without `choose` the last epoch is kept.
        patience: stop after that many epochs without improvement (0: off).
        snapshot() returns the trainable state to keep; restore(state) loads one (resume).
        resume: a checkpoint dict written by this method's `checkpoint` callback.
        check_finite(epoch, loss) raises on a diverged epoch, before anything is checkpointed."""
        with _cpu_threads(self.cpu_threads if getattr(self.device, "type", str(self.device)) == "cpu" else None):
            return self._fit(module, params, batches, n_items, weight_decay=weight_decay, epochs=epochs,
                             schedule_epochs=schedule_epochs, snapshot=snapshot, observe=observe, choose=choose,
                             patience=patience, resume=resume, restore=restore, checkpoint=checkpoint,
                             on_epoch_end=on_epoch_end, check_finite=check_finite, lr_mults=lr_mults,
                             progress=progress)

    def _fit(self, module, params, batches, n_items, *, weight_decay, epochs, schedule_epochs, snapshot, observe,
             choose, patience, resume, restore, checkpoint, on_epoch_end, check_finite, lr_mults,
             progress) -> FitResult:
        import torch
        from tqdm.auto import tqdm

        from .. import distributed as D

        optimizer = _optimizer(params, self.lr, weight_decay, lr_mults)
        per_epoch = math.ceil(n_items / self.batch_size)
        total_steps = per_epoch * (schedule_epochs or epochs)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine(total_steps))
        device_type = getattr(self.device, "type", str(self.device))
        scaler = torch.amp.GradScaler(device_type, enabled=self.use_scaler)
        history: list[dict] = []
        kept = (0, -math.inf, math.inf)  # epoch, score, loss
        kept_state = None
        stale, first = 0, 1
        if resume is not None:
            if restore is not None:
                restore(resume["trainable"])
            optimizer.load_state_dict(resume["optimizer"])
            scheduler.load_state_dict(resume["scheduler"])
            scheduler.lr_lambdas[0] = _cosine(total_steps)  # epochs may have been extended
            scheduler.base_lrs = [g.get("initial_lr", self.lr) for g in optimizer.param_groups]
            if resume.get("scaler"):
                scaler.load_state_dict(resume["scaler"])
            torch.set_rng_state(resume["rng"])
            history = list(resume["history"])
            kept = (resume["best_epoch"], resume["best_top1"], resume.get("best_loss", math.inf))
            kept_state, stale, first = resume["best_state"], resume["stale"], resume["epoch"] + 1
        is_main = self.ctx is None or self.ctx.is_main
        bar = tqdm(range(first, epochs + 1), desc="epochs", disable=not (progress and is_main), dynamic_ncols=True,
                   leave=False, initial=first - 1, total=epochs)
        stopped_early = False
        loss_fn = torch.nn.CrossEntropyLoss(reduction="sum", label_smoothing=self.label_smoothing)
        world = self.ctx.world_size if self.ctx is not None else 1
        for epoch in bar:
            if patience and stale >= patience:
                stopped_early = True
                break
            t0 = _now()
            try:
                tr = self._epoch(module, optimizer, scheduler, scaler, loss_fn, batches(epoch), n_items, world)
            except RuntimeError as exc:  # torch refuses a step whose numbers overflow float32
                if "overflow" not in str(exc):
                    raise
                tr = {"loss": math.inf, "top1": 0.0}
            if check_finite is not None:
                check_finite(epoch, tr["loss"])
            rec = {"epoch": epoch, "train_loss": tr["loss"], "train_top1": tr["top1"]}
            rec |= observe(epoch) if observe is not None else {}
            rec |= {"lr": optimizer.param_groups[0]["lr"], "seconds": round(_now() - t0, 3)}
            history.append(rec)
            score, loss = choose(rec) if choose is not None else (float(epoch), 0.0)
            if score > kept[1] or (score == kept[1] and loss < kept[2]):
                kept, kept_state, stale = (epoch, score, loss), snapshot(), 0
            else:
                stale += 1
            if checkpoint is not None:
                checkpoint({"epoch": epoch, "trainable": snapshot(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(),
                            "scaler": scaler.state_dict() if self.use_scaler else None, "rng": torch.get_rng_state(),
                            "history": history, "best_epoch": kept[0], "best_top1": kept[1], "best_loss": kept[2],
                            "best_state": kept_state, "stale": stale})
            D.barrier()
            if on_epoch_end is not None:
                on_epoch_end(epoch, rec)
        bar.close()
        if patience and stale >= patience and len(history) < epochs:
            stopped_early = True
        return FitResult(tuple(history), kept[0], kept[1], kept[2], kept_state, stopped_early)

    def _epoch(self, module, optimizer, scheduler, scaler, loss_fn, source, n_items: int, world: int) -> dict:
        import torch

        from .. import distributed as D

        device = self.device
        device_type = getattr(device, "type", str(device))
        module.train()  # frozen norm layers stay in eval: zoo.freezer's hooks
        sums = torch.zeros(2, dtype=torch.float64)  # loss, correct
        for x, y, global_len in source:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device_type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                logits = module(x)
                loss = loss_fn(logits.float(), y)
            # Sum over this rank's slice, scaled so DDP's gradient average is the global-batch mean.
            scaled = loss * (world / global_len)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(scaled).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            sums += torch.tensor([loss.item(), (logits.argmax(1) == y).sum().item()], dtype=torch.float64)
        D.all_reduce_sum(sums)
        return {"loss": float(sums[0]) / n_items, "top1": float(sums[1]) / n_items}


@contextlib.contextmanager
def _cpu_threads(n: int | None):
    import torch

    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _now() -> float:
    import time

    return time.perf_counter()


def _optimizer(params, lr: float, weight_decay: float, lr_mults: Sequence[float] | None = None):
    """AdamW; no weight decay on biases and norm weights. `params`: parameters, or groups (dicts
    with "params" and an optional "lr_mult", the per-group learning-rate multiplier)."""
    import torch

    params = list(params)
    groups_in = params if params and isinstance(params[0], dict) else [{"params": params}]
    groups = []
    for g in groups_in:
        ps = [p for p in g["params"] if p.requires_grad]
        lr_g = lr * float(g.get("lr_mult", 1.0))
        decay = [p for p in ps if p.ndim > 1]
        no_decay = [p for p in ps if p.ndim <= 1]
        if decay:
            groups.append({"params": decay, "weight_decay": weight_decay, "lr": lr_g})
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0, "lr": lr_g})
    if not groups:
        from ..freezer import FreezeError

        raise FreezeError("nothing to train: every parameter is frozen")
    return torch.optim.AdamW(groups, lr=lr)


def feature_batches(features, labels, index, batch_size: int, seed: int, ctx=None) -> Batches:
    """Batches over cached features: epoch e reads view (e - 1) % views of `features` (V, N, D) at
    the rows `index`, in the global-batch order of zoo.distributed (the same on every rank)."""
    import torch

    from .. import distributed as D

    index = torch.as_tensor(index)
    labels = torch.as_tensor(labels)

    def batches(epoch: int):
        view = features[(epoch - 1) % features.shape[0]]
        for gb in D.global_batches(len(index), batch_size, seed, epoch):
            mine = torch.as_tensor(D.rank_slice(gb, ctx) if ctx is not None else gb)
            rows = index[mine]
            yield view[rows], labels[rows], len(gb)
    return batches


# ----------------------------------------------------------------------------- cross-validation


@dataclass(frozen=True)
class CVResult:
    """Cross-validated choice of the epoch and the weight decay on cached features.

    epoch, weight_decay: the choice. cv_top1 / cv_sd: the chosen setting's mean fold top-1 and its
    standard deviation over folds (ddof 1). fold_top1: each fold's top-1 at the choice.
    folds: the folds used (`folds_note` says why fewer than asked, else None). grid: one row per
    (weight_decay, epoch): {"weight_decay", "epoch", "cv_top1", "cv_loss", "fold_top1"} where
    cv_top1 is the mean over folds. rule: the choice rule in words (checkable on `grid`)."""

    epoch: int
    weight_decay: float
    cv_top1: float
    cv_sd: float
    fold_top1: tuple[float, ...]
    folds: int
    folds_requested: int
    folds_note: str | None
    images: int
    grid: tuple[dict, ...] = field(repr=False)
    rule: str = ("highest mean fold top-1; ties: lowest mean fold loss, then the largest weight decay, "
                 "then the fewest epochs")

    def interval(self) -> list[float] | None:
        """A 95% Wilson interval for the CV estimate: every training image is scored exactly once
        out of fold, so the pooled estimate is a proportion over `images`."""
        from .evaluation import wilson_interval

        ci = wilson_interval(round(self.cv_top1 * self.images), self.images)
        return list(ci) if ci else None

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "weight_decay": self.weight_decay, "cv_top1": self.cv_top1,
                "cv_sd": self.cv_sd, "fold_top1": list(self.fold_top1), "folds": self.folds,
                "folds_requested": self.folds_requested, "folds_note": self.folds_note, "images": self.images,
                "rule": self.rule, "cv_top1_ci95": self.interval(),
                "cv_interval": "Wilson score, 95%, on the pooled out-of-fold predictions (each image scored once)",
                "weight_decays": sorted({r["weight_decay"] for r in self.grid}),
                "by_weight_decay": [r for r in self.grid if r["epoch"] == self.epoch]}


def choose_from_grid(grid: Sequence[dict]) -> dict:
    """The CV rule: highest mean fold top-1; ties: lowest mean fold loss, then the largest weight
    decay (the simpler model), then the fewest epochs."""
    return max(grid, key=lambda r: (r["cv_top1"], -r["cv_loss"], r["weight_decay"], -r["epoch"]))


def plan_folds(labels, folds: int) -> tuple[int, str | None]:
    """(folds to use, why fewer than asked or None): stratified k-fold needs every class to have
    at least k images."""
    counts = np.bincount(np.asarray(labels))
    counts = counts[counts > 0]
    smallest = int(counts.min()) if len(counts) else 0
    k = min(folds, smallest)
    if k < 2:
        return 0, (f"cross-validation needs at least 2 images in every class (the smallest has {smallest}); "
                   "the last epoch is kept with the given weight decay")
    if k < folds:
        return k, f"{k} folds, not {folds}: the smallest class has {smallest} training images"
    return k, None


def stratified_folds(labels, folds: int, seed: int = 0) -> list[np.ndarray]:
    """Each class's images shuffled with `seed` and dealt round-robin into `folds` folds (so
    every fold holds floor or ceil of n_c / folds of each class). Returns the sorted validation
    indices of each fold."""
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, 104729])  # its own stream: the val split is drawn elsewhere
    out: list[list[int]] = [[] for _ in range(folds)]
    offset = 0
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        for j, i in enumerate(idx):
            out[(j + offset) % folds].append(int(i))
        offset += len(idx)  # rotate where each class starts, so fold sizes stay balanced
    return [np.sort(np.asarray(f, dtype=np.int64)) for f in out]


def cross_validate(features, labels, *, num_classes: int | None = None, head: Any = None, lr: float = 1e-3,
                   epochs: int = 20, batch_size: int = 64, weight_decays: Sequence[float] = TUNE_WEIGHT_DECAYS,
                   label_smoothing: float = 0.0, standardize: bool = True, folds: int = 5, seed: int = 0,
                   device: Any = "cpu", progress: bool = False,
                   fitter: Fitter | None = None) -> CVResult:
    """Choose the epoch and the weight decay by stratified k-fold cross-validation on cached features.

    features: (N, D) or (V, N, D) float tensor (V cached views: epoch e trains on view (e-1) % V;
    each fold is scored on view 0). labels: (N,) ints. num_classes: default max(label) + 1.
    head: a zoo.heads.HeadConfig (default linear), or an nn.Module whose current weights are every
    fit's start (the trainer passes its seeded head). With `standardize`, each fold's head is
    trained on features standardized by that fold's training statistics only.
    For each weight decay in `weight_decays` and each fold, one head is trained for `epochs`
    epochs (AdamW, lr, per-step cosine schedule, batch_size, label_smoothing; the same Fitter.fit
    as zoo.train) from the same start and scored on the fold after every epoch; the choice is
    `choose_from_grid` over the mean fold scores. folds: default 5; fewer when a class has fewer
    images (CVResult.folds_note says so); fewer than 2 raises ZooError (use plan_folds first).
    fitter: the run's Fitter (its lr/batch/seed/device win over the arguments above).
    Deterministic under `seed`. Returns CVResult."""
    import copy

    import torch

    from ..device import seed_everything
    from ..heads import HeadConfig, build_head, feature_statistics, standardized

    feats = torch.as_tensor(features)
    if feats.ndim == 2:
        feats = feats.unsqueeze(0)
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    n = feats.shape[1]
    if len(labels_t) != n:
        raise ZooError(f"cross_validate: {n} feature rows but {len(labels_t)} labels")
    k_classes = int(num_classes or int(labels_t.max()) + 1)
    k, note = plan_folds(labels_t.numpy(), folds)
    if k < 2:
        raise ZooError(note or "cross-validation needs at least 2 folds")
    fitter = fitter or Fitter(lr=lr, batch_size=batch_size, label_smoothing=label_smoothing, seed=seed,
                              device=torch.device(device) if isinstance(device, str) else device, cpu_threads=1)
    dev = fitter.device
    if isinstance(head, torch.nn.Module):
        start = head
    else:
        seed_everything(fitter.seed)
        start = build_head(feats.shape[-1], k_classes, head or HeadConfig())
    fold_val = stratified_folds(labels_t.numpy(), k, fitter.seed)
    from .evaluation import score as score_loop

    # curves[wd][fold] = [(top1, loss) per epoch]
    rows: dict[tuple[float, int], list[tuple[float, float, int]]] = {}
    linear = _plain_linear(start)
    if linear is not None:  # every (weight decay, fold) head at once: the same fits, batched
        with _cpu_threads(fitter.cpu_threads if getattr(dev, "type", str(dev)) == "cpu" else None):
            curves = _batched_linear_cv(feats, labels_t, fold_val, weight_decays, epochs, fitter, standardize,
                                        linear, k_classes)
        for wd in weight_decays:
            for f in range(k):
                for e, rec in enumerate(curves[(wd, f)], start=1):
                    rows.setdefault((wd, e), []).append(rec)
            if progress:
                _say_best(wd, rows, epochs)
    for wd in weight_decays if linear is None else ():
        for f, val_idx in enumerate(fold_val):
            mask = np.ones(n, dtype=bool)
            mask[val_idx] = False
            fit_idx = torch.as_tensor(np.flatnonzero(mask))
            model = copy.deepcopy(start)
            if standardize:
                mean, std = feature_statistics(feats[:, fit_idx])
                model = standardized(model, mean, std)
            model.to(dev)
            vx, vy = feats[0][torch.as_tensor(val_idx)], labels_t[torch.as_tensor(val_idx)]

            def observe(epoch: int, model=model, vx=vx, vy=vy) -> dict:
                loss_sum, confusion = score_loop(model, [(vx, vy)], k_classes, dev, None, fitter.label_smoothing)
                cm = confusion.numpy()
                return {"fold_top1": float(np.trace(cm) / max(1, cm.sum())),
                        "fold_loss": float(loss_sum[0]) / max(1, len(vy)), "fold_count": len(vy)}

            seed_everything(fitter.seed)
            result = fitter.fit(model, list(model.parameters()),
                                feature_batches(feats, labels_t, fit_idx, fitter.batch_size, fitter.seed),
                                len(fit_idx), weight_decay=wd, epochs=epochs, snapshot=dict, observe=observe,
                                progress=False)
            for rec in result.history:
                rows.setdefault((wd, rec["epoch"]), []).append((rec["fold_top1"], rec["fold_loss"], rec["fold_count"]))
        if progress:
            _say_best(wd, rows, epochs)
    grid = tuple({"weight_decay": wd, "epoch": e, "cv_top1": float(np.mean([t for t, _, _ in r])),
                  "cv_loss": float(np.mean([lo for _, lo, _ in r])), "fold_top1": [t for t, _, _ in r]}
                 for (wd, e), r in rows.items())
    chosen = choose_from_grid(grid)
    fold_top1 = tuple(chosen["fold_top1"])
    return CVResult(epoch=chosen["epoch"], weight_decay=chosen["weight_decay"], cv_top1=chosen["cv_top1"],
                    cv_sd=float(np.std(fold_top1, ddof=1)) if len(fold_top1) > 1 else 0.0, fold_top1=fold_top1,
                    folds=k, folds_requested=folds, folds_note=note, images=n, grid=grid)


def _say_best(wd: float, rows: dict, epochs: int) -> None:
    import sys

    best = max(float(np.mean([t for t, _, _ in rows[(wd, e)]])) for e in range(1, epochs + 1))
    print(f"cv: weight decay {wd:g}: best mean fold top-1 {100 * best:.1f}%", file=sys.stderr)


def _plain_linear(head: Any):
    """The head's one Linear when that is all it is (no dropout, norm or hidden layer: nothing
    random or stateful that a batched fit would have to reproduce), else None."""
    import torch.nn as nn

    layers = [m for m in head.modules() if not isinstance(m, nn.Sequential)]
    return layers[0] if len(layers) == 1 and isinstance(layers[0], nn.Linear) else None


def _batched_linear_cv(feats, labels_t, fold_val, weight_decays, epochs: int, fitter: Fitter, standardize: bool,
                       linear, k_classes: int) -> dict[tuple[float, int], list[tuple[float, float, int]]]:
    """Cross-validation of a linear head as one batched fit: every (weight decay, fold) head is a
    slice of one (M, C, D) weight, trained by the same steps Fitter.fit takes for it alone (the
    fold's own standardization and batch order, AdamW with decoupled decay on the weight only, the
    per-step cosine schedule, label smoothing, mean loss per batch) and scored on its fold after
    every epoch. Why: 9 decays x 5 folds of tiny (64, D) steps cost a Python-and-dispatch overhead
    each (11-15 s for 200 images); batched, one step serves them all. Folds are grouped by their
    size (the batch order depends on it). Returns {(wd, fold): [(top1, loss, count) per epoch]}."""
    import torch
    import torch.nn.functional as F

    from .. import distributed as D
    from ..heads import feature_statistics

    dev, n, views = fitter.device, feats.shape[1], feats.shape[0]
    fits = []
    for val_idx in fold_val:
        mask = np.ones(n, dtype=bool)
        mask[val_idx] = False
        fits.append(np.flatnonzero(mask))
    by_size: dict[int, list[int]] = {}
    for f, fit in enumerate(fits):
        by_size.setdefault(len(fit), []).append(f)
    out: dict[tuple[float, int], list[tuple[float, float, int]]] = {}
    for size, group in by_size.items():
        # head m = (fold g, decay w) at g * len(weight_decays) + w: a fold's rows are gathered and
        # standardized once per step for all its decays, whose weights sit side by side
        g_n, w_n = len(group), len(weight_decays)
        models = [(wd, f) for f in group for wd in weight_decays]
        m = len(models)
        mean = std = None
        if standardize:
            st = [feature_statistics(feats[:, torch.as_tensor(fits[f])]) for f in group]
            mean = torch.stack([a for a, _ in st]).to(dev).unsqueeze(1)  # (G, 1, D)
            std = torch.stack([b for _, b in st]).to(dev).unsqueeze(1)
        weight = linear.weight.detach().float().to(dev).unsqueeze(0).repeat(m, 1, 1).requires_grad_()
        bias = linear.bias.detach().float().to(dev).unsqueeze(0).repeat(m, 1).requires_grad_()
        optimizer = torch.optim.AdamW([weight, bias], lr=fitter.lr, weight_decay=0.0)  # decay: below, per head
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine(math.ceil(size / fitter.batch_size) * epochs))
        decay = torch.tensor([wd for wd, _ in models], dtype=torch.float32, device=dev).view(m, 1, 1)
        fit_rows = torch.as_tensor(np.stack([fits[f] for f in group]))  # (G, size)
        val_rows = torch.as_tensor(np.stack([fold_val[f] for f in group]))  # (G, n - size)
        val_x = feats[0][val_rows].to(dev)
        val_y = labels_t[val_rows].to(dev).unsqueeze(1).expand(-1, w_n, -1).reshape(m, -1)

        def logits(x):  # x (G, B, D) -> (M, B, C)
            if mean is not None:
                x = (x - mean) / std
            z = torch.baddbmm(bias.view(g_n, 1, -1), x, weight.view(g_n, w_n * k_classes, -1).transpose(1, 2))
            return z.view(g_n, -1, w_n, k_classes).transpose(1, 2).reshape(m, -1, k_classes)

        for epoch in range(1, epochs + 1):
            view = feats[(epoch - 1) % views]
            for gb in D.global_batches(size, fitter.batch_size, fitter.seed, epoch):
                rows = fit_rows[:, torch.as_tensor(gb)]
                x = view[rows].to(dev)
                y = labels_t[rows].to(dev).unsqueeze(1).expand(-1, w_n, -1).reshape(m, -1)
                loss = F.cross_entropy(logits(x).reshape(-1, k_classes), y.reshape(-1), reduction="sum",
                                       label_smoothing=fitter.label_smoothing) / len(gb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                with torch.no_grad():  # AdamW's decoupled decay, at this step's lr, before its update
                    weight.mul_(1 - optimizer.param_groups[0]["lr"] * decay)
                optimizer.step()
                scheduler.step()
            with torch.inference_mode():
                z = logits(val_x)
                ce = F.cross_entropy(z.reshape(-1, k_classes), val_y.reshape(-1), reduction="none",
                                     label_smoothing=fitter.label_smoothing).view(m, -1).double().sum(1)
                correct = (z.argmax(2) == val_y).sum(1)
            count = val_rows.shape[1]
            for j, key in enumerate(models):
                out.setdefault(key, []).append((float(correct[j]) / max(1, count), float(ce[j]) / max(1, count),
                                                count))
    return out
