"""Freeze a ZooModel's backbone, wholly or its first K layer groups, and keep frozen norm layers in eval.

Frozen parameters get ``requires_grad=False``. The optimizer must be built from
:func:`trainable_parameters` only; :func:`check_optimizer` refuses one holding a frozen parameter.

Why a forward pre-hook keeps frozen norm layers in eval
-------------------------------------------------------
``model.train()`` flips ``training`` on every submodule, and so do ``DistributedDataParallel``,
Lightning-style loops and users calling ``model.backbone.train()`` directly. Overriding
``ZooModel.train`` would only cover the first path. Instead every frozen norm layer (BatchNorm and
kin: anything with running statistics, plus GroupNorm/LayerNorm for uniformity) gets a forward
pre-hook that sets ``module.training = False`` right before it runs, whoever flipped it. So a
frozen layer can never update its running stats, however train mode was entered. The hook is a
module-level function (picklable, survives ``copy.deepcopy`` and DDP wrapping) and is removed by
:func:`unfreeze`. The flag is also cleared at freeze time so ``bn.training`` reads False at once.

With a fully frozen backbone the whole backbone is locked the same way (dropout / stochastic depth
inside a fixed feature extractor would only add noise). With a partial freeze the unfrozen layers'
norm layers are locked too unless ``bn_adapt=True``, which lets them update their running stats
(their affine parameters train either way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn as nn

from .errors import ZooError

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


class FreezeError(ZooError, ValueError):
    """Asked to freeze something that does not exist, or an optimizer that holds frozen parameters."""


def _force_eval(module: nn.Module, args) -> None:  # forward pre-hook
    if module.training:
        module.training = False


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or (
        isinstance(getattr(module, "running_mean", None), torch.Tensor) and not list(module.children()))


def is_eval_locked(module: nn.Module) -> bool:
    return any(h is _force_eval for h in module._forward_pre_hooks.values())


def lock_eval(module: nn.Module) -> None:
    """Keep `module` (not its children) in eval mode at every forward, however train() was called."""
    if not is_eval_locked(module):
        module.register_forward_pre_hook(_force_eval)
    module.training = False


def unlock_eval(module: nn.Module) -> None:
    for key in [k for k, h in module._forward_pre_hooks.items() if h is _force_eval]:
        del module._forward_pre_hooks[key]


@dataclass(frozen=True)
class FreezeReport:
    trainable: int
    frozen: int
    frozen_groups: int  # number of layer groups frozen
    total_groups: int
    locked_norm_layers: int

    def __str__(self) -> str:
        total = self.trainable + self.frozen
        return (f"trainable params: {self.trainable:,} / {total:,} (frozen {self.frozen:,}; "
                f"{self.frozen_groups}/{self.total_groups} layer groups frozen; "
                f"{self.locked_norm_layers} norm layers kept in eval)")


def _groups(model) -> Sequence:
    info = getattr(model, "info", None)
    groups = tuple(getattr(info, "layer_groups", ()) or ())
    if not groups:
        from .layers import auto_layer_groups

        groups = tuple(auto_layer_groups(model.backbone))
    return groups


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) element counts over all of `model`."""
    t = f = 0
    for p in model.parameters():
        if p.requires_grad:
            t += p.numel()
        else:
            f += p.numel()
    return t, f


def freeze(model, groups: int | str | None = "all", bn_adapt: bool = False) -> FreezeReport:
    """Freeze `model.backbone` (a ZooModel or anything with .backbone and .head).

    groups: "all" / None: the whole backbone; an int K: the first K layer groups of the backbone
    record (0 = nothing frozen, fine-tune everything). The head is always trainable.
    """
    backbone: nn.Module = model.backbone
    unfreeze(model)
    all_groups = _groups(model)
    if groups in (None, "all"):
        k = len(all_groups)
        frozen_names = {n for n, _ in backbone.named_parameters()}
        full = True
    else:
        try:
            k = int(groups)
        except (TypeError, ValueError):
            raise FreezeError(f"freeze must be 'all' or a number of layer groups, got {groups!r}") from None
        if not 0 <= k <= len(all_groups):
            names = ", ".join(g.name for g in all_groups)
            raise FreezeError(f"cannot freeze {k} layer groups: {getattr(model.meta, 'backbone', 'the backbone')} "
                              f"has {len(all_groups)} ({names}); use 0..{len(all_groups)} or 'all'")
        frozen_names = {p for g in all_groups[:k] for p in g.parameters}
        full = k == len(all_groups) and frozen_names >= {n for n, _ in backbone.named_parameters()}
    for name, p in backbone.named_parameters():
        p.requires_grad_(name not in frozen_names)
    for p in model.head.parameters():
        p.requires_grad_(True)
    locked = 0
    last_param: str | None = None  # the parameter registered just before the current module
    for mod_name, mod in backbone.named_modules():
        own = [f"{mod_name}.{n}" if mod_name else n for n, _ in mod.named_parameters(recurse=False)]
        if full:
            lock_eval(mod)
            locked += is_norm(mod)
        elif is_norm(mod):
            # A norm layer without affine params is frozen when it sits in the frozen prefix.
            frozen = all(n in frozen_names for n in own) if own else (last_param is None or last_param in frozen_names)
            if frozen or not bn_adapt:
                lock_eval(mod)
                locked += 1
        if own:
            last_param = own[-1]
    model._zoo_freeze = {"groups": None if full and groups in (None, "all") else k, "bn_adapt": bn_adapt}
    trainable, frozen_count = parameter_counts(model)
    return FreezeReport(trainable, frozen_count, k, len(all_groups), locked)


def unfreeze(model) -> None:
    """Make every parameter trainable again and remove the eval locks."""
    for p in model.parameters():
        p.requires_grad_(True)
    for mod in model.modules():
        unlock_eval(mod)
    if hasattr(model, "_zoo_freeze"):
        del model._zoo_freeze


def is_fully_frozen(model) -> bool:
    return not any(p.requires_grad for p in model.backbone.parameters())


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def check_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module | None = None) -> None:
    """Refuse an optimizer holding a parameter that is frozen (requires_grad=False): it signals a
    wiring mistake, and decoupled weight decay or a later unfreeze would move a 'frozen' weight."""
    names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    bad = [names.get(id(p), f"<param {tuple(p.shape)}>")
           for group in optimizer.param_groups for p in group["params"] if not p.requires_grad]
    if bad:
        raise FreezeError(f"the optimizer holds {len(bad)} frozen parameters ({', '.join(bad[:4])}...); "
                          "build it from zoo.freezer.trainable_parameters(model)")


def build_optimizer(model: nn.Module, lr: float = 1e-3, weight_decay: float = 1e-4,
                    params: Iterable[nn.Parameter] | None = None) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters only; no weight decay on biases and norm weights."""
    params = list(params) if params is not None else trainable_parameters(model)
    if not params:
        raise FreezeError("nothing to train: every parameter is frozen")
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=lr)
    check_optimizer(opt, model)
    return opt
