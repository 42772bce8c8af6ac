"""zoo.freezer: what is frozen stays bit-identical, frozen BatchNorm never drifts, the optimizer only
ever holds trainable parameters, partial freezing trains exactly the intended layer groups."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from trainhelpers import BACKBONE, state_of
from zoo.freezer import (FreezeError, build_optimizer, check_optimizer, freeze, is_eval_locked,
                         is_fully_frozen, trainable_parameters, unfreeze)
from zoo.heads import HeadConfig
from zoo.model import build_model


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(BACKBONE, 3, weights=None, head=HeadConfig(kind="mlp", hidden=(16,), norm="batchnorm"))


def _steps(model, n=3, call_train=True, seed=0):
    """A few real optimizer steps on random 32px images, model.train() before each, like an epoch loop."""
    g = torch.Generator().manual_seed(seed)
    opt = build_optimizer(model, lr=1e-2)
    for _ in range(n):
        if call_train:
            model.train()
        x = torch.randn(6, 3, 32, 32, generator=g) * 2 + 0.5  # stats far from the running ones
        y = torch.randint(0, 3, (6,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _bn_stats(module):
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}


def test_full_freeze_keeps_backbone_bit_identical_and_bn_stats_unchanged(model):
    before = state_of(model.backbone)
    head_before = state_of(model.head)
    report = freeze(model)
    assert is_fully_frozen(model)
    assert report.trainable == sum(p.numel() for p in model.head.parameters())
    assert report.frozen == sum(p.numel() for p in model.backbone.parameters())
    assert "trainable params" in str(report)
    _steps(model)
    after = state_of(model.backbone)
    assert before.keys() == after.keys()
    for k in before:  # parameters and BN running stats / num_batches_tracked alike
        assert torch.equal(before[k], after[k]), k
    # the head did train, including its own BatchNorm's running stats
    assert any(not torch.equal(head_before[k], v) for k, v in state_of(model.head).items())
    assert model.head.training  # the head is in train mode; the backbone's modules are not
    assert not any(m.training for m in model.backbone.modules())


def test_control_requires_grad_alone_lets_bn_drift(model):
    """The negative control: requires_grad=False without the freezer's eval lock does not protect
    running stats, so the test above can fail."""
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    before = _bn_stats(model.backbone)
    _steps(model)
    after = _bn_stats(model.backbone)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_lock_survives_direct_backbone_train_and_deepcopy(model):
    freeze(model)
    clone = copy.deepcopy(model)
    for m in (model, clone):
        before = _bn_stats(m.backbone)
        m.backbone.train()  # not via ZooModel: the hook still holds
        m.backbone(torch.randn(4, 3, 32, 32) * 3)
        assert all(torch.equal(before[k], v) for k, v in _bn_stats(m.backbone).items())
        assert is_eval_locked(m.backbone.bn1)


def test_optimizer_holds_only_trainable_and_check_refuses_frozen(model):
    freeze(model)
    opt = build_optimizer(model)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.head.parameters()}
    assert held == {id(p) for p in trainable_parameters(model)}
    bad = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(FreezeError, match="frozen parameters.*conv1.weight"):
        check_optimizer(bad, model)


@pytest.mark.parametrize("k", [2, 4])
def test_partial_freeze_trains_exactly_the_intended_groups(model, k):
    groups = model.info.layer_groups
    before = state_of(model)
    report = freeze(model, k)
    assert report.frozen_groups == k and not is_fully_frozen(model)
    frozen = {p for g in groups[:k] for p in g.parameters}
    for name, p in model.backbone.named_parameters():
        assert p.requires_grad == (name not in frozen), name
    _steps(model)
    after = state_of(model)
    for g_index, g in enumerate(groups):
        changed = [not torch.equal(before[f"backbone.{p}"], after[f"backbone.{p}"]) for p in g.parameters]
        if g_index < k:
            assert not any(changed), f"frozen group {g.name} moved"
        else:
            assert any(changed), f"trainable group {g.name} did not train"
    # default: every backbone BN stays in eval (stats unchanged), frozen or not
    bn_keys = [n for n in before if n.startswith("backbone.") and "running" in n]
    assert all(torch.equal(before[n], after[n]) for n in bn_keys)


def test_bn_adapt_lets_only_unfrozen_bn_update(model):
    groups = model.info.layer_groups
    before = state_of(model.backbone)
    freeze(model, 2, bn_adapt=True)
    _steps(model)
    after = state_of(model.backbone)
    frozen_prefixes = tuple(p.rsplit(".", 1)[0] + "." for g in groups[:2] for p in g.parameters)
    for n in before:
        if "running_mean" not in n:
            continue
        moved = not torch.equal(before[n], after[n])
        assert moved != n.startswith(frozen_prefixes), n


def test_freeze_errors_and_unfreeze(model):
    n = len(model.info.layer_groups)
    with pytest.raises(FreezeError, match=f"has {n}.*0..{n}"):
        freeze(model, n + 1)
    with pytest.raises(FreezeError, match="'all' or a number"):
        freeze(model, "some")
    freeze(model)
    unfreeze(model)
    assert all(p.requires_grad for p in model.parameters())
    assert not any(is_eval_locked(m) for m in model.modules())
    freeze(model, 0)  # nothing frozen: fine-tune everything
    assert all(p.requires_grad for p in model.parameters())
