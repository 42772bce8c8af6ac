"""The typing gate: `mypy --strict` on the plugin wing and the modules it hands plugins (the files
listed in pyproject's [tool.mypy]), `ruff check` on the whole repository ([tool.ruff]), and the
public API typed for a plugin author's checker (py.typed, TYPE_CHECKING imports in zoo/__init__.py)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> None:
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed (it is in the `test` extra: pip install -e .[test])")


def _run(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_mypy_strict_passes_on_the_typed_wing():
    _tool("mypy")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert config["strict"] is True
    assert {"zoo/plugin", "zoo/records.py", "zoo/options.py", "zoo/model.py", "zoo/index.py"} <= set(config["files"])
    out = _run("mypy")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "Success: no issues found" in out.stdout


def test_ruff_passes_on_the_repository():
    _tool("ruff")
    out = _run("ruff", "check", ".")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_a_plugin_authors_checker_sees_the_real_api(tmp_path):
    """zoo.BackboneProvider is the class, not Any: a mistyped provider is caught before it runs
    (and the negative control: a correct one passes)."""
    _tool("mypy")
    assert (ROOT / "zoo" / "py.typed").is_file()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["zoo"]
    wrong = tmp_path / "wrong.py"
    wrong.write_text("import zoo\n\n\nclass P(zoo.BackboneProvider):\n    name = 3\n")
    right = tmp_path / "right.py"
    right.write_text("import zoo\n\n\nclass P(zoo.BackboneProvider):\n    name = 'mine'\n\n"
                     "    def specs(self) -> list[zoo.BackboneSpec]:\n        return []\n")
    env = dict(os.environ, MYPYPATH=str(ROOT))
    args = ("mypy", "--strict", "--follow-imports=silent", "--no-incremental")
    bad = _run(*args, str(wrong), cwd=tmp_path, env=env)
    assert bad.returncode == 1 and 'base class "BackboneProvider" defined the type as "str"' in bad.stdout, bad.stdout
    good = _run(*args, str(right), cwd=tmp_path, env=env)
    assert good.returncode == 0, good.stdout
