"""Extraction engines: each is checked against eager fp32 on the first batch, a failing one is
rejected (with its reason) for the next, `auto` probes once and remembers its choice, and the
cache key follows the engine's numerics."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from zoo.features import engines as E
from zoo.data import EvalTransform, Samples
from zoo.features import cached_features
from zoo.records import Normalization

NORM = Normalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), (3, 24, 24), 24)


def tiny_backbone(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():
        m[1].running_mean.uniform_(-0.1, 0.1)
        m[1].running_var.uniform_(0.5, 1.5)
    return m.eval()


def tiny_samples(n: int = 20, seed: int = 0) -> Samples:
    rng = np.random.default_rng(seed)
    return Samples([rng.integers(0, 256, (24, 24, 3), dtype=np.uint8) for _ in range(n)], np.arange(n) % 2,
                   ("a", "b"))


def batch(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 3, 24, 24, generator=torch.Generator().manual_seed(1))


def quiet(msg):
    pass


@pytest.mark.parametrize("name", ["eager", "channels_last", "onnxruntime"])
def test_fp32_engines_pass_their_check_on_cpu(tmp_path, name):
    m = tiny_backbone()
    x = batch()
    with torch.inference_mode():
        ref = m(x)
    sel = E.select(name, m, x, torch.device("cpu"), allow_reduced=False, total=10, cache_root=tmp_path,
                   choice_key="k", say=quiet)
    assert sel.engine.name == name and sel.how == "asked" and not sel.rejected
    assert sel.cosine_min >= E.FP32_COSINE
    with torch.inference_mode():
        again = sel.engine.run(x).float().cpu()
    assert torch.allclose(again, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not E.bf16_supported(torch.device("cpu")), reason="no native CPU bf16 here")
def test_bf16_engine_stays_within_its_documented_bound():
    m = tiny_backbone()
    sel = E.select("bf16", m, batch(), torch.device("cpu"), allow_reduced=True, total=10, cache_root=None,
                   choice_key="k", say=quiet)
    assert sel.engine.name == "bf16" and sel.engine.numerics == "bf16"
    assert E.BF16_COSINE <= sel.cosine_min < 1.0  # it is checked, and it really is lower precision


def _broken(name_to_break, how="noise"):
    def prep(name, backbone, example, device, **kw):
        eng = E.prepare(name, backbone, example, device, **kw)
        if name != name_to_break:
            return eng
        if how == "raise":
            raise RuntimeError("cannot build this engine here")
        run = eng.run
        eng.run = lambda x: run(x) + 0.5 * torch.randn_like(run(x))  # wrong features, right shape
        return eng
    return prep


def test_an_engine_that_fails_its_check_is_rejected_for_eager(tmp_path):
    said = []
    sel = E.select("channels_last", tiny_backbone(), batch(), torch.device("cpu"), allow_reduced=False, total=10,
                   cache_root=tmp_path, choice_key="k", say=said.append, _prepare=_broken("channels_last"))
    assert sel.engine.name == "eager" and "channels_last" in sel.rejected
    assert "disagree" in sel.rejected["channels_last"]
    assert any("rejected" in s and "eager" in s for s in said)


def test_auto_skips_a_broken_engine_and_remembers_the_fastest(tmp_path):
    calls = []

    def prep(name, backbone, example, device, **kw):
        calls.append(name)
        eng = _broken("channels_last")(name, backbone, example, device, **kw)
        if name == "onnxruntime":  # make it clearly the slowest
            run = eng.run
            eng.run = lambda x: (time.sleep(0.3), run(x))[1]
        return eng

    m, x, cpu = tiny_backbone(), batch(), torch.device("cpu")
    sel = E.select("auto", m, x, cpu, allow_reduced=False, total=5000, cache_root=tmp_path, choice_key="key",
                   say=quiet, _prepare=prep)
    assert sel.how == "probe" and sel.engine.name == "eager"
    assert "channels_last" in sel.rejected and set(sel.rates) == {"eager", "onnxruntime"}
    stored = json.loads((tmp_path / "engines" / "choices.json").read_text())
    assert stored["key"]["engine"] == "eager"
    calls.clear()
    again = E.select("auto", m, x, cpu, allow_reduced=False, total=5000, cache_root=tmp_path, choice_key="key",
                     say=quiet, _prepare=prep)
    assert again.how == "remembered" and again.engine.name == "eager" and not again.rates
    assert "onnxruntime" not in calls  # no second probe
    small = E.select("auto", m, x, cpu, allow_reduced=False, total=50, cache_root=tmp_path, choice_key="other",
                     say=quiet, _prepare=prep)
    assert small.engine.name == "eager" and "channels_last" in small.rejected  # small job: no probe, still checked
    remembered = E.select("auto", m, x, cpu, allow_reduced=False, total=50, cache_root=tmp_path, choice_key="key",
                          say=quiet, _prepare=prep)
    assert remembered.how == "remembered"  # a remembered choice serves small jobs too


def test_only_the_probing_rank_probes_the_others_use_the_remembered_choice(tmp_path):
    m, x, cpu = tiny_backbone(), batch(), torch.device("cpu")
    common = dict(allow_reduced=False, total=5000, cache_root=tmp_path, choice_key="key", say=quiet)
    other = E.select("auto", m, x, cpu, may_probe=False, **common)  # rank 1 before anything is remembered
    assert other.engine.name == "channels_last" and not other.rates and other.cosine_min >= E.FP32_COSINE
    assert not (tmp_path / "engines" / "choices.json").exists()
    first = E.select("auto", m, x, cpu, **common)  # rank 0 probes and remembers
    assert first.how == "probe" and len(first.rates) >= 2
    later = E.select("auto", m, x, cpu, may_probe=False, **common)
    assert later.how == "remembered" and later.engine.name == first.engine.name


def test_an_engine_that_cannot_be_built_is_rejected_with_its_reason(tmp_path):
    sel = E.select("onnxruntime", tiny_backbone(), batch(), torch.device("cpu"), allow_reduced=False, total=10,
                   cache_root=tmp_path, choice_key="k", say=quiet, _prepare=_broken("onnxruntime", "raise"))
    assert sel.engine.name == "eager" and "cannot build" in sel.rejected["onnxruntime"]


def test_nan_features_from_eager_are_an_error_not_a_choice():
    from zoo.errors import ZooError

    m = tiny_backbone()
    with torch.no_grad():
        m[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ZooError, match="NaN"):
        E.select("auto", m, batch(), torch.device("cpu"), allow_reduced=False, total=10, cache_root=None,
                 choice_key="k", say=quiet)


def _features(tmp_path, engine, **kw):
    s = tiny_samples()
    return cached_features(tiny_backbone(), s, EvalTransform(NORM), NORM, key_fields={"backbone": "tiny"},
                           device=torch.device("cpu"), cache_dir=tmp_path / "cache", batch_size=8, num_workers=0,
                           engine=engine, **kw)


def test_cache_key_follows_the_engines_numerics(tmp_path):
    f1, s1 = _features(tmp_path, "channels_last")
    assert s1.misses == 20 and s1.engine["name"] == "channels_last" and s1.engine["numerics"] == "fp32"
    f2, s2 = _features(tmp_path, "onnxruntime")  # another fp32 engine: same numerics, same cache entries
    assert s2.hits == 20 and s2.misses == 0 and torch.equal(f1, f2)
    dirs = list((tmp_path / "cache" / "features").iterdir())
    assert len(dirs) == 1 and json.loads((dirs[0] / "key.json").read_text())["numerics"] == "fp32"
    if not E.bf16_supported(torch.device("cpu")):
        pytest.skip("no native CPU bf16 here")
    f3, s3 = _features(tmp_path, "bf16")  # bf16 features are never served from (or to) the fp32 entries
    assert s3.misses == 20 and s3.engine["numerics"] == "bf16"
    assert len(list((tmp_path / "cache" / "features").iterdir())) == 2
    assert not torch.equal(f1, f3) and float(E.row_cosine(f1[0], f3[0]).min()) >= E.BF16_COSINE
