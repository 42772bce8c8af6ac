"""Exporter options are `zoo export` flags generated from each `Exporter.options` (the core declares
none), options of the same name in two formats follow one stated rule, each exporter contributes its
own versions, and every export step has a time budget (a fake slow exporter, budgets of seconds; the reference step has the same budget, so not less)."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest

import zoo
from zoo import Exporter, ExportOption, ValidationResult
from zoo.cli import cmd_export
from zoo.cli.main import build_parser
from zoo.exporting.budget import StepTimeout
from zoo.testing import tiny_model

ROOT = Path(__file__).resolve().parents[1]


class Slow(Exporter):
    """A third-party format whose export and validation sleep as long as asked."""

    name = "slowfmt"
    suffix = ".slow"
    options = (ExportOption("export_sleep", 0.0, "seconds export sleeps", type=float),
               ExportOption("validate_sleep", 0.0, "seconds validation sleeps", type=float),
               ExportOption("content", "v1", "what the file holds"),
               # `optimize` is a switch for the ONNX formats: here it takes a value
               ExportOption("optimize", "none", "how hard to optimize", choices=("none", "fast")))

    def export(self, model, path, options):
        Path(path).write_text(options["content"])
        _sleep(options["export_sleep"])  # after writing: a timeout must not leave the half-done file
        return {"optimize": options["optimize"]}

    def validate(self, model, path, images, options, reference, tolerance, batch_sizes, targets):
        _sleep(options["validate_sleep"])
        return ValidationResult(passed=True, runtime="sleep")

    def versions(self):
        return {"slowlib": "9.9"}


def _sleep(seconds: float) -> None:
    """Python-level waiting (short native sleeps), as a stuck export in Python code is: off the main
    thread the budget acts between bytecodes."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.02)


@pytest.fixture
def slow(monkeypatch):
    """The fake format registered live, and `zoo export`'s flags read from the live registry."""
    from zoo import index
    from zoo.plugin import registry

    reg = registry.exporters()
    monkeypatch.setitem(reg._exporters, Slow.name, (Slow(), "test-slow"))
    monkeypatch.setattr(index, "export_flag_options", lambda: index.exporter_options(reg))
    return reg


def _export_parser():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices["export"]


# -- generated flags ----------------------------------------------------------------------------------
def test_the_core_declares_no_onnx_flag():
    for path in ("zoo/cli/cmd_export.py", "zoo/options.py"):
        code = "\n".join(line for line in (ROOT / path).read_text().splitlines() if not line.strip().startswith("#"))
        assert not re.search(r"opset|onnx_exporter|int8_ops|int8_mode|dynamic_size|validate_target|ONNX_OPSETS",
                             code), path
    # the versions list names no exporter's packages: each exporter reports its own
    import inspect

    from zoo.exporting import artifact

    assert not re.search(r"onnx", inspect.getsource(artifact.versions))


def test_documented_flags_come_from_the_exporters_with_real_defaults():
    text = " ".join(_export_parser().format_help().split())
    for spelled in ("--opset N", "--onnx-exporter {auto,dynamo,legacy}", "--int8-mode {static,dynamic}",
                    "--int8-ops {all,matmul}", "--optimize", "--target {onnxruntime,openvino,opencv}",
                    "--no-validate-target", "--dynamic-size"):
        assert spelled in text, spelled
    assert "[onnx, onnx-int8] (default 18; 7..23)" in text  # the real default and range, from the option
    assert "[onnx-int8] (default static)" in text
    args = _export_parser().parse_args(["RUN", "--opset", "17", "--no-validate-target", "--optimize",
                                        "--int8-ops", "matmul", "-O", "opset=16", "-O", "target=opencv"])
    assert cmd_export._options(args) == {"opset": 17, "validate_target": False, "optimize": True,
                                         "int8_ops": "matmul", "target": "opencv"}  # the flag wins over -O
    assert cmd_export._options(_export_parser().parse_args(["RUN"])) == {}  # absent flags send nothing


def test_same_named_options_one_flag_or_a_value_flag_when_they_disagree():
    def o(name, default, type_="str", flag=None, choices=()):
        return {"name": name, "default": default, "type": type_, "flag": flag or "--" + name.replace("_", "-"),
                "choices": list(choices), "help": f"{name} help", "metavar": ""}

    flags = {f["name"]: f for f in cmd_export.export_flags({
        "a": [o("level", 1, "int"), o("optimize", False, "bool")],
        "b": [o("level", 1, "int"), o("optimize", "none", choices=("none", "fast"))]})}
    assert flags["level"]["flag"] == "--level" and flags["level"]["type"] == "int"  # agree: one typed flag
    assert "[a, b]" in flags["level"]["help"] and flags["level"]["default"] == 1
    bad = flags["optimize"]  # a switch in a, a value in b: a VALUE flag each parses, both meanings told
    assert (bad["flag"], bad["type"], bad["metavar"]) == ("--optimize", "str", "VALUE")
    assert "declared differently by a, b" in bad["help"]
    assert "a: optimize help (default off)" in bad["help"] and "b: optimize help (default none)" in bad["help"]


def test_a_third_party_option_is_a_flag_and_a_clash_feeds_each_format_its_own_parse(slow, tmp_path):
    p = _export_parser()
    text = " ".join(p.format_help().split())
    assert "--export-sleep X seconds export sleeps [slowfmt] (default 0.0)" in text
    assert "--optimize VALUE optimize, declared differently by onnx, onnx-int8, slowfmt" in text
    args = p.parse_args(["RUN", "--optimize", "fast", "--export-sleep", "0"])
    given = cmd_export._options(args)
    assert given == {"optimize": "fast", "export_sleep": 0.0}
    report = zoo.export(tiny_model(), formats="slowfmt", out=tmp_path / "o", options=given)
    assert report["artifacts"]["slowfmt"]["export"] == {"optimize": "fast"}
    with pytest.raises(zoo.errors.ZooError, match="'onnx': option 'optimize' is a switch: true or false, got 'fast'"):
        zoo.export(tiny_model(), formats=["slowfmt", "onnx"], out=tmp_path / "p", options=given)  # each parses it
    assert not (tmp_path / "p").exists()


def test_a_flag_shadowing_a_core_flag_stays_an_option(slow, monkeypatch):
    monkeypatch.setattr(Slow, "options", Slow.options + (ExportOption("tolerance", "x", "mine"),))
    p = _export_parser()
    assert p.parse_args(["RUN", "--tolerance", "0.5"]).tolerance == 0.5  # the core's --tolerance still rules
    assert "mine [slowfmt]" not in " ".join(p.format_help().split())


# -- versions -----------------------------------------------------------------------------------------
def test_each_exporter_contributes_its_own_versions(slow, tmp_path):
    from zoo.exporting import artifact_metadata

    model = tiny_model()
    assert "onnxruntime" in artifact_metadata(model, "onnx")["versions"]
    assert "nncf" in artifact_metadata(model, "onnx-int8")["versions"]
    ts = artifact_metadata(model, "torchscript")["versions"]
    assert "onnx" not in ts and {"zoo", "torch"} <= set(ts)
    report = zoo.export(model, formats="slowfmt", out=tmp_path / "o")
    assert report["versions"]["slowlib"] == "9.9"


# -- time budgets -------------------------------------------------------------------------------------
def test_a_step_over_its_budget_stops_naming_it_and_keeps_the_previous_artifact(slow, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = zoo.export(tiny_model(), formats="slowfmt", out=out, step_budget=30, export_sleep=0.0)  # control
    assert first["artifacts"]["slowfmt"]["status"] == "passed" and first["options"]["step_budget_seconds"] == 30
    t = time.perf_counter()
    with pytest.raises(StepTimeout, match=r"export format 'slowfmt': the export step did not finish within its "
                                          r"time budget of 5 s .*--step-budget SECONDS"):
        zoo.export(tiny_model(), formats="slowfmt", out=out, step_budget=5, export_sleep=60, content="v2")
    assert time.perf_counter() - t < 30  # stopped, not slept out (a bound on the mechanism, not on speed)
    assert sorted(p.name for p in out.iterdir()) == ["export-report.json", "model.slow", "model.slow.json"]
    assert (out / "model.slow").read_text() == "v1"  # the earlier validated file, not the half-done one
    report = json.loads((out / "export-report.json").read_text())
    assert report["status"] == "timed out" and "time budget" in report["artifacts"]["slowfmt"]["error"]
    assert StepTimeout("x").exit_code == 2

    monkeypatch.setenv("ZOO_EXPORT_STEP_BUDGET", "5")  # the environment sets it too; validation has one
    with pytest.raises(StepTimeout, match="'slowfmt': the validation step .* 5 s"):
        zoo.export(tiny_model(), formats="slowfmt", out=out, validate_sleep=60, content="v3")
    assert (out / "model.slow").read_text() == "v1"
    monkeypatch.setenv("ZOO_EXPORT_STEP_BUDGET", "soon")
    with pytest.raises(zoo.errors.ZooError, match="ZOO_EXPORT_STEP_BUDGET='soon' is not a number"):
        zoo.export(tiny_model(), formats="slowfmt", out=out)


def test_the_budget_holds_off_the_main_thread(slow, tmp_path):
    caught: list[BaseException] = []

    def work():
        try:
            zoo.export(tiny_model(), formats="slowfmt", out=tmp_path / "t", step_budget=5, export_sleep=0.0,
                       validate_sleep=0.0)  # control: passes inside the thread
            zoo.export(tiny_model(), formats="slowfmt", out=tmp_path / "t", step_budget=5, export_sleep=60)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            caught.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(60)
    assert not thread.is_alive()
    assert len(caught) == 1 and isinstance(caught[0], StepTimeout), caught
    assert (tmp_path / "t" / "model.slow").read_text() == "v1"


def test_a_budget_inside_a_step_keeps_the_steps_own():
    from zoo.exporting.budget import budget

    with pytest.raises(StepTimeout, match="^outer did not finish within its time budget of 0.5 s"):
        with budget("outer", 0.5):
            with budget("inner", 30):  # an exporter timing a sub-step: done in time
                _sleep(0.1)
            _sleep(30)  # the outer budget still holds after the inner one was disarmed
    with budget("control", 30):
        _sleep(0.1)  # finishes: nothing raised, and no alarm left armed afterwards
    _sleep(0.6)


def test_an_enclosing_alarm_keeps_its_deadline_and_handler():
    """pytest-timeout (or any caller) arming SIGALRM around an export: its sooner deadline still fires."""
    import signal

    from zoo.exporting.budget import budget

    class Outer(Exception):
        pass

    def outer(signum, frame):
        raise Outer()

    previous = signal.signal(signal.SIGALRM, outer)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(Outer):
            with budget("step", 30):
                _sleep(30)  # the caller's 0.5 s comes first, through the caller's handler
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with budget("step", 30):
            _sleep(0.1)  # done before either deadline
        with pytest.raises(Outer):
            _sleep(30)  # the caller's timer was re-armed on the way out
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
