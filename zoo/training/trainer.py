"""_Trainer: one training run, as named phases in execution order (see `run`)."""

from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..device import amp_settings, seed_everything, select_device
from ..errors import ZooError
from ..options import TrainConfig
from .evaluation import _metrics, score
from .fit import TUNE_WEIGHT_DECAYS, NonFiniteError, _cosine, _FitState
from .inputs import MIN_HOLDOUT_IMAGES, extract_features


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

        from .. import distributed as D

        device = select_device(self.cfg.device)
        self.ctx = D.init_from_env(device.type)
        if self.ctx.enabled and device.type == "cuda":
            device = torch.device("cuda", self.ctx.local_rank)
        self.device = device
        self.amp_dtype, self.use_scaler = amp_settings(device, self.cfg.amp)
        self.channels_last = device.type in ("cuda", "cpu")

    def _load_data(self) -> None:
        from ..data import load_data
        from ..features import default_workers, readable_hashes

        cfg = self.cfg
        # Images the cache has seen decode are only hashed, not decoded again (the warm path).
        self.split = load_data(cfg.data, cfg.csv, cfg.val_data, cfg.val_split, cfg.seed, cfg.strict,
                               csv_outside_root=cfg.csv_outside_root, max_pixels=cfg.max_image_pixels,
                               known_readable=readable_hashes(cfg.cache_dir) if cfg.cache else None)
        self.workers = cfg.num_workers if cfg.num_workers is not None else default_workers(self.split.train,
                                                                                           self.device)

    def _build_model(self) -> None:
        from ..data import with_image_size
        from ..freezer import freeze, is_fully_frozen
        from ..heads import HeadConfig
        from ..model import build_model

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
        from .. import runs

        self.created_dir = False
        if self.out is not None and self.ctx.is_main:
            self.created_dir = not self.out.exists()
            runs.prepare(self.out, self.resume)
            runs.write_config(self.out, self.cfg.to_dict())

    def _discard_unstarted_run_dir(self) -> None:
        """A run that fails before its first checkpoint leaves nothing behind (its config.json
        would only block reusing --out)."""
        from .. import runs

        if self.out is None or not self.ctx.is_main or self.resume or (self.out / runs.CHECKPOINT).exists():
            return
        (self.out / runs.CONFIG).unlink(missing_ok=True)
        if self.created_dir and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()

    def _prepare_inputs(self) -> None:
        """Move the model to the device and decide the path: cached features (extracted here) or
        images through the model every step."""
        import torch

        from ..data import EvalTransform, TrainTransform

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
            self.features, self.cache_info, self.feature_stats = extract_features(
                self.model, self.split, cfg, self.train_tf, self.eval_tf, self.norm, device=self.device,
                amp_dtype=self.amp_dtype, workers=self.workers, channels_last=self.channels_last)
        elif cfg.views:
            warnings.warn("--views is ignored: feature caching needs the whole backbone frozen", stacklevel=3)
        self._hold_out()
        if self.cached and cfg.standardize:
            from ..heads import feature_statistics, standardized

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
    def _build_optimization(self) -> None:
        import torch

        from ..freezer import build_optimizer

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

        from .. import distributed as D
        from .. import runs

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

        from .. import distributed as D

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

        from .. import runs

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
        from ..features import head_predictions_agree

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

        from .. import distributed as D
        from .. import runs

        cfg, split, model = self.cfg, self.split, self.model
        if state.best_state is not None:
            self._load_trainable(state.best_state)
        from ..heads import fold_standardization

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
            from ..model import save_model

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
        from .. import distributed as D

        for gb in D.global_batches(len(self.fit_index), self.cfg.batch_size, self.cfg.seed, epoch):
            yield gb, D.rank_slice(gb, self.ctx)

    def _train_epoch(self, epoch: int) -> dict:
        import torch

        from .. import distributed as D

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

        from ..data import ImageDataset, normalize_batch, sample_seed

        plan = [(gb, mine) for gb, mine in self._batches(epoch)]
        keyed = [[(int(i), sample_seed(self.cfg.seed, epoch, int(i))) if self.cfg.augment else int(i) for i in mine]
                 for _, mine in plan]
        loader = DataLoader(ImageDataset(self.split.train, self.train_tf), batch_sampler=keyed,
                            num_workers=self.workers, pin_memory=self.device.type == "cuda")
        for (gb, _), (images, labels, _) in zip(plan, loader):
            yield normalize_batch(images, self.norm, self.device, self.channels_last), labels, len(gb)

    def _evaluate(self) -> dict:
        import torch

        from .. import distributed as D

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

        from .. import distributed as D
        from ..data import ImageDataset, normalize_batch

        mine = D.shard_indices(len(self.split.val), self.ctx).tolist()
        bs = max(self.cfg.batch_size, 64)
        loader = DataLoader(ImageDataset(self.split.val, self.eval_tf),
                            batch_sampler=[mine[i:i + bs] for i in range(0, len(mine), bs)],
                            num_workers=self.workers, pin_memory=self.device.type == "cuda")
        for images, labels, _ in loader:
            yield normalize_batch(images, self.norm, self.device, self.channels_last), labels
