"""Third-party plugins: found through entry points, isolated when broken, strict mode re-raises."""

import json
import textwrap

import pytest

import zoo
from conftest import install_distribution
from zoo import registry
from zoo.errors import PluginError

STATS = "Normalization(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), input_size=(3, 32, 32), resize_size=36)"
HEADER = "from zoo import BackboneSpec, Normalization, hookimpl\n"
BROKEN = {
    "bad_import": "import this_module_does_not_exist\n",
    "bad_hook": HEADER + textwrap.dedent("""
        @hookimpl
        def register_backbones(register):
            raise RuntimeError("boom in register")
    """),
    "bad_std": HEADER + textwrap.dedent(f"""
        @hookimpl
        def register_backbones(register):
            register(BackboneSpec(provider="badstd", model="net"))
        @hookimpl
        def backbone_normalization(spec, weights):
            return Normalization(mean=(0.5, 0.5, 0.5), std=(0.5, 0.0, 0.5), input_size=(3, 32, 32), resize_size=36)
    """),
    "bad_len": HEADER + textwrap.dedent("""
        @hookimpl
        def register_backbones(register):
            register(BackboneSpec(provider="badlen", model="net"))
        @hookimpl
        def backbone_normalization(spec, weights):
            return Normalization(mean=(0.5, 0.5), std=(0.5, 0.5), input_size=(3, 32, 32), resize_size=36)
    """),
    "dup_name": HEADER + textwrap.dedent(f"""
        @hookimpl
        def register_backbones(register):
            register(BackboneSpec(provider="dupok", model="fine"))       # would be fine alone...
            register(BackboneSpec(provider="torchvision", model="resnet18"))  # ...but this clashes
        @hookimpl
        def backbone_normalization(spec, weights):
            return {STATS}
    """),
}


@pytest.fixture
def broken_site(tmp_path, monkeypatch, fresh_plugins):
    site = tmp_path / "broken-site"
    site.mkdir()
    src = tmp_path / "src"
    for name, code in BROKEN.items():
        (src / f"zoo_{name}").mkdir(parents=True)
        (src / f"zoo_{name}" / "__init__.py").write_text(code)
        install_distribution(site, src, f"zoo-{name.replace('_', '-')}", "1.2.3", {name: f"zoo_{name}"},
                             [f"zoo_{name}"])
    monkeypatch.syspath_prepend(str(site))
    fresh_plugins.reset()
    return site


def test_example_plugin_is_discovered_through_its_entry_point(example_plugin):
    assert "example/tinynet" in zoo.list_models()
    st = zoo.plugins.get_host().status["example"]
    assert (st.status, st.distribution, st.version) == ("ok", "zoo-example-plugin", "0.1.0")
    assert "register_backbones" in st.hooks and "register_exporters" in st.hooks
    n = zoo.get_normalization("example/tinynet")
    assert n.mean == (0.5, 0.4, 0.3) and n.input_size == (3, 64, 64)  # its own stats, not ImageNet's
    assert "example-npz" in registry.exporters().names()


def test_broken_plugins_are_isolated_and_reported(broken_site, capsys):
    from zoo.cli.main import main

    names = zoo.list_models()
    assert "torchvision/resnet18" in names and "timm/resnet18" in names  # the others keep working
    assert not any(n.startswith(("badstd/", "badlen/", "dupok/")) for n in names)  # all-or-nothing
    status = zoo.plugins.get_host().status
    assert status["bad_import"].status == "broken" and "this_module_does_not_exist" in status["bad_import"].error
    assert "boom in register" in status["bad_hook"].error
    assert "std must be > 0" in status["bad_std"].error
    assert "one value per input channel" in status["bad_len"].error
    assert "'torchvision'" in status["dup_name"].error and "'dup_name'" in status["dup_name"].error
    assert main(["plugins", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["bad_hook"]["status"] == "broken" and rows["bad_hook"]["version"] == "1.2.3"
    assert rows["torchvision"]["status"] == "ok" and rows["torchvision"]["backbones"] > 50
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "bad_std: broken: register_backbones:" in out


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


def test_a_hook_that_fails_at_call_time_names_the_plugin(tmp_path, monkeypatch, fresh_plugins):
    src = tmp_path / "src"
    (src / "zoo_flaky").mkdir(parents=True)
    (src / "zoo_flaky" / "__init__.py").write_text(HEADER + textwrap.dedent(f"""
        @hookimpl
        def register_backbones(register):
            register(BackboneSpec(provider="flaky", model="net"))
        @hookimpl
        def backbone_normalization(spec, weights):
            return {STATS}
        @hookimpl
        def create_backbone(spec, weights):
            raise ValueError("cannot build today")
    """))
    site = tmp_path / "site"
    site.mkdir()
    install_distribution(site, src, "zoo-flaky", "0.0.1", {"flaky": "zoo_flaky"}, ["zoo_flaky"])
    monkeypatch.syspath_prepend(str(site))
    fresh_plugins.reset()
    with pytest.raises(PluginError, match="plugin 'flaky' failed in create_backbone: ValueError: cannot build today"):
        zoo.create_backbone("flaky/net", weights=None)
    zoo.create_backbone("example/tinynet" if "example/tinynet" in zoo.list_models() else "torchvision/resnet18",
                        weights=None)  # other plugins unaffected
