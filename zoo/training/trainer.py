"""_Trainer: one training run, as named phases in execution order (see `run`).

Each phase returns a frozen value (Setup, Data, Built, Inputs, Selection, Fitted) that the next
phases take as arguments; `self` holds only what every phase shares: the config, the run
directory, whether this is a resume, and the user's epoch callback. The fits (cross-validation,
the weight-decay search on a holdout, the main fit, the refit) are one `Fitter.fit(...)` called
with other arguments.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..device import amp_settings, seed_everything, select_device
from ..errors import ZooError
from ..options import TrainConfig
from .evaluation import _metrics, score
from .fit import TUNE_WEIGHT_DECAYS, CVResult, Fitter, FitResult, NonFiniteError, feature_batches
from .inputs import Inputs, hold_out, prepare_inputs


@dataclass(frozen=True)
class Setup:
    device: Any
    ctx: Any  # zoo.distributed.DistContext
    amp_dtype: Any
    use_scaler: bool
    channels_last: bool


@dataclass(frozen=True)
class Data:
    split: Any  # zoo.data.DataSplit
    workers: int


@dataclass(frozen=True)
class Built:
    model: Any  # ZooModel (its head is replaced by a standardized one in prepare_inputs)
    norm: Any
    report: Any  # FreezeReport
    full_freeze: bool


@dataclass(frozen=True)
class Selection:
    """How the kept epoch and the weight decay are chosen, and what the choice was (before the main fit).

    on: "cross-validation" | "holdout" | "last epoch". fit_index / holdout_index: the training rows
    the main fit trains on and scores on (holdout only). cv: the CVResult (cross-validation).
    tuned: the holdout grid's results (holdout with tuning)."""

    on: str
    weight_decay: float
    fit_index: Any
    holdout_index: Any = None
    cv: CVResult | None = None
    tuned: tuple | None = None
    note: str | None = None


@dataclass(frozen=True)
class Fitted:
    main: FitResult
    kept_state: dict | None
    kept_epoch: int
    refit: dict | None


@dataclass(frozen=True)
class RunDir:
    created: bool


class _Trainer:
    """One training run; `run` reads top to bottom as its phases."""

    def __init__(self, cfg: TrainConfig, out: Path | None, resume: bool, on_epoch_end):
        self.cfg, self.out, self.resume, self.on_epoch_end = cfg, out, resume, on_epoch_end

    def run(self):
        t_start = time.perf_counter()
        setup = self._select_device()
        data = self._load_data(setup)  # every data error surfaces before a backbone is built or a file written
        built = self._build_model(setup, data)
        run_dir = self._open_run_dir(setup)
        try:
            inputs = prepare_inputs(self.cfg, setup, data, built)  # cached features or the per-step images
            fitter = self._fitter(setup, inputs)
            selection = self._select(setup, data, built, inputs, fitter)  # CV / holdout: epoch and weight decay
            fitted = self._fit(setup, data, built, inputs, fitter, selection)
        except BaseException:
            self._discard_unstarted_run_dir(setup, run_dir)
            raise
        return self._finish(setup, data, built, inputs, selection, fitted, t_start)

    # ------------------------------------------------------------------ phases
    def _select_device(self) -> Setup:
        import torch

        from .. import distributed as D

        device = select_device(self.cfg.device)
        ctx = D.init_from_env(device.type)
        if ctx.enabled and device.type == "cuda":
            device = torch.device("cuda", ctx.local_rank)
        amp_dtype, use_scaler = amp_settings(device, self.cfg.amp)
        return Setup(device, ctx, amp_dtype, use_scaler, device.type in ("cuda", "cpu"))

    def _load_data(self, setup: Setup) -> Data:
        from ..data import load_data
        from ..features import default_workers, readable_hashes

        cfg = self.cfg
        # Images the cache has seen decode are only hashed, not decoded again (the warm path).
        split = load_data(cfg.data, cfg.csv, cfg.val_data, cfg.val_split, cfg.seed, cfg.strict,
                          csv_outside_root=cfg.csv_outside_root, max_pixels=cfg.max_image_pixels,
                          known_readable=readable_hashes(cfg.cache_dir) if cfg.cache else None,
                          allow_duplicates=cfg.allow_duplicates)
        workers = cfg.num_workers if cfg.num_workers is not None else default_workers(split.train, setup.device)
        return Data(split, workers)

    def _build_model(self, setup: Setup, data: Data) -> Built:
        from ..data import with_image_size
        from ..freezer import freeze, is_fully_frozen
        from ..heads import HeadConfig
        from ..model import build_model

        cfg, split = self.cfg, data.split
        seed_everything(cfg.seed)  # the head's initial weights
        head_cfg = HeadConfig(kind=cfg.head, hidden=tuple(cfg.hidden), dropout=cfg.dropout, norm=cfg.head_norm)
        model = build_model(cfg.backbone, list(split.classes), weights=cfg.weights, head=head_cfg)
        norm = with_image_size(model.meta.normalization, cfg.image_size)
        report = freeze(model, "all" if str(cfg.freeze) == "all" else int(cfg.freeze), bn_adapt=cfg.bn_adapt)
        full_freeze = is_fully_frozen(model)
        model.meta = replace(model.meta, normalization=norm, frozen_groups=None if full_freeze else report.frozen_groups)
        if setup.ctx.is_main and cfg.progress:
            print(f"data: {split.source}: {len(split.train)} train / {len(split.val) if split.val else 0} val "
                  f"images, {len(split.classes)} classes" + (f", {len(split.skipped)} skipped" if split.skipped else ""),
                  file=sys.stderr)
            print(f"model: {model.meta.backbone} ({model.meta.weights or 'random init'}), {report}; device "
                  f"{setup.device}" + (f", amp {str(setup.amp_dtype).replace('torch.', '')}" if setup.amp_dtype else ""),
                  file=sys.stderr)
        return Built(model, norm, report, full_freeze)

    def _open_run_dir(self, setup: Setup) -> RunDir:
        """Create the run directory and write config.json (on resume: with the allowed changes,
        e.g. more epochs, so a later resume sees them)."""
        from .. import runs

        created = False
        if self.out is not None and setup.ctx.is_main:
            created = not self.out.exists()
            runs.prepare(self.out, self.resume)
            runs.write_config(self.out, self.cfg.to_dict())
        return RunDir(created)

    def _discard_unstarted_run_dir(self, setup: Setup, run_dir: RunDir) -> None:
        """A run that fails before its first checkpoint leaves nothing behind (its config.json
        would only block reusing --out)."""
        from .. import runs

        if self.out is None or not setup.ctx.is_main or self.resume or (self.out / runs.CHECKPOINT).exists():
            return
        (self.out / runs.CONFIG).unlink(missing_ok=True)
        if run_dir.created and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()

    def _fitter(self, setup: Setup, inputs: Inputs) -> Fitter:
        # Cached: only the head runs, on fp32 features; autocast would buy nothing and round its
        # logits and gradients to bf16/fp16. Mixed precision is for the backbone's convolutions.
        cfg = self.cfg
        return Fitter(lr=cfg.lr, batch_size=cfg.batch_size, label_smoothing=cfg.label_smoothing, seed=cfg.seed,
                      device=setup.device, amp_dtype=None if inputs.cached else setup.amp_dtype,
                      use_scaler=setup.use_scaler and not inputs.cached, ctx=setup.ctx,
                      cpu_threads=1 if inputs.cached else None)

    def _tunes(self, inputs: Inputs) -> bool:
        cfg = self.cfg
        if cfg.tune == "off" or not inputs.cached:
            return False
        # an MLP costs ~10x a linear head per candidate (784 s vs 42 s measured): --tune asks for it
        return cfg.tune == "on" or cfg.head == "linear"

    def _select(self, setup: Setup, data: Data, built: Built, inputs: Inputs, fitter: Fitter) -> Selection:
        """The choice of the kept epoch and the weight decay, on the training images only.
        Cross-validation (default) on cached features; --holdout F: a stratified holdout, searched
        here for the weight decay; otherwise (no cached features, too few images, --folds 0) the
        last epoch with --weight-decay."""
        import torch

        from .fit import cross_validate, plan_folds

        cfg, split = self.cfg, data.split
        labels = np.asarray(split.train.labels)
        everything = torch.arange(len(labels))
        if cfg.holdout:
            fit_index, holdout_index, note = hold_out(cfg, labels, inputs.cached)
            if holdout_index is None:
                return self._last_epoch(note, everything)
            wd, tuned = cfg.weight_decay, None
            if self._tunes(inputs):
                wd, tuned = self._tune_on_holdout(setup, data, built, inputs, fitter, fit_index, holdout_index)
            return Selection("holdout", wd, fit_index, holdout_index, tuned=tuned)
        if not cfg.folds:
            return Selection("last epoch", cfg.weight_decay, everything)
        if not inputs.cached:
            return self._last_epoch("the last epoch is kept: cross-validation needs cached features (the whole "
                                    "backbone frozen, and --views with --augment)", everything)
        k, note = plan_folds(labels, cfg.folds)
        if k < 2:
            return self._last_epoch(note, everything)
        if note:
            warnings.warn(f"cross-validation: {note}", stacklevel=4)
        grid = TUNE_WEIGHT_DECAYS if self._tunes(inputs) else (cfg.weight_decay,)
        cv = cross_validate(inputs.train_features, labels, num_classes=len(split.classes), head=inputs.initial_head,
                            epochs=cfg.epochs, weight_decays=grid, standardize=cfg.standardize, folds=cfg.folds,
                            fitter=replace(fitter, ctx=None))
        if setup.ctx.is_main and cfg.progress:
            print(f"cv: {cv.folds}-fold top-1 {100 * cv.cv_top1:.1f}% +/- {100 * cv.cv_sd:.1f} (sd over folds) at "
                  f"epoch {cv.epoch}, weight decay {cv.weight_decay:g}", file=sys.stderr)
        return Selection("cross-validation", cv.weight_decay, everything, cv=cv, note=note)

    def _last_epoch(self, note: str | None, everything) -> Selection:
        if note:
            if self.cfg.tune == "on":
                raise ZooError(f"--tune cannot choose a weight decay: {note.split(';')[0]}")
            warnings.warn(note, stacklevel=5)
        return Selection("last epoch", self.cfg.weight_decay, everything, note=note)

    def _tune_on_holdout(self, setup, data, built, inputs, fitter, fit_index, holdout_index):
        """--holdout with tuning: one fit per weight decay in TUNE_WEIGHT_DECAYS on the fit part;
        the one whose best epoch scores highest on the holdout is kept. Not checkpointed; a
        resumed run tunes again (deterministically)."""
        results = []
        for wd in TUNE_WEIGHT_DECAYS:
            head = inputs.fresh_head(fit_index)
            res = self._fit_head(setup, data, inputs, fitter, head, fit_index, wd, self.cfg.epochs,
                                 observe=self._holdout_observer(data, inputs, head, holdout_index),
                                 choose=_holdout_choice)
            results.append({"weight_decay": wd, "holdout_top1": res.kept_score, "holdout_loss": res.kept_loss})
        chosen = max(results, key=lambda r: (r["holdout_top1"], -r["holdout_loss"], r["weight_decay"]))
        if setup.ctx.is_main and self.cfg.progress:
            print(f"tune: weight decay {chosen['weight_decay']:g} (holdout top-1 {100 * chosen['holdout_top1']:.1f}%; "
                  "grid " + ", ".join(f"{r['weight_decay']:g}: {100 * r['holdout_top1']:.1f}%" for r in results) + ")",
                  file=sys.stderr)
        return chosen["weight_decay"], tuple(results)

    def _fit(self, setup: Setup, data: Data, built: Built, inputs: Inputs, fitter: Fitter,
             selection: Selection) -> Fitted:
        """The main fit (checkpointed every epoch, resumable, validation reported, never chosen
        on), then for a holdout the refit on every training image for the chosen epochs."""
        from .. import distributed as D
        from .. import runs

        cfg, model = self.cfg, built.model
        model.head = inputs.fresh_head(selection.fit_index)  # standardized by the fit rows' statistics
        module, params = inputs.train_module(setup)
        resume = None
        if self.resume:
            resume = D.broadcast_object(runs.load_checkpoint(self.out) if setup.ctx.is_main else None)
            if setup.ctx.is_main and cfg.progress:
                print(f"resuming {self.out} after epoch {resume['epoch']}", file=sys.stderr)
        else:
            # Extraction draws from the global RNG only when it extracts (each DataLoader takes a base
            # seed), so a cold and a warm cache would start the loop at different RNG states and give
            # different dropout masks: reseed, so the head's result does not depend on the cache.
            seed_everything(cfg.seed)
        choose, patience = None, 0
        if selection.on == "holdout":
            choose, patience = _holdout_choice, cfg.patience
        elif selection.on == "cross-validation":
            chosen = selection.cv.epoch
            choose = lambda rec: (1.0 if rec["epoch"] == chosen else 0.0, 0.0)  # noqa: E731
        holdout_obs = (self._holdout_observer(data, inputs, model.head, selection.holdout_index)
                       if selection.holdout_index is not None else None)

        def observe(epoch: int) -> dict:
            ho = holdout_obs(epoch) if holdout_obs else {}
            va = self._evaluate(setup, data, built, inputs) if data.split.val is not None else None
            return {"holdout_loss": ho.get("holdout_loss"), "holdout_top1": ho.get("holdout_top1"),
                    "val_loss": va["loss"] if va else None, "val_top1": va["top1"] if va else None,
                    "val_per_class": va["per_class"] if va else None}

        main = fitter.fit(module, params, inputs.batches(setup, data, selection.fit_index, cfg),
                          len(selection.fit_index), weight_decay=selection.weight_decay, epochs=cfg.epochs,
                          snapshot=inputs.snapshot, restore=inputs.restore, observe=observe, choose=choose,
                          patience=patience, resume=resume,
                          checkpoint=(lambda ck: runs.save_checkpoint(self.out, ck))
                          if self.out is not None and setup.ctx.is_main else None,
                          on_epoch_end=self.on_epoch_end, check_finite=self._finite_check(built),
                          progress=cfg.progress)
        kept_state, kept_epoch, refit = main.kept_state, main.kept_epoch, None
        if selection.on == "holdout" and main.kept_epoch:
            # the chosen epochs again, from the same start, on every training image (holdout
            # included), under the same schedule; that head is kept
            head = inputs.fresh_head(selection.fit_index)
            everything = inputs.everything()
            res = self._fit_head(setup, data, inputs, fitter, head, everything, selection.weight_decay,
                                 main.kept_epoch, schedule_epochs=cfg.epochs, check_finite=self._finite_check(built))
            kept_state = res.kept_state
            refit = {"epochs": main.kept_epoch, "images": len(everything)}
        return Fitted(main, kept_state, kept_epoch, refit)

    def _fit_head(self, setup, data, inputs, fitter: Fitter, head, index, weight_decay, epochs, *,
                  schedule_epochs=None, observe=None, choose=None, check_finite=None) -> FitResult:
        """A head-only fit on cached features (holdout tuning and refit): the same Fitter.fit."""
        seed_everything(self.cfg.seed)
        # every rank fits the whole batch itself (no DDP for these few seconds of head training)
        return replace(fitter, ctx=None).fit(head, list(head.parameters()),
                          feature_batches(inputs.train_features, data.split.train.labels, index,
                                          self.cfg.batch_size, self.cfg.seed),
                          len(index), weight_decay=weight_decay, epochs=epochs, schedule_epochs=schedule_epochs,
                          snapshot=lambda: {"head." + k: v.detach().cpu().clone() for k, v in head.state_dict().items()},
                          observe=observe, choose=choose, check_finite=check_finite)

    def _holdout_observer(self, data: Data, inputs: Inputs, head, holdout_index):
        import torch

        labels = torch.as_tensor(data.split.train.labels)

        def observe(epoch: int) -> dict:
            feats = inputs.train_features[0][holdout_index]
            loss_sum, confusion = score(head, [(feats, labels[holdout_index])], len(data.split.classes),
                                        inputs.device, None, self.cfg.label_smoothing)
            m = _metrics(float(loss_sum[0]), confusion.numpy())
            return {"holdout_top1": m["top1"], "holdout_loss": m["loss"]}
        return observe

    def _finite_check(self, built: Built):
        """Stop before a NaN/inf loss or weight is checkpointed or saved: the last good
        checkpoint stays as it is. (The loss is summed over all ranks, the weights are the same
        on every rank, so every rank stops together.)"""
        import torch

        cfg, out, model = self.cfg, self.out, built.model

        def check(epoch: int, loss: float) -> None:
            bad = None
            if not math.isfinite(loss):
                bad = f"the training loss is {loss}"
            else:
                for name, p in model.named_parameters():
                    if p.requires_grad and not bool(torch.isfinite(p).all()):
                        bad = f"parameter {name} holds NaN/inf values"
                        break
            if bad is None:
                return
            kept = (f"the last good checkpoint (epoch {epoch - 1}) is kept in {str(out)!r}"
                    if out is not None and epoch > 1 else "nothing was saved")
            raise NonFiniteError(f"training diverged in epoch {epoch}: {bad} (lr {cfg.lr:g}, weight decay "
                                 f"{cfg.weight_decay:g}); {kept}. Lower --lr, check the data, and start a new run")
        return check

    def _evaluate(self, setup: Setup, data: Data, built: Built, inputs: Inputs) -> dict:
        import torch

        from .. import distributed as D

        val = data.split.val
        module = built.model.head if inputs.cached else built.model
        if inputs.cached:  # every rank holds all val features; evaluation is cheap
            batches = [(inputs.val_features, torch.as_tensor(val.labels))]
        else:
            batches = inputs.val_image_batches(setup, data, self.cfg)
        loss_sum, confusion = score(module, batches, len(data.split.classes), setup.device,
                                    None if inputs.cached else setup.amp_dtype,  # the cached head runs in fp32
                                    self.cfg.label_smoothing)
        if not inputs.cached:
            D.all_reduce_sum(confusion)
            D.all_reduce_sum(loss_sum)
        return _metrics(float(loss_sum[0]), confusion.numpy())

    def _check_engine_predictions(self, built: Built, inputs: Inputs) -> None:
        """Reduced-precision engines: do the trained head's predictions on the engine's check batch
        move against eager fp32 features? Recorded in the run's cache info; a warning if any do."""
        from ..features import head_predictions_agree

        engine = inputs.cache_info.get("engine") or {}
        agree = next((a for a in (head_predictions_agree(built.model.head, s) for s in inputs.feature_stats) if a),
                     None)
        if agree is None or not engine:
            return
        engine["head_predictions_unchanged"] = f"{agree[0]}/{agree[1]}"
        if agree[0] < agree[1] and engine.get("numerics") != "fp32":
            warnings.warn(f"{agree[1] - agree[0]} of {agree[1]} check-batch predictions differ between "
                          f"{engine.get('name')} and eager fp32 features; use --engine channels_last (fp32) "
                          "if that matters", stacklevel=3)

    def _finish(self, setup: Setup, data: Data, built: Built, inputs: Inputs, selection: Selection,
                fitted: Fitted, t_start: float):
        """Keep the chosen epoch's weights, score them, and write the model and its reports."""
        import torch

        from .. import distributed as D
        from .. import runs
        from ..heads import fold_standardization

        cfg, split, model = self.cfg, data.split, built.model
        if fitted.kept_state is not None:
            inputs.restore(fitted.kept_state)
        model.head = fold_standardization(model.head)  # exports, predict and evaluate see a plain head
        if inputs.cached:
            self._check_engine_predictions(built, inputs)
        final = self._evaluate(setup, data, built, inputs) if split.val is not None else {}
        model.eval()
        main = fitted.main
        sel = {"on": selection.on, "weight_decay": selection.weight_decay, "tune": selection.tuned,
               "note": selection.note, "refit": fitted.refit, "standardized": bool(inputs.cached and cfg.standardize),
               "holdout_images": 0 if selection.holdout_index is None else len(selection.holdout_index),
               "holdout_top1": main.kept_score if selection.on == "holdout" else None,
               "cv": selection.cv.to_dict() if selection.cv is not None else None}
        if selection.cv is not None and self._tunes(inputs):
            sel["tune"] = selection.cv.to_dict()["by_weight_decay"]
        extra = dict(model.meta.extra)
        extra["training"] = {"val_top1": final.get("top1"), "val_top1_ci95": final.get("top1_ci95"),
                             "val_interval": final.get("interval"),
                             "val_per_class_recall": dict(zip(split.classes, final.get("per_class") or [])),
                             "best_epoch": fitted.kept_epoch, "epochs_run": len(main.history),
                             "stopped_early": main.stopped_early, "train_images": len(split.train),
                             "val_images": len(split.val) if split.val else 0, "data": split.source, "seed": cfg.seed,
                             "image_size": built.norm.input_size[-1], "selection": sel}
        model.meta = replace(model.meta, extra=extra)
        model.to("cpu")
        if setup.channels_last:
            model.backbone.to(memory_format=torch.contiguous_format)
        run = runs.Run(dir=self.out, model=model, history=list(main.history), best_epoch=fitted.kept_epoch,
                       best_val_top1=final.get("top1") if split.val is not None else None, final=final,
                       config=cfg.to_dict(), freeze_report=built.report, device=str(setup.device),
                       cache=inputs.cache_info, seconds=time.perf_counter() - t_start)
        if self.out is not None and setup.ctx.is_main:
            runs.write_run(self.out, run, split, sel)
        D.barrier()
        return run


def _holdout_choice(rec: dict) -> tuple[float, float]:
    """The holdout's top-1, then its loss."""
    return rec["holdout_top1"], rec["holdout_loss"]
