"""The maintenance scripts parse, and CI runs exactly the README's two Set up commands."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.mark.parametrize("script", [".ci/run", "scripts/gpu-check.sh", "scripts/gpu-wheels.sh"])
def test_scripts_are_valid_bash(script):
    proc = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_ci_reads_the_readme_set_up_commands():
    """.ci/run takes its commands from the README (awk program inside it), so they cannot drift."""
    text = (ROOT / ".ci" / "run").read_text()
    program = re.search(r"awk '([^']+)' README\.md", text)[1]
    proc = subprocess.run(["awk", program, str(ROOT / "README.md")], capture_output=True, text=True, check=True)
    assert proc.stdout.splitlines() == ['pip install -e ".[test]"', "python -m pytest"]
