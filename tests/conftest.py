"""Shared fixtures. No test touches the network: hub lookups are forced offline here."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

# Offline before anything imports huggingface_hub/timm: a cache miss fails at once, no retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Each xdist worker (PYTEST_XDIST_WORKER: gw0, gw1, ...) gets its own folders, so one worker's
# remembered engine choice or listing index never decides what another worker's test sees.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")
# ... and its share of the cores for torch's thread pool (OMP_NUM_THREADS, inherited by the
# commands the tests start), unless the caller set one: two workers with a pool of every core each
# spin against each other (the suite's three export-heavy modules took 180 s with -n 2 that way,
# 152 s with one thread per worker, 241 s in one process).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
_TMP = Path(os.environ.get("PYTEST_TMPDIR", "/tmp"))
os.environ.setdefault("TORCH_HOME", str(_TMP / f"zoo-tests-torch-home-{_WORKER}"))

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MOBILENET_FILE = "mobilenet_v2-b0353104.pth"


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadgroup` (pyproject's addopts) keeps a module's tests, and each part of a document's
    docs blocks, on one worker: tests/xdist_groups.py says why it is a scheduler."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist_groups import GroupScheduling

    return GroupScheduling(config, log)


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
os.environ.setdefault("ZOO_CACHE_DIR", str(_TMP / f"zoo-tests-index-{_WORKER}"))
