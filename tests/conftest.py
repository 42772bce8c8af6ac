"""Shared fixtures. No test touches the network: hub lookups are forced offline here."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

# Offline before anything imports huggingface_hub/timm: a cache miss fails at once, no retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TORCH_HOME", str(Path(os.environ.get("PYTEST_TMPDIR", "/tmp")) / "zoo-tests-torch-home"))

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MOBILENET_FILE = "mobilenet_v2-b0353104.pth"


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (none here)")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"../shared is absent ({SHARED}); it holds the offline weights and data")
    return SHARED


@pytest.fixture
def torch_hub_seeded(tmp_path, monkeypatch, shared_dir) -> Path:
    """A fresh TORCH_HOME whose hub cache holds torchvision's official MobileNetV2 file (a link
    to ../shared, which is read-only), so torchvision's own weights path runs offline."""
    src = shared_dir / "weights" / MOBILENET_FILE
    if not src.is_file():
        pytest.skip(f"{src} is absent")
    home = tmp_path / "torch-home"
    ckpt = home / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    try:
        (ckpt / MOBILENET_FILE).symlink_to(src)
    except OSError:
        shutil.copy(src, ckpt / MOBILENET_FILE)
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture
def fresh_plugins():
    """Forget loaded plugins before and after the test (env vars / sys.path changes apply)."""
    import zoo.plugin.host

    zoo.plugin.host.reset()
    yield zoo.plugin.host
    zoo.plugin.host.reset()


def install_distribution(site: Path, package_src: Path, dist_name: str, version: str,
                         entry_points: dict[str, str], package_names: list[str]) -> None:
    """Install a plugin package as a real distribution: copy its modules and write a
    .dist-info with entry_points.txt into `site`, as pip would."""
    for name in package_names:
        shutil.copytree(package_src / name, site / name)
    info = site / f"{dist_name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(
        "[zoo]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    )
    (info / "RECORD").write_text("")


@pytest.fixture
def example_plugin(tmp_path, monkeypatch, fresh_plugins):
    """The example third-party package from examples/, installed as a distribution on sys.path
    and found through entry-point discovery (not registered by hand)."""
    site = tmp_path / "site"
    site.mkdir()
    src = ROOT / "examples" / "zoo-example-plugin" / "src"
    install_distribution(site, src, "zoo-example-plugin", "0.1.0", {"example": "zoo_example_plugin"},
                         ["zoo_example_plugin"])
    monkeypatch.syspath_prepend(str(site))
    fresh_plugins.reset()
    yield "example"
    for mod in [m for m in sys.modules if m.startswith("zoo_example_plugin")]:
        del sys.modules[mod]


# The listing index (zoo.index) of the test session lives in a private folder, never ~/.cache.
os.environ.setdefault("ZOO_CACHE_DIR", str(Path(os.environ.get("PYTEST_TMPDIR", "/tmp")) / "zoo-tests-index"))
