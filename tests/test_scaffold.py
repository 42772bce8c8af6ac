"""`zoo plugins new NAME` writes a plugin package that pip installs and that passes its own tests
as generated: the conformance kit (provider and exporter), the pretrained weights and head, and
the offline error. Installed with pip (no network: --no-deps --no-build-isolation) into a folder
put on PYTHONPATH, so this test leaves the environment as it found it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zoo.cli.main import main


def test_name_and_target_are_checked(tmp_path, capsys):
    assert main(["plugins", "new", "Bad-Name", "--dir", str(tmp_path / "a")]) == 2
    assert "must be lowercase letters" in capsys.readouterr().err
    assert main(["plugins", "new", "timm", "--dir", str(tmp_path / "b")]) == 2
    assert "taken by the zoo or a built-in plugin" in capsys.readouterr().err
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("mine")
    assert main(["plugins", "new", "mynets", "--dir", str(tmp_path / "c")]) == 2
    assert "is not empty" in capsys.readouterr().err and (tmp_path / "c" / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_generated_plugin_installs_and_passes_its_own_tests(tmp_path):
    project = tmp_path / "zoo-mynets"
    assert main(["plugins", "new", "mynets", "--dir", str(project)]) == 0
    assert (project / "pyproject.toml").is_file() and (project / "tests" / "test_plugin.py").is_file()
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(site), str(project)], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr
    assert (site / "zoo_mynets" / "__init__.py").is_file()
    env = dict(os.environ, PYTHONPATH=str(site), ZOO_CACHE_DIR=str(tmp_path / "cache"), ZOO_STRICT_PLUGINS="1")
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error::pytest.PytestUnknownMarkWarning"],
                           cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    assert "5 passed" in tests.stdout
    # and the zoo finds it as users would
    listed = subprocess.run([sys.executable, "-m", "zoo.cli.main", "plugins", "--json"], env=env,
                            capture_output=True, text=True, timeout=300)
    row = {r["name"]: r for r in json.loads(listed.stdout)}["mynets"]
    assert (row["status"], row["distribution"], row["providers"], row["exporters"]) == \
        ("ok", "zoo-mynets", ["mynets"], ["mynets-npz"])
    assert Path(row["module"]).name == "zoo_mynets" or row["module"] == "zoo_mynets"
