"""The maintenance scripts parse, and CI runs exactly the README's two Set up commands."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
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


def test_a_parallel_run_keeps_a_modules_tests_on_one_worker():
    """The suite's `-n 2 --dist loadgroup` (pyproject's addopts) sends a module's tests to one worker
    (tests/xdist_groups.py), so module-scoped fixtures and a document's docs session are built once.
    Negative control, as it was with pytest 9.2 and `xdist_group` marks: plain `--dist load` spreads
    the same three tests over both workers."""
    def workers(*dist: str) -> set[str]:
        proc = subprocess.run([sys.executable, "-m", "pytest", "tests/test_ci_scripts.py", "-k", "valid_bash", "-v",
                               "-p", "no:cacheprovider", "-n", "2", *dist], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        ran = re.findall(r"\[(gw\d+)\] \[ *\d+%\] PASSED tests/test_ci_scripts.py::test_scripts_are_valid_bash", proc.stdout)
        assert len(ran) == 3, proc.stdout[-3000:]
        return set(ran)

    assert len(workers()) == 1
    assert len(workers("--dist", "load")) == 2


def test_the_longest_work_units_go_out_first():
    """One 130 s docs block handed out last kept one worker busy for two minutes after the other had
    finished; units go out by their measured length, others by their number of tests. Every measured
    unit still exists (a renamed module would silently lose its place)."""
    from xdist_groups import SECONDS, longest_first

    units = {"tests/test_a.py": dict.fromkeys("abc", False), "doc:docs/bench.md": {"x": False},
             "tests/test_b.py": dict.fromkeys("abcde", False), "tests/test_journey.py": dict.fromkeys("ab", False)}
    assert longest_first(units) == ["tests/test_journey.py", "doc:docs/bench.md", "tests/test_b.py", "tests/test_a.py"]
    for group in SECONDS:
        if group.startswith("doc:"):
            assert (ROOT / group[4:].split("#")[0]).is_file(), group
        else:
            assert (ROOT / group).is_file(), group
