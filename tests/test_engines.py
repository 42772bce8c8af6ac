"""Extraction engines: each is checked against eager fp32 on the first batch, a failing one is
rejected (with its reason) for the next, `auto` probes once and remembers its choice, and the
cache key follows the engine's numerics."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from zoo.data import EvalTransform, Samples
from zoo.features import cached_features
from zoo.features import engines as E
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
        if how == "raise on run":
            def fail(x):
                raise RuntimeError("this engine fails on a real batch")
            eng.run = fail
            return eng
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
    # this machine exported this architecture before in no time: an export pays on 5000 images
    E.ChoiceStore(tmp_path).put_prepare_seconds("onnxruntime", type(m).__qualname__, "", 0.0)
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


@pytest.mark.parametrize("broken", [None, "noise", "raise on run"])
def test_the_first_batchs_engine_is_checked_on_that_batch_and_a_failure_never_reaches_the_output(tmp_path, broken):
    """The probe's first engine is checked on the first batch's own rows (not run on them beforehand):
    when it disagrees with eager, or raises on that batch, that batch's features come from the next
    engine, never from it. broken=None is the control: the same engine passes and its output is kept."""
    m, cpu = tiny_backbone(), torch.device("cpu")
    ran = []

    def prep(name, backbone, example, device, **kw):
        eng = _broken("channels_last" if broken else None, broken or "noise")(name, backbone, example, device, **kw)
        run = eng.run
        eng.run = lambda x, _run=run, _name=name: (ran.append((_name, len(x))), _run(x))[1]
        return eng

    ch = E.Chooser("auto", m, cpu, allow_reduced=False, total=50, cache_root=tmp_path, choice_key="k", say=quiet,
                   _prepare=prep)
    x = batch(16)
    with torch.inference_mode():
        want = m.eval()(x).flatten(1)
    got = ch.run(x)
    assert torch.allclose(got, want, atol=1e-5), "the first batch's features are not eager's"
    assert ("channels_last", E.FP32_CHECK_ROWS) not in ran  # no separate run on the check rows
    assert ran[:2] == [("eager", E.FP32_CHECK_ROWS), ("channels_last", 16)]
    if broken:
        why = "disagree with eager" if broken == "noise" else "fails on a real batch"
        assert why in ch.rejected["channels_last"] and ch.engine_name != "channels_last"
        ran.clear()
        assert torch.allclose(ch.run(x), want, atol=1e-5)
        assert all(name != "channels_last" for name, _ in ran)  # a rejected engine runs no later batch
    else:
        assert "channels_last" not in ch.rejected and ch.engine_name == "channels_last"


@pytest.mark.parametrize("broken", [None, "noise", "raise on run"])
@pytest.mark.parametrize("path", ["asked", "remembered"])
def test_an_asked_or_remembered_engine_is_checked_on_its_first_batch_and_a_failure_falls_back_to_eager(
        tmp_path, path, broken):
    """An engine asked for (or remembered) is checked, like the probe's first, on the first batch's own
    rows: no run of its own on the check rows. When it disagrees with eager, or raises on that batch,
    that batch and the job's others come from eager, said so; broken=None is the control: it is
    kept, and its check rows' features (the selection's) are the ones its batch gave."""
    m, cpu, said, ran = tiny_backbone(), torch.device("cpu"), [], []

    def prep(name, backbone, example, device, **kw):
        eng = _broken("channels_last" if broken else None, broken or "noise")(name, backbone, example, device, **kw)
        run = eng.run
        eng.run = lambda x, _run=run, _name=name: (ran.append((_name, len(x))), _run(x))[1]
        return eng

    if path == "remembered":
        E.ChoiceStore(tmp_path).put("k", "channels_last", {"channels_last": 100.0})
    ch = E.Chooser("channels_last" if path == "asked" else "auto", m, cpu, allow_reduced=False, total=50,
                   cache_root=tmp_path, choice_key="k", say=said.append, _prepare=prep)
    x = batch(16)
    with torch.inference_mode():
        want = m.eval()(x).flatten(1)
    got = ch.run(x)
    assert torch.allclose(got, want, atol=1e-5), "the first batch's features are not eager's"
    assert ran[:2] == [("eager", E.FP32_CHECK_ROWS), ("channels_last", 16)]  # no separate run on the check rows
    sel = ch.selection
    if broken:
        assert sel.engine.name == "eager" and sel.how == f"{path}, fallback"
        assert ("disagree with eager" if broken == "noise" else "fails on a real batch") in sel.rejected["channels_last"]
        assert ran[2:] == [("eager", 16)]  # the batch again, from eager
        assert any("channels_last rejected" in s and "using eager" in s for s in said) == (path == "asked")
        ran.clear()
        assert torch.allclose(ch.run(x), want, atol=1e-5) and ran == [("eager", 16)]
    else:
        assert sel.engine.name == "channels_last" and sel.how == path and not sel.rejected
        assert sel.cosine_min >= E.FP32_COSINE and len(ran) == 2
        assert torch.equal(sel.features, got[:E.FP32_CHECK_ROWS])
        assert any(s.startswith("engine: channels_last") for s in said)


@pytest.mark.parametrize("split", [True, False])
def test_an_engine_ready_within_the_first_batch_takes_over_its_second_part(tmp_path, monkeypatch, split):
    """On a CPU, while a preparation runs beside, a probing job runs each batch in parts of
    PROBE_ROWS rows, so an export that is ready after the cheap engine's first part runs the rest
    of that batch.
    split=False is the control: with parts as large as the batch the cheap engine runs all of it."""
    if not split:
        monkeypatch.setattr(E, "PROBE_ROWS", 1000)
    clock, gate = FakeClock(), threading.Event()
    prep, _ = fake_engines(clock, rates={**RATES, "onnxruntime": 100.0}, gate=gate, opens="channels_last")
    rows: dict[str, int] = {}

    def counting(name, *a, **kw):
        eng = prep(name, *a, **kw)
        run = eng.run

        def counted(x):
            rows[name] = rows.get(name, 0) + len(x)
            f = run(x)
            if name == "channels_last" and ch._pending is not None:  # as on a real machine: the export,
                ch._pending[1].join(10)  # started beside this part, is done by the end of it
            return f
        eng.run = counted
        return eng

    m = tiny_backbone()
    E.ChoiceStore(tmp_path).put_prepare_seconds("onnxruntime", type(m).__qualname__, "", 0.5)
    ch = E.Chooser("auto", m, torch.device("cpu"), allow_reduced=False, total=5000, cache_root=tmp_path,
                   choice_key="k", say=quiet, _prepare=counting, _clock=clock)
    x = batch(64)
    got = ch.run(x)
    with torch.inference_mode():
        assert torch.allclose(got, m.eval()(x).flatten(1), atol=1e-5)  # the parts in order, each right
    if split:
        # the cheap engine's first part beside the export, then the export's engine: the check rows and the rest
        assert rows["channels_last"] == E.PROBE_ROWS and rows["onnxruntime"] == E.FP32_CHECK_ROWS + 64 - E.PROBE_ROWS
    else:
        assert rows["channels_last"] == 64 and "onnxruntime" not in rows


def test_only_the_probing_rank_probes_the_others_use_the_remembered_choice(tmp_path):
    m, x, cpu = tiny_backbone(), batch(), torch.device("cpu")
    E.ChoiceStore(tmp_path).put_prepare_seconds("onnxruntime", type(m).__qualname__, "", 0.0)
    common = dict(allow_reduced=False, total=5000, cache_root=tmp_path, choice_key="key", say=quiet)
    other = E.select("auto", m, x, cpu, may_probe=False, **common)  # rank 1 before anything is remembered
    assert other.engine.name == "channels_last" and not other.rates and other.cosine_min >= E.FP32_COSINE
    assert E.ChoiceStore(tmp_path).get("key") is None  # nothing remembered by a rank that does not probe
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


def test_a_costly_engine_is_prepared_only_when_the_job_pays_for_it(tmp_path):
    prepared = []

    def prep(name, *a, **kw):
        prepared.append(name)
        return E.prepare(name, *a, **kw)

    m, x, cpu = tiny_backbone(), batch(), torch.device("cpu")
    store = E.ChoiceStore(tmp_path)
    store.put_prepare_seconds("onnxruntime", type(m).__qualname__, "", 1e6)  # an export here costs forever
    sel = E.select("auto", m, x, cpu, allow_reduced=False, total=5000, cache_root=tmp_path, choice_key="a",
                   say=quiet, _prepare=prep)
    assert "onnxruntime" not in prepared and "would cost this job more" in sel.rejected["onnxruntime"]
    assert sel.engine.name in ("channels_last", "eager") and "channels_last" in sel.rates
    store.put_prepare_seconds("onnxruntime", type(m).__qualname__, "", 0.0)
    big = E.select("auto", m, x, cpu, allow_reduced=False, total=10 ** 7, cache_root=tmp_path, choice_key="b",
                   say=quiet, _prepare=prep)
    assert "onnxruntime" in prepared and "onnxruntime" in big.rates  # timed on the job's own batches


def test_the_probe_computes_no_batch_twice(tmp_path):
    """auto's timed batches are the job's output: the backbone sees each image once, plus the
    eager reference rows and each candidate's check rows."""
    seen = [0]
    m = tiny_backbone()
    m.register_forward_pre_hook(lambda mod, args: seen.__setitem__(0, seen[0] + len(args[0])))
    s = tiny_samples(64)
    feats, stats = cached_features(m, s, EvalTransform(NORM), NORM, key_fields={"backbone": "tiny"},
                                   device=torch.device("cpu"), cache_dir=tmp_path / "cache", batch_size=8,
                                   num_workers=0, engine="auto")
    assert stats.misses == 64 and stats.engine["how"] == "probe" and len(stats.engine["rates"]) >= 2
    assert 64 < seen[0] <= 64 + 4 * E.CHECK_ROWS  # reference + checks + the final check-row run
    with torch.inference_mode():
        ref = m.to(memory_format=torch.contiguous_format)(
            torch.stack([torch.from_numpy(EvalTransform(NORM)(s.load(i))) for i in range(64)]).permute(0, 3, 1, 2)
            .float().div(255).sub(0.5).div(0.25))
    assert float(E.row_cosine(feats[0], ref).min()) >= E.FP32_COSINE  # every batch right, whoever computed it


def test_engine_names_are_the_registrys_and_the_option_check_uses_them():
    from zoo.options import OptionError, TrainConfig

    names = E.engine_choices()
    assert names[0] == "auto" and {"eager", "channels_last", "bf16", "compile", "onnxruntime"} <= set(names)
    with pytest.raises(OptionError, match="(?s)--engine.*one of auto, eager, channels_last"):
        TrainConfig(engine="fastest")


THIRD_PARTY_ENGINE = """
import zoo
from zoo import ExtractionEngine, PreparedEngine


class Reversed(ExtractionEngine):
    name = "{name}"
    description = "eager with its features in reverse order (its check must reject it)"

    def prepare(self, backbone, example, device, *, workdir, threads):
        return PreparedEngine(lambda x: backbone(x).flatten(1).flip(1), note="test")


@zoo.hookimpl
def zoo_register_engines(register):
    register(Reversed())
"""


def test_a_third_party_engine_is_registered_and_checked_like_a_builtin(tmp_path, monkeypatch, fresh_plugins):
    from test_plugins import install

    install(tmp_path, monkeypatch, {"twice": THIRD_PARTY_ENGINE.format(name="twice"),
                                    "impostor": THIRD_PARTY_ENGINE.format(name="eager")})
    status = fresh_plugins.get_host().status
    assert "twice" in E.engine_choices()
    assert status["twice"].status == "ok" and status["twice"].engines == ["twice"]
    assert status["impostor"].status == "broken" and "'eager'" in status["impostor"].error
    assert E._registry().owner("eager") == "engines"  # the built-in keeps its name
    sel = E.select("twice", tiny_backbone(), batch(), torch.device("cpu"), allow_reduced=False, total=10,
                   cache_root=None, choice_key="k", say=quiet)
    assert sel.engine.name == "eager" and "disagree with eager" in sel.rejected["twice"]  # checked, refused


# --- the probe's decisions, from injected timings (a fake clock the fake engines advance) ----------
class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


RATES = {"eager": 20.0, "channels_last": 40.0, "onnxruntime": 70.0}  # img/s on the fake clock


def fake_engines(clock, rates=RATES, gate=None, started=None, opens=None):
    """Engines that compute eager's features (so they pass their check) and advance the clock by
    len(x) / their rate; gate: an Event the onnxruntime preparation waits for; started: an Event
    it sets when it begins; opens: the engine whose first run sets the gate."""
    prepared = []

    def prep(name, backbone, example, device, **kw):
        prepared.append(name)
        if started is not None and name == "onnxruntime":
            started.set()
        if gate is not None and name == "onnxruntime":
            gate.wait(10)
        run = E.prepare("eager", backbone, example, device).run

        def timed(x):
            clock.t += len(x) / rates.get(name, 10.0)
            if name == opens:
                gate.set()
            return run(x)
        return E.Prepared(name, E.numerics_of(name), timed)
    return prep, prepared


def _probe(tmp_path, total, export_seconds, **kw):
    clock = FakeClock()
    prep, prepared = fake_engines(clock, **{k: v for k, v in kw.items() if k in ("gate", "opens")})
    m = tiny_backbone()
    if export_seconds is not None:  # what exporting this architecture took on this machine before
        E.ChoiceStore(tmp_path).put_prepare_seconds("onnxruntime", type(m).__qualname__, "", export_seconds)
    sel = E.select("auto", m, batch(16), torch.device("cpu"), allow_reduced=False, total=total, cache_root=tmp_path,
                   choice_key="k", say=quiet, _prepare=prep, _clock=clock)
    return sel, prepared


@pytest.mark.parametrize("total,export_seconds,exported", [(320, 4.0, False), (640, 4.0, True), (640, 20.0, False),
                                                            (5000, 20.0, True)])
def test_the_export_runs_only_when_its_saving_on_this_job_exceeds_its_cost(tmp_path, total, export_seconds, exported):
    sel, prepared = _probe(tmp_path, total, export_seconds)
    assert sel.how == "probe" and sel.rates["channels_last"] == pytest.approx(40.0)
    if exported:  # prepared beside the extraction, then timed on the job's own batches and kept
        assert "onnxruntime" in prepared and sel.engine.name == "onnxruntime"
        assert sel.rates["onnxruntime"] == pytest.approx(70.0)
    else:  # a small job keeps the cheap engine and says why
        assert "onnxruntime" not in prepared and sel.engine.name == "channels_last"
        assert "would cost this job more" in sel.rejected["onnxruntime"]


def test_the_probes_overhead_is_what_the_job_spent_beyond_the_chosen_engine(tmp_path):
    # the export is ready once channels_last has run the first batch (as on a real machine: it takes longer)
    sel, _ = _probe(tmp_path, 5000, 4.0, gate=threading.Event(), opens="channels_last")
    # until the choice (64 images): eager's 4 reference rows (every candidate is fp32), channels_last's
    # two batches (checked on the first batch's own rows, not run on the check rows), onnxruntime's
    # check rows and two batches (the chosen engine's features of the check rows are the check's
    # own, not computed again); the chosen engine alone would have taken 64 / 70 s
    rows = E.FP32_CHECK_ROWS
    spent = rows / 20 + 32 / 40 + rows / 70 + 32 / 70
    assert sel.overhead_seconds == pytest.approx(spent - 64 / 70)
    assert sel.overhead_seconds < 0.1 * 5000 / 70  # the bound: under 10% of the feature phase
    assert "probe overhead" in sel.describe()
    assert E.ChoiceStore(tmp_path).get("k") == "onnxruntime"  # remembered for the next job


def test_a_cached_export_is_cheap_so_a_small_job_gets_it(tmp_path, monkeypatch):
    engine = E._registry().get("onnxruntime")
    monkeypatch.setattr(type(engine), "prepare_seconds", lambda self, backbone, workdir: 0.0)
    sel, prepared = _probe(tmp_path, 320, None)
    assert "onnxruntime" in prepared and sel.engine.name == "onnxruntime"
    assert "onnxruntime" not in sel.rejected


def test_pays_weighs_the_saving_against_the_preparation():
    # 600 images left at 40 img/s, an engine 1.5x faster: 1/40 - 1/60 s saved per image
    fg_saving, fg_price = E.pays(600, 40.0, 1.5, 4.0, background=False)
    assert fg_saving == pytest.approx(600 / 120) and fg_price == 4.0
    bg_saving, bg_price = E.pays(600, 40.0, 1.5, 4.0, background=True)
    # beside the extraction the 160 images extracted meanwhile gain nothing; the job pays part of it
    assert bg_saving == pytest.approx(440 / 120) and bg_price == pytest.approx(E.OVERLAP_COST * 4.0)
    assert E.pays(600, 40.0, 1.0, 0.0, background=True)[0] == 0.0  # no faster: never pays


def test_a_job_that_ends_while_the_export_runs_keeps_its_engine_and_leaves_the_export(tmp_path):

    gate = threading.Event()
    clock = FakeClock()
    prep, prepared = fake_engines(clock, gate=gate)
    m = tiny_backbone()
    E.ChoiceStore(tmp_path).put_prepare_seconds("onnxruntime", type(m).__qualname__, "", 1.0)
    ch = E.Chooser("auto", m, torch.device("cpu"), allow_reduced=False, total=5000, cache_root=tmp_path,
                   choice_key="k", say=quiet, _prepare=prep, _clock=clock)
    x = batch(16)
    for _ in range(4):  # the export is still running: the job goes on with channels_last
        ch.run(x)
        assert ch.engine_name == "channels_last" and ch.selection is None
    gate.set()
    sel = ch.finish()
    assert sel.engine.name == "channels_last" and "last batch" in sel.rejected["onnxruntime"]
    assert "onnxruntime" in prepared and "onnxruntime" in sel.prepare_seconds


def _join_preparations():

    for t in threading.enumerate():
        if t.name.startswith("zoo-prepare-"):
            t.join(10)


@pytest.mark.parametrize("ort_rate,timed_again", [(100.0, False), (60.0, True)])
def test_the_export_starts_after_the_cheap_engines_warm_up_and_only_a_close_engine_is_timed_again(
        tmp_path, ort_rate, timed_again):
    """The export starts beside channels_last's second batch, not after it; that batch, run beside
    the export, gives channels_last's rate only as a lower bound. An engine beating the bound
    RETIME_MARGIN times over is chosen without timing channels_last again (and the bound is never
    remembered); a closer one is, on the next batch, and then the two timed rates decide."""

    gate, started, clock = threading.Event(), threading.Event(), FakeClock()
    prep, _ = fake_engines(clock, rates={**RATES, "onnxruntime": ort_rate}, gate=gate, started=started)
    m, x = tiny_backbone(), batch(16)
    E.ChoiceStore(tmp_path).put_prepare_seconds("onnxruntime", type(m).__qualname__, "", 1.0)
    ch = E.Chooser("auto", m, torch.device("cpu"), allow_reduced=False, total=5000, cache_root=tmp_path,
                   choice_key="k", say=quiet, _prepare=prep, _clock=clock)
    ch.run(x)  # channels_last's warm-up batch; the export starts right after it
    assert started.wait(10), "the export did not start after the cheap engine's warm-up batch"
    ch.run(x)  # beside the export
    assert ch.engine_name == "channels_last" and ch.selection is None
    gate.set()
    _join_preparations()
    ch.run(x)  # onnxruntime takes over: its warm-up batch
    ch.run(x)  # ... and its timed one
    assert (ch.selection is None) == timed_again
    if timed_again:  # 60 img/s is not twice the bound of 40: channels_last is timed on the next batch
        assert ch.engine_name == "channels_last"
        ch.run(x)
    sel = ch.selection
    assert sel is not None and sel.engine.name == "onnxruntime"
    assert sel.rates["channels_last"] == pytest.approx(40.0) and sel.rates["onnxruntime"] == pytest.approx(ort_rate)
    stored = json.loads((tmp_path / "engines" / "choices.json").read_text())["k"]["rates"]
    if timed_again:
        assert "channels_last" not in sel.lower_bounds and stored["channels_last"] == pytest.approx(40.0)
    else:
        assert sel.lower_bounds == {"channels_last"} and "channels_last >=40" in sel.describe()
        assert "channels_last" not in stored  # a lower bound is never remembered as a rate


@pytest.mark.parametrize("ended_at,timed_again", [(0.25, False), (None, True)])
def test_a_preparation_that_ends_early_in_a_batch_leaves_a_close_bound_that_needs_no_retiming(
        tmp_path, ended_at, timed_again):
    """channels_last's batch beside the export gives a lower bound (40 img/s on the fake clock);
    what it would do alone is estimated by taking back OVERLAP_COST of the seconds the export
    overlapped the batch. The export ending a quarter into the batch leaves an estimate of
    40 x 0.4 / (0.4 - 0.5 x 0.1) = 45.7, which onnxruntime's 60 img/s beats: chosen without timing
    channels_last again. Beside the export the whole batch, the estimate is 80: timed again."""

    gate, started, clock = threading.Event(), threading.Event(), FakeClock()
    prep, _ = fake_engines(clock, rates={**RATES, "onnxruntime": 60.0}, gate=gate, started=started)
    batches = [0]

    def export_ends_early(name, *a, **kw):
        engine = prep(name, *a, **kw)
        if name != "channels_last":
            return engine

        def run(x):
            if len(x) > E.CHECK_ROWS:
                batches[0] += 1
            if batches[0] == 2 and ended_at is not None and not gate.is_set():  # the batch beside the export
                t = clock.t
                clock.t += ended_at * len(x) / RATES["channels_last"]
                gate.set()
                _join_preparations()  # the export ends here, a quarter into the batch
                clock.t = t
            return engine.run(x)
        return E.Prepared(name, engine.numerics, run)

    m, x = tiny_backbone(), batch(16)
    E.ChoiceStore(tmp_path).put_prepare_seconds("onnxruntime", type(m).__qualname__, "", 1.0)
    ch = E.Chooser("auto", m, torch.device("cpu"), allow_reduced=False, total=5000, cache_root=tmp_path,
                   choice_key="k", say=quiet, _prepare=export_ends_early, _clock=clock)
    ch.run(x)  # channels_last's warm-up batch; the export starts after it
    assert started.wait(10)
    ch.run(x)  # beside the export
    gate.set()
    _join_preparations()
    ch.run(x)  # onnxruntime's warm-up batch
    ch.run(x)  # ... and its timed one
    assert (ch.selection is None) == timed_again
    if timed_again:
        assert ch.engine_name == "channels_last"
        ch.run(x)
    sel = ch.selection
    assert sel is not None and sel.engine.name == "onnxruntime"
    assert sel.lower_bounds == (set() if timed_again else {"channels_last"})


def test_an_engine_timed_on_its_own_keeps_its_rate_when_it_runs_on_beside_the_export(tmp_path):
    """Here the export does not pay at channels_last's (fast) warm-up batch but does at its timed
    rate, so it starts after the timed batch and channels_last runs on beside it: its rate stays
    the one timed alone, not a lower bound."""

    gate, clock = threading.Event(), FakeClock()
    prep, _ = fake_engines(clock, rates={**RATES, "onnxruntime": 100.0}, gate=gate)
    calls = {"channels_last": 0}

    def first_batch_fast(name, *a, **kw):
        engine = prep(name, *a, **kw)
        if name != "channels_last":
            return engine
        run = engine.run

        def counted(x):
            calls[name] += 1
            if calls[name] == 2:  # the warm-up batch (after the check rows): next to no time
                t = clock.t
                out = run(x)
                clock.t = t + 1e-6
                return out
            return run(x)
        return E.Prepared(name, engine.numerics, counted)

    m, x = tiny_backbone(), batch(16)
    E.ChoiceStore(tmp_path).put_prepare_seconds("onnxruntime", type(m).__qualname__, "", 1.0)
    ch = E.Chooser("auto", m, torch.device("cpu"), allow_reduced=False, total=5000, cache_root=tmp_path,
                   choice_key="k", say=quiet, _prepare=first_batch_fast, _clock=clock)
    ch.run(x)  # warm-up, at a rate no export pays against
    ch.run(x)  # timed: 40 img/s; now the export pays and starts
    ch.run(x)  # beside the export
    gate.set()
    _join_preparations()
    for _ in range(3):
        ch.run(x)
    sel = ch.finish()
    assert sel.engine.name == "onnxruntime" and sel.rates["channels_last"] == pytest.approx(40.0)
    assert not sel.lower_bounds and "channels_last >=" not in sel.describe()
    assert json.loads((tmp_path / "engines" / "choices.json").read_text())["k"]["rates"]["channels_last"] == 40.0


@pytest.mark.parametrize("measured_ratio,cheap_batches", [(None, 1), (30.0, 2)])
def test_a_paying_export_starts_with_the_jobs_first_batch_at_the_cheap_engines_expected_rate(
        tmp_path, measured_ratio, cheap_batches):
    """At the first batch channels_last has not run yet: its rate is expected from the reference
    rows' (eager 20 img/s here) times CHEAP_OVER_REFERENCE, or the channels_last/eager ratio this
    machine measured. When the export pays at that rate it runs beside channels_last's first batch,
    whose rate (a CPU's first batch) is a lower bound, so onnxruntime (100 img/s) wins after one
    channels_last batch. Measured 30x faster than eager here, channels_last is expected too fast
    for the export to pay at once: it starts after the warm-up batch, and channels_last runs two."""

    gate, clock = threading.Event(), FakeClock()
    prep, _ = fake_engines(clock, rates={**RATES, "onnxruntime": 100.0}, gate=gate)
    cheap = [0]

    def counting(name, *a, **kw):
        engine = prep(name, *a, **kw)
        if name != "channels_last":
            return engine

        def run(x):
            cheap[0] += len(x) > E.CHECK_ROWS  # a batch of the job, not the check rows
            return engine.run(x)
        return E.Prepared(name, engine.numerics, run)

    m, x = tiny_backbone(), batch(16)
    store = E.ChoiceStore(tmp_path)
    store.put_prepare_seconds("onnxruntime", type(m).__qualname__, "", 1.0)
    if measured_ratio is not None:  # an earlier job here: channels_last ran 30x eager's reference rows
        store.put("|earlier", "channels_last", {"eager": 20.0, "channels_last": 20.0 * measured_ratio})
    ch = E.Chooser("auto", m, torch.device("cpu"), allow_reduced=False, total=640, cache_root=tmp_path,
                   choice_key="k", say=quiet, _prepare=counting, _clock=clock)
    ch.run(x)  # channels_last's first batch
    gate.set()  # the export is ready from now on
    _join_preparations()
    for _ in range(4):
        if ch.selection is None:
            ch.run(x)
    sel = ch.selection
    assert sel is not None and sel.engine.name == "onnxruntime" and cheap[0] == cheap_batches
    assert sel.rates["channels_last"] == pytest.approx(40.0)
    assert sel.lower_bounds == ({"channels_last"} if cheap_batches == 1 else set())  # else timed on its own


def test_the_onnxruntime_engine_exports_without_importing_onnx_and_leaves_other_threads_the_full_pass(tmp_path):
    """The engine's export skips the TorchScript-based exporter's onnxscript pass, whose `import
    onnx` alone cost more than the export (engine.py, `_no_onnxscript_pass`): in a fresh process,
    preparing the engine leaves `onnx` unimported and the features still agree with eager. Another
    thread exporting meanwhile gets the pass as before, and it is put back afterwards."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys, threading, torch, torch.nn as nn
        from zoo.features import engines as E
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten()).eval()
        x = torch.randn(4, 3, 24, 24)
        p = E.prepare("onnxruntime", m, x, torch.device("cpu"), onnx_dir=sys.argv[1])
        with torch.inference_mode():
            cos = float(E.row_cosine(p.run(x), m(x)).min())
        print("onnx imported" if "onnx" in sys.modules else "onnx not imported", cos)

        import importlib
        from zoo_onnx import engine as engine_module
        target = importlib.import_module("torch.onnx._internal.torchscript_exporter.onnx_proto_utils")
        seen = []
        original = target._add_onnxscript_fn
        target._add_onnxscript_fn = lambda b, c: seen.append(threading.current_thread().name) or b
        with engine_module._no_onnxscript_pass():
            target._add_onnxscript_fn(b"", {})  # this thread: skipped
            t = threading.Thread(target=lambda: target._add_onnxscript_fn(b"", {}), name="other")
            t.start(); t.join()
        target._add_onnxscript_fn(b"", {})
        print("reached by", seen)
    """)
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = proc.stdout.strip().splitlines()[-2:]
    assert first.startswith("onnx not imported") and float(first.split()[-1]) >= E.FP32_COSINE
    assert second == "reached by ['other', 'MainThread']"
