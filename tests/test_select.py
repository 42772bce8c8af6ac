"""`zoo select` / `zoo.select`: backbones ranked on the user's images by cross-validated accuracy, with
their cost on this machine.

The candidates come from a small plugin registered here (as a third party's would be), whose
backbones are known in advance to be good, useless or slow on the coloured-patch images:
  selecttest/good   the pooled colour channels: separates the classes (CV top-1 ~1.0)
  selecttest/blind  a constant vector, whatever the image: chance at best
  selecttest/slow   `good` that sleeps SLOW_MS per image: as accurate, far slower
so the ranking, the tie-break, the Pareto front and the budget all have a right answer."""

from __future__ import annotations

import csv
import json
import time
import types

import pytest

torch = pytest.importorskip("torch")

from trainhelpers import make_image_folder  # noqa: E402 - after the importorskip

import zoo  # noqa: E402 - after the importorskip
from zoo.cli.main import main  # noqa: E402 - after the importorskip
from zoo.plugin import registry  # noqa: E402 - after the importorskip

SLOW_MS = 100.0  # per image: far above the tiny backbones (a fraction of a ms; tens on a loaded machine)


class _Good(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Conv2d(3, 6, 1)
        with torch.no_grad():
            self.mix.weight.copy_(torch.cat([torch.eye(3), -torch.eye(3)]).view(6, 3, 1, 1))
            self.mix.bias.zero_()

    def forward(self, x):
        return self.mix(x).mean((2, 3))


class _Blind(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.value = torch.nn.Linear(3, 6)
        with torch.no_grad():
            self.value.weight.zero_()
            self.value.bias.copy_(torch.linspace(-1, 1, 6))

    def forward(self, x):  # the bias alone: the same vector for every image
        return self.value(torch.zeros_like(x[:, :, 0, 0]))


class _Slow(_Good):
    def forward(self, x):
        time.sleep(SLOW_MS / 1000 * x.shape[0])
        return super().forward(x)


MODULES = {"good": _Good, "blind": _Blind, "slow": _Slow}


def _plugin_module():
    from zoo import (
        BackboneProvider,
        BackboneSpec,
        BuiltBackbone,
        Normalization,
        WeightsInfo,
        hookimpl,
    )

    class SelectTest(BackboneProvider):
        name = "selecttest"

        def specs(self):
            for model in MODULES:
                yield BackboneSpec(provider="selecttest", model=model, family="test",
                                   weights=(WeightsInfo(tag="demo", source="built in", file_name=""),),
                                   default_weights="demo")

        def normalization(self, spec, weights):
            return Normalization(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), input_size=(3, 32, 32),
                                 resize_size=32)

        def build(self, spec, weights):
            return BuiltBackbone(MODULES[spec.model](), feature_dim=6)

        def feature_dim(self, spec):
            return 6

        def offline_weights(self):
            return [f"{m}.demo" for m in MODULES]

    mod = types.ModuleType("zoo_selecttest")

    @hookimpl
    def zoo_register_backbones(register):
        register(SelectTest())

    mod.zoo_register_backbones = zoo_register_backbones
    return mod


@pytest.fixture
def only_test_plugin(monkeypatch, fresh_plugins):
    """No installed backbone or exporter plugin autoloads (only the core's own extraction engines, an
    entry point like any plugin's); the test plugin is registered by hand."""
    monkeypatch.setenv("ZOO_LOAD_PLUGINS", "engines")
    fresh_plugins.reset()
    assert fresh_plugins.get_host().register(_plugin_module(), "selecttest")
    registry.reset()
    yield
    registry.reset()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("select") / "data", per_class=10, size=40)


def _opts(tmp_path, **kw):
    base = dict(device="cpu", cache_dir=str(tmp_path / "cache"), progress=False, num_workers=0, timing_batch=4)
    base.update(kw)
    return base


def test_default_candidates_are_the_providers_offline_backbones(only_test_plugin):
    assert registry.backbones().offline_backbones() == ["selecttest/good.demo", "selecttest/blind.demo",
                                                        "selecttest/slow.demo"]


def test_ranking_follows_the_cv_scores_and_ties_go_to_the_faster(only_test_plugin, images, tmp_path):
    seen = []
    result = zoo.select(images, out=tmp_path / "out", on_candidate=seen.append, **_opts(tmp_path))
    names = [c.backbone for c in result.candidates]
    assert names == ["selecttest/good", "selecttest/slow", "selecttest/blind"]
    good, slow, blind = result.candidates
    assert [c.rank for c in result.candidates] == [1, 2, 3]
    # the numbers the order rests on: slow is as accurate as good (the same features) and much slower;
    # blind, one vector for every image, is at chance (1/3). (zoo train's default head, 20 epochs at
    # lr 1e-3, takes one step an epoch on 24 images: it learns little here, but the order is right.)
    assert good.cv.top1 == slow.cv.top1 > blind.cv.top1 + 0.1 and blind.cv.top1 == pytest.approx(1 / 3)
    assert slow.ms_per_image > SLOW_MS * 0.9 > good.ms_per_image
    assert good.cv.low <= good.cv.top1 <= good.cv.high and blind.cv.low <= blind.cv.top1 <= blind.cv.high
    assert "weight decay" in good.cv.method
    assert len(good.cv.fold_top1) == result.folds == 5
    # the Pareto front: good dominates slow; blind is on it only if it is faster than good
    assert [c.pareto for c in result.candidates] == [True, False, blind.ms_per_image < good.ms_per_image]
    assert (good.params, good.feature_dim, good.input_size) == (24, 6, 32)
    assert result.images == 30 and result.classes == ("blue", "green", "red") and result.best is good
    assert [c.backbone for c in seen] == ["selecttest/good", "selecttest/blind", "selecttest/slow"]

    # the files say the same
    doc = json.loads((tmp_path / "out" / "select.json").read_text())
    assert [c["name"] for c in doc["candidates"]] == [c.name for c in result.candidates]
    assert doc["candidates"][0]["cv"]["top1"] == good.cv.top1
    rows = list(csv.DictReader((tmp_path / "out" / "select.csv").open()))
    assert [r["backbone"] for r in rows] == names and rows[2]["rank"] == "3"
    assert float(rows[0]["cv_top1"]) == pytest.approx(good.cv.top1, abs=1e-4)
    png = (tmp_path / "out" / "select.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # an earlier selection is never overwritten
    with pytest.raises(zoo.errors.ZooError, match="already holds select.json"):
        zoo.select(images, out=tmp_path / "out", **_opts(tmp_path))


def test_budget_keeps_only_the_fast_and_skips_the_extraction_of_the_rest(only_test_plugin, images, tmp_path):
    result = zoo.select(images, budget_ms=SLOW_MS / 2, **_opts(tmp_path))
    ranked = [c.backbone for c in result.ranked]
    assert ranked == ["selecttest/good", "selecttest/blind"]
    slow = result.candidates[-1]
    assert slow.backbone == "selecttest/slow" and not slow.within_budget and slow.cv is None and slow.rank is None
    assert slow.extraction == {} and slow.ms_per_image > SLOW_MS / 2
    # nothing of the slow one reached the cache: a later selection extracts it from scratch
    again = zoo.select(images, ["selecttest/slow"], **_opts(tmp_path))
    assert again.candidates[0].extraction["misses"] == 30


def test_the_cache_is_warm_for_zoo_train_afterwards(only_test_plugin, images, tmp_path):
    """What select extracted, zoo train (defaults, its own validation split) finds: nothing extracted."""
    first = zoo.select(images, ["selecttest/good"], **_opts(tmp_path))
    assert first.candidates[0].extraction["misses"] == 30
    run = zoo.train("selecttest/good.demo", images, epochs=1, device="cpu", cache_dir=str(tmp_path / "cache"),
                    progress=False, num_workers=0)
    assert run.cache["misses"] == 0 and run.cache["hits"] == 30
    # negative control: another cache folder is cold for the same run
    cold = zoo.train("selecttest/good.demo", images, epochs=1, device="cpu", cache_dir=str(tmp_path / "other"),
                     progress=False, num_workers=0)
    assert cold.cache["misses"] == 30
    # and select itself is warm the second time
    second = zoo.select(images, ["selecttest/good"], **_opts(tmp_path))
    assert second.candidates[0].extraction["misses"] == 0
    assert second.candidates[0].cv == first.candidates[0].cv


def test_fewer_folds_when_a_class_is_small_and_said_so(only_test_plugin, tmp_path):
    data = make_image_folder(tmp_path / "small", per_class=3, size=40)
    result = zoo.select(data, ["selecttest/good"], **_opts(tmp_path))
    assert result.folds == 3 and "3 folds, not 5" in result.folds_note
    one = make_image_folder(tmp_path / "one", per_class=1, size=40)
    with pytest.raises(zoo.errors.DataError, match="at least 2 per class"):
        zoo.select(one, ["selecttest/good"], **_opts(tmp_path))


def test_cli_prints_the_ranked_table_and_writes_the_files(only_test_plugin, images, tmp_path, capsys):
    code = main(["select", "--data", str(images), "--out", str(tmp_path / "cli"), "--device", "cpu",
                 "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--workers", "0", "--timing-batch", "4",
                 "--budget-ms", str(SLOW_MS / 2)])
    out = capsys.readouterr().out
    assert code == 0
    lines = [line for line in out.splitlines() if line.startswith(("1 ", "2 ", "- "))]
    assert [line.split()[1] for line in lines] == ["selecttest/good.demo", "selecttest/blind.demo",
                                                    "selecttest/slow.demo"]
    assert f"over {SLOW_MS / 2:g} ms" in lines[2] and "pareto" in lines[0]
    assert "zoo train --data" in out and "--backbone selecttest/good.demo" in out
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["select.csv", "select.json", "select.png"]


@pytest.mark.parametrize("argv,message", [
    (["select", "selecttest/good"], "--data is required"),
    (["select", "--data", "{data}", "selecttest/nope"], "unknown backbone 'selecttest/nope'"),
    (["select", "--data", "{data}", "--budget-ms", "0"], "--budget-ms must be a finite number > 0"),
    (["select", "--data", "{data}", "--folds", "1"], "--folds must be an integer >= 2"),
    (["select", "--data", "{tmp}/absent"], "absent"),
])
def test_usage_errors_exit_2_with_one_line(only_test_plugin, images, tmp_path, capsys, argv, message):
    argv = [a.format(data=images, tmp=tmp_path) for a in argv] + ["--out", str(tmp_path / "o"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("zoo select: error:")
    assert not (tmp_path / "o").exists()  # nothing written


def test_no_offline_backbone_is_an_error_naming_the_fix(monkeypatch, fresh_plugins, images, tmp_path):
    monkeypatch.setenv("ZOO_LOAD_PLUGINS", "")
    fresh_plugins.reset()
    registry.reset()
    with pytest.raises(zoo.errors.ZooError, match="no backbone has pretrained weights available offline"):
        zoo.select(images, **_opts(tmp_path))


def test_a_provider_listing_a_backbone_it_lacks_is_named(only_test_plugin, monkeypatch):
    provider = registry.backbones()._providers["selecttest"][0]
    monkeypatch.setattr(type(provider), "offline_weights", lambda self: ["good.demo", "ghost.demo"])
    with pytest.raises(zoo.errors.PluginError, match="'ghost.demo', which is not one of its backbones"):
        registry.backbones().offline_backbones()


def test_every_select_option_is_a_flag_with_the_configs_default():
    """The parser offers each SelectConfig field and passes only what was given (so the defaults are
    SelectConfig's, written once)."""
    from dataclasses import fields

    from zoo.cli.main import build_parser
    from zoo.options import SelectConfig

    sub = build_parser()._subparsers._group_actions[0].choices["select"]
    assert {f.name for f in fields(SelectConfig)} <= {a.dest for a in sub._actions}
    given = {k for k in vars(sub.parse_args(["--data", "d"])) if not k.startswith("_")}
    assert given <= {"data", "out", "json", "backbones"}
    ns = sub.parse_args(["--data", "d", "a/b", "c/d", "--budget-ms", "5", "--folds", "3"])
    assert (ns.backbones, ns.budget_ms, ns.folds) == (["a/b", "c/d"], 5.0, 3)
