"""Third-party plugins on the v2 API: found through entry points, dispatched by pluggy, isolated
when broken, never displacing a built-in; strict mode re-raises."""

import json
import sys
import textwrap
import warnings

import pytest

import zoo
from conftest import install_distribution
from zoo.plugin import registry
from zoo.errors import PluginError

HEADER = textwrap.dedent("""
    import torch
    from zoo import BackboneProvider, BackboneSpec, BuiltBackbone, Normalization, hookimpl

    STATS = Normalization(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), input_size=(3, 32, 32), resize_size=36)

    def tiny(width=8):
        return torch.nn.Sequential(torch.nn.Conv2d(3, width, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

    class Base(BackboneProvider):
        name = "base"
        models = ("net",)
        def specs(self):
            for m in self.models:
                yield BackboneSpec(provider=self.name, model=m)
        def normalization(self, spec, weights):
            return STATS
        def build(self, spec, weights):
            return BuiltBackbone(tiny(8), feature_dim=8)
""")


def plugin(body: str) -> str:
    return HEADER + textwrap.dedent(body)


BROKEN = {
    "bad_import": "import this_module_does_not_exist\n",
    "bad_hook": plugin("""
        @hookimpl
        def zoo_register_backbones(register):
            raise RuntimeError("boom in register")
    """),
    "bad_std": plugin("""
        class P(Base):
            name = "badstd"
            def normalization(self, spec, weights):
                return Normalization(mean=(0.5, 0.5, 0.5), std=(0.5, 0.0, 0.5), input_size=(3, 32, 32), resize_size=36)
        @hookimpl
        def zoo_register_backbones(register):
            register(P())
    """),
    "bad_len": plugin("""
        class P(Base):
            name = "badlen"
            def normalization(self, spec, weights):
                return Normalization(mean=(0.5, 0.5), std=(0.5, 0.5), input_size=(3, 32, 32), resize_size=36)
        @hookimpl
        def zoo_register_backbones(register):
            register(P())
    """),
    "misspelt_hook": plugin("""
        class P(Base):
            name = "misspelt"
        @hookimpl
        def zoo_register_backbone(register):   # the hook is zoo_register_backbones
            register(P())
    """),
    "v1_hooks": plugin("""
        @hookimpl
        def register_backbones(register):
            pass
    """),
    "no_build": plugin("""
        class P(BackboneProvider):
            name = "nobuild"
            def specs(self):
                yield BackboneSpec(provider=self.name, model="net")
            def normalization(self, spec, weights):
                return STATS
        @hookimpl
        def zoo_register_backbones(register):
            register(P)
    """),
    "misspelt_part": plugin("""
        class P(Base):
            name = "misspeltpart"
            def feature_dims(self, spec):   # the optional part is feature_dim
                return 8
        @hookimpl
        def zoo_register_backbones(register):
            register(P())
    """),
    "sneaky": plugin("""
        class P(Base):
            name = "sneaky"
            def specs(self):
                yield BackboneSpec(provider="sneaky", model="fine")
                yield BackboneSpec(provider="timm", model="resnet18")   # not its provider name
        @hookimpl
        def zoo_register_backbones(register):
            register(P())
    """),
}

# Sorts before every built-in entry point, and claims a built-in provider name.
IMPOSTOR = plugin("""
    class Impostor(Base):
        name = "torchvision"
        models = ("resnet18", "impostor_only")
    @hookimpl
    def zoo_register_backbones(register):
        register(Impostor())
""")

WRONG_DIM = plugin("""
    class P(Base):
        name = "wrongdim"
        def feature_dim(self, spec):
            return 8
        def build(self, spec, weights):
            return BuiltBackbone(tiny(8), feature_dim=999)   # the module outputs 8
    @hookimpl
    def zoo_register_backbones(register):
        register(P())
""")


def install(tmp_path, monkeypatch, plugins: dict[str, str], site_name="site"):
    site = tmp_path / site_name
    site.mkdir()
    src = tmp_path / f"{site_name}-src"
    for name, code in plugins.items():
        (src / f"zoo_{name}").mkdir(parents=True)
        (src / f"zoo_{name}" / "__init__.py").write_text(code)
        install_distribution(site, src, f"zoo-{name.replace('_', '-')}", "1.2.3", {name: f"zoo_{name}"},
                             [f"zoo_{name}"])
    monkeypatch.syspath_prepend(str(site))
    for name in plugins:  # an earlier test's module of the same name must not be reused
        monkeypatch.delitem(sys.modules, f"zoo_{name}", raising=False)
    zoo.plugin.host.reset()
    return site


@pytest.fixture
def broken_site(tmp_path, monkeypatch, fresh_plugins):
    return install(tmp_path, monkeypatch, BROKEN)


def test_example_plugin_is_discovered_through_its_entry_point(example_plugin):
    assert "example/tinynet" in zoo.list_models()
    st = zoo.plugin.host.get_host().status["example"]
    assert (st.status, st.distribution, st.version) == ("ok", "zoo-example-plugin", "0.1.0")
    assert st.hooks == ["zoo_register_backbones", "zoo_register_exporters"] and not st.builtin
    n = zoo.get_normalization("example/tinynet")
    assert n.mean == (0.5, 0.4, 0.3) and n.input_size == (3, 64, 64)  # its own stats, not ImageNet's
    assert "example-npz" in registry.exporters().names()
    assert st.providers == ["example"] and st.exporters == ["example-npz"]


def test_broken_plugins_are_isolated_and_reported(broken_site, capsys):
    from zoo.cli.main import main

    names = zoo.list_models()
    assert "torchvision/resnet18" in names and "timm/resnet18" in names  # the others keep working
    assert not any(n.startswith(("badstd/", "badlen/", "sneaky/", "misspelt", "nobuild/")) for n in names)
    status = zoo.plugin.host.get_host().status
    assert status["bad_import"].status == "broken" and "this_module_does_not_exist" in status["bad_import"].error
    assert "boom in register" in status["bad_hook"].error
    assert "std must be > 0" in status["bad_std"].error
    assert "one value per input channel" in status["bad_len"].error
    assert "registers only under its own name" in status["sneaky"].error
    assert rec_of("timm/resnet18").plugin == "timm"
    assert main(["plugins", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["bad_hook"]["status"] == "broken" and rows["bad_hook"]["version"] == "1.2.3"
    assert rows["torchvision"]["status"] == "ok" and rows["torchvision"]["backbones"] > 50
    assert main(["plugins"]) == 0
    assert "bad_std: broken: zoo_register_backbones:" in capsys.readouterr().out


def rec_of(name):
    return registry.backbones().resolve(name)[0]


def test_a_misspelt_hook_is_rejected_naming_it(broken_site):
    zoo.list_models()
    st = zoo.plugin.host.get_host().status["misspelt_hook"]
    assert st.status == "broken" and "zoo_register_backbone" in st.error and "zoo_register_backbones" in st.error
    v1 = zoo.plugin.host.get_host().status["v1_hooks"]
    assert v1.status == "broken" and "'register_backbones' is a plugin API v1 hook" in v1.error


def test_a_provider_missing_a_required_part_is_told_what_to_write(broken_site):
    zoo.list_models()
    st = zoo.plugin.host.get_host().status["no_build"]
    assert st.status == "broken"
    assert "does not implement the required build(self, spec: 'BackboneSpec', weights: 'str | None')" in st.error
    part = zoo.plugin.host.get_host().status["misspelt_part"]
    assert part.status == "broken" and "P.feature_dims is not part of zoo.BackboneProvider" in part.error
    assert "did you mean 'feature_dim'" in part.error


def test_impostor_sorting_first_never_displaces_a_builtin(tmp_path, monkeypatch, fresh_plugins, capsys):
    from zoo.cli.main import main

    install(tmp_path, monkeypatch, {"aaa_impostor": IMPOSTOR})
    eps = [ep.name for ep in zoo.plugin.host.plugin_entry_points()]
    assert eps.index("aaa_impostor") < eps.index("torchvision")  # it really sorts first
    status = zoo.plugin.host.get_host().status
    zoo.list_models()
    assert status["torchvision"].status == "ok" and status["torchvision"].backbones > 50
    imp = status["aaa_impostor"]
    assert imp.status == "broken" and "'torchvision'" in imp.error and "'aaa_impostor'" in imp.error
    assert "impostor_only" not in " ".join(zoo.list_models("*impostor*"))  # nothing of it is kept
    module, info = zoo.create_backbone("torchvision/resnet18", weights=None)
    assert type(module).__module__.startswith("torchvision.") and info.plugin == "torchvision"
    assert info.feature_dim == 512
    assert main(["info", "torchvision/resnet50", "--no-build", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plugin"] == "torchvision"
    assert main(["plugins"]) == 0
    assert "aaa_impostor: broken:" in capsys.readouterr().out


def test_a_name_two_third_parties_claim_goes_to_neither(tmp_path, monkeypatch, fresh_plugins, capsys):
    from zoo.cli.main import main

    second = IMPOSTOR.replace('name = "torchvision"', 'name = "shared"')
    install(tmp_path, monkeypatch, {"alpha": second, "beta": second, "gamma": plugin("""
        class P(Base):
            name = "gamma"
        @hookimpl
        def zoo_register_backbones(register):
            register(P())
    """)})
    names = zoo.list_models()
    status = zoo.plugin.host.get_host().status
    for me, other in (("alpha", "beta"), ("beta", "alpha")):  # no silent winner, whatever sorts first
        st = status[me]
        assert st.status == "conflict" and st.conflicts == [other] and st.providers == []
        assert f"'{other}'" in st.error and "ZOO_PROVIDERS=shared=alpha or ZOO_PROVIDERS=shared=beta" in st.error
    assert not any(n.startswith("shared/") for n in names)
    assert "gamma/net" in names and status["gamma"].status == "ok"  # a bystander is untouched
    with pytest.raises(PluginError, match=r"shared/resnet18: backbone provider 'shared' is claimed by plugins "
                                          r"'alpha', 'beta' and none of them is loaded: pick one with ZOO_PROVIDERS"):
        zoo.create_backbone("shared/resnet18", weights=None)
    assert main(["info", "shared/resnet18", "--no-build"]) == 2
    assert "ZOO_PROVIDERS=shared=alpha" in capsys.readouterr().err
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "alpha: conflict:" in out and "beta: conflict:" in out


def test_zoo_providers_picks_the_owner_and_the_index_respects_it(tmp_path, monkeypatch, fresh_plugins, capsys):
    from zoo.cli.main import main

    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    second = IMPOSTOR.replace('name = "torchvision"', 'name = "shared"')
    install(tmp_path, monkeypatch, {"alpha": second, "beta": second.replace('"impostor_only"', '"beta_only"')})
    monkeypatch.setenv("ZOO_PROVIDERS", "shared=zoo-beta")  # by distribution name; the entry point works too
    fresh_plugins.reset()
    assert rec_of("shared/resnet18").plugin == "beta" and "shared/beta_only" in zoo.list_models()
    status = zoo.plugin.host.get_host().status
    assert status["beta"].status == "ok"
    assert status["alpha"].status == "conflict" and "given to 'zoo-beta' by ZOO_PROVIDERS" in status["alpha"].error
    for _ in range(2):  # cold (builds the index), then warm (from the index)
        fresh_plugins.reset()
        assert main(["list", "shared/*", "--json"]) == 0
        assert {r["name"] for r in json.loads(capsys.readouterr().out)} == {"shared/resnet18", "shared/beta_only"}
    monkeypatch.setenv("ZOO_PROVIDERS", "shared=alpha")  # another choice is another index
    fresh_plugins.reset()
    assert main(["list", "shared/*", "--json"]) == 0
    assert {r["name"] for r in json.loads(capsys.readouterr().out)} == {"shared/resnet18", "shared/impostor_only"}
    monkeypatch.setenv("ZOO_PROVIDERS", "shared=nosuch")
    fresh_plugins.reset()
    with pytest.warns(zoo.plugin.host.PluginEnvWarning, match="ZOO_PROVIDERS gives 'shared' to 'nosuch'"):
        names = zoo.list_models()
    assert not any(n.startswith("shared/") for n in names)  # neither claimant, never a silent pick


def test_a_plugin_that_hangs_at_import_is_abandoned(tmp_path, monkeypatch, fresh_plugins):
    import time

    marker = tmp_path / "imported"
    install(tmp_path, monkeypatch, {"sleepy": f"import time\nopen({str(marker)!r}, 'a').write('x')\n"
                                              "time.sleep(10 ** 6)\n"})
    monkeypatch.setenv("ZOO_PLUGIN_TIMEOUT", "1")
    fresh_plugins.reset()
    t0 = time.monotonic()
    names = zoo.list_models()
    assert time.monotonic() - t0 < 30
    assert "torchvision/resnet18" in names and marker.read_text() == "x"
    st = zoo.plugin.host.get_host().status["sleepy"]
    assert st.status == "broken" and "import timed out" in st.error and "did not finish within 1s" in st.error
    assert "ZOO_PLUGIN_TIMEOUT" in st.error
    monkeypatch.setenv("ZOO_STRICT_PLUGINS", "1")
    fresh_plugins.reset()
    with pytest.raises(PluginError, match="sleepy.*did not finish within 1s"):
        zoo.list_models()


def test_a_registration_hook_that_hangs_is_abandoned(tmp_path, monkeypatch, fresh_plugins):
    install(tmp_path, monkeypatch, {"stuck": plugin("""
        import time
        class P(Base):
            name = "stuck"
            def specs(self):
                time.sleep(10 ** 6)
                yield from ()
        @hookimpl
        def zoo_register_backbones(register):
            register(P())
    """)})
    monkeypatch.setenv("ZOO_PLUGIN_TIMEOUT", "3")
    fresh_plugins.reset()
    assert "timm/resnet18" in zoo.list_models()
    st = zoo.plugin.host.get_host().status["stuck"]
    assert st.status == "broken" and "zoo_register_backbones timed out" in st.error


def test_a_hanging_plugin_does_not_hang_the_command(tmp_path):
    """The real thing: `zoo list` in a fresh process with a plugin that sleeps forever at import
    exits, lists the others, reports the plugin; warm, it does not import it at all."""
    import os
    import subprocess
    import sys

    site = tmp_path / "site"
    site.mkdir()
    src = tmp_path / "src" / "zoo_sleepy"
    src.mkdir(parents=True)
    marker = tmp_path / "imported"
    (src / "__init__.py").write_text(f"import time\nopen({str(marker)!r}, 'a').write('x')\ntime.sleep(10 ** 6)\n")
    install_distribution(site, src.parent, "zoo-sleepy", "0.1", {"sleepy": "zoo_sleepy"}, ["zoo_sleepy"])
    env = dict(os.environ, PYTHONPATH=str(site), ZOO_CACHE_DIR=str(tmp_path / "cache"), ZOO_PLUGIN_TIMEOUT="2")
    for run in ("cold", "warm"):
        proc = subprocess.run([sys.executable, "-m", "zoo.cli.main", "list", "resnet18", "--json"], env=env,
                              capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr
        assert {r["name"] for r in json.loads(proc.stdout)} >= {"torchvision/resnet18", "timm/resnet18"}
        assert "plugin 'sleepy' is broken" in proc.stderr and "did not finish within 2s" in proc.stderr
        assert marker.read_text() == "x", run  # warm: answered from the index, the plugin never imported


def test_feature_dim_mismatch_is_caught_at_build(tmp_path, monkeypatch, fresh_plugins, capsys):
    from zoo.cli.main import main

    install(tmp_path, monkeypatch, {"wrongdim": WRONG_DIM})
    with pytest.raises(PluginError, match=r"plugin 'wrongdim': backbone wrongdim/net declares feature_dim 999 "
                                          r"but its module outputs 8 features"):
        zoo.create_backbone("wrongdim/net", weights=None)
    assert main(["info", "wrongdim/net"]) == 2
    assert "declares feature_dim 999" in capsys.readouterr().err
    with pytest.raises(PluginError, match="feature_dim 999"):  # before any training step
        zoo.train("wrongdim/net", data=None, epochs=1, device="cpu", cache=False)


def test_strict_mode_reraises(broken_site, monkeypatch, fresh_plugins):
    monkeypatch.setenv("ZOO_STRICT_PLUGINS", "1")
    fresh_plugins.reset()
    with pytest.raises(PluginError, match="bad_import|this_module_does_not_exist"):
        zoo.list_models()


def test_allow_list_and_disable(example_plugin, monkeypatch, fresh_plugins):
    monkeypatch.setenv("ZOO_LOAD_PLUGINS", "torchvision,example")
    fresh_plugins.reset()
    names = zoo.list_models()
    assert "example/tinynet" in names and not any(n.startswith("timm/") for n in names)
    assert fresh_plugins.get_host().status["timm"].status == "disabled"
    monkeypatch.delenv("ZOO_LOAD_PLUGINS")
    monkeypatch.setenv("ZOO_DISABLE_PLUGINS", "example")
    fresh_plugins.reset()
    assert "example/tinynet" not in zoo.list_models()
    monkeypatch.setenv("ZOO_LOAD_PLUGINS", "")  # empty allow-list: nothing autoloads
    fresh_plugins.reset()
    assert zoo.list_models() == []


@pytest.mark.parametrize("var", ["ZOO_LOAD_PLUGINS", "ZOO_DISABLE_PLUGINS"])
def test_env_entries_matching_no_plugin_warn_naming_the_variable(var, monkeypatch, fresh_plugins):
    monkeypatch.setenv(var, "torchvision,nosuch")
    fresh_plugins.reset()
    with pytest.warns(zoo.plugin.host.PluginEnvWarning, match=rf"{var} names 'nosuch', which matches no installed plugin"):
        fresh_plugins.get_host()
    monkeypatch.setenv(var, "torchvision")
    fresh_plugins.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error", zoo.plugin.host.PluginEnvWarning)
        fresh_plugins.get_host()  # all entries known: no warning


def test_a_provider_that_fails_at_call_time_names_the_plugin(tmp_path, monkeypatch, fresh_plugins):
    install(tmp_path, monkeypatch, {"flaky": plugin("""
        class P(Base):
            name = "flaky"
            def build(self, spec, weights):
                raise ValueError("cannot build today")
        @hookimpl
        def zoo_register_backbones(register):
            register(P())
    """)})
    with pytest.raises(PluginError, match="plugin 'flaky' failed in build for flaky/net: ValueError: cannot build today"):
        zoo.create_backbone("flaky/net", weights=None)
    zoo.create_backbone("torchvision/resnet18", weights=None)  # other plugins unaffected


def test_registering_by_hand_goes_through_the_same_checks(fresh_plugins):
    import types

    host = fresh_plugins.get_host()
    mod = types.ModuleType("by_hand")
    exec(plugin("""
        class P(Base):
            name = "byhand"
        @hookimpl
        def zoo_register_backbones(register):
            register(P())
    """), mod.__dict__)
    assert host.register(mod, "by_hand")
    registry.reset()
    assert zoo.list_models("byhand/*") == ["byhand/net"]
    _, info = zoo.create_backbone("byhand/net", weights=None)
    assert info.feature_dim == 8 and info.plugin == "by_hand"


def test_the_kit_refuses_to_test_another_plugins_provider(tmp_path, monkeypatch, fresh_plugins):
    """The real plugin's own check_backbones(provider=...) test never passes on an impostor."""
    import importlib.util

    from zoo.testing import ConformanceError, check_backbones

    second = IMPOSTOR.replace('name = "torchvision"', 'name = "shared"')
    install(tmp_path, monkeypatch, {"alpha": second, "beta": second})
    with pytest.raises(ConformanceError, match="claimed by plugins 'alpha', 'beta'"):
        check_backbones(provider="shared", plugin="beta")  # in conflict: nobody's
    monkeypatch.setenv("ZOO_PROVIDERS", "shared=alpha")
    fresh_plugins.reset()
    with pytest.raises(ConformanceError, match=r"shared/\w+: is registered by plugin 'alpha' \(distribution "
                                               r"zoo-alpha\), not by the plugin under test \(plugin='beta'"):
        check_backbones(provider="shared", plugin="beta")
    assert len(check_backbones(provider="shared", plugin="zoo-alpha")) == 2
    # Inferred: beta's own test file, beside beta's pyproject.toml, tests beta.
    project = tmp_path / "zoo-beta"
    (project / "tests").mkdir(parents=True)
    (project / "pyproject.toml").write_text('[project]\nname = "zoo-beta"\n\n[project.entry-points.zoo]\n'
                                            'beta = "zoo_beta"\n')
    (project / "tests" / "test_beta.py").write_text(
        "from zoo.testing import check_backbones\n\ndef test_it():\n    check_backbones(provider='shared')\n")
    spec = importlib.util.spec_from_file_location("beta_tests", project / "tests" / "test_beta.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(ConformanceError, match=r"not by the plugin under test \(the plugins of .*pyproject.toml: beta"):
        module.test_it()
    monkeypatch.setenv("ZOO_PROVIDERS", "shared=beta")
    fresh_plugins.reset()
    module.test_it()  # its own provider: passes


# Modules whose state a state dict does not fully hold: loading a weights file must keep what
# their own init set up (the loader skips random init only where the load overwrites everything).
STATEFUL = plugin("""
    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)
            self.register_buffer("gain", torch.full((1, 8, 1, 1), 2.0), persistent=False)
            self.offset = torch.full((1, 8, 1, 1), 0.25)   # a plain attribute, not a buffer
        def forward(self, x):
            return self.conv(x) * self.gain + self.offset

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 3, 1), torch.nn.Conv2d(3, 3, 1)
            self.b.weight = self.a.weight
            self.conv = torch.nn.Conv2d(3, 8, 3)
        def forward(self, x):
            return self.conv(self.b(self.a(x)))

    def headless(body):
        return torch.nn.Sequential(body, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

    class P(Base):
        name = "stateful"
        models = ("scale", "tied", "plain")
        def build(self, spec, weights):
            body = {"scale": Scale, "tied": Tied, "plain": lambda: torch.nn.Conv2d(3, 8, 3)}[spec.model]()
            return BuiltBackbone(headless(body), feature_dim=8)
    @hookimpl
    def zoo_register_backbones(register):
        register(P())
""")


@pytest.mark.parametrize("model", ["scale", "tied", "plain"])
def test_a_weights_file_sets_every_tensor_and_keeps_what_the_module_set_up(model, tmp_path, monkeypatch,
                                                                           fresh_plugins):
    import torch
    from safetensors.torch import save_file

    install(tmp_path, monkeypatch, {"stateful": STATEFUL})
    reference, _ = zoo.create_backbone(f"stateful/{model}", weights=None)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "w.safetensors"
    save_file({k: v.clone() for k, v in reference.state_dict().items()}, path)  # a tied weight twice
    rng = torch.random.get_rng_state()
    loaded, info = zoo.create_backbone(f"stateful/{model}", weights=str(path))
    # everything is in the file: nothing was randomly initialized only to be overwritten
    rng_untouched = torch.equal(torch.random.get_rng_state(), rng)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))
    assert {k: v.dtype for k, v in loaded.state_dict().items()} == {k: v.dtype for k, v in reference.state_dict().items()}
    assert info.weights.startswith("file:w.safetensors@sha256:")
    if model == "scale":
        assert torch.equal(loaded[0].gain, torch.full((1, 8, 1, 1), 2.0)) and float(loaded[0].offset.max()) == 0.25
    if model == "tied":
        assert loaded[0].a.weight is loaded[0].b.weight  # still one parameter: training one trains both
    assert rng_untouched == (model == "plain")
