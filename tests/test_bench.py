"""`zoo bench`: every runtime, mode and output format on tiny models; failures become rows.

Kept small: timm/test_efficientnet (99k params) and torchvision/squeezenet1_1 at 32 px, batch 1-2,
1 warm-up, 2 repeats, 1 thread (single-threaded timings do not stall when the 2 cores are busy).
"""

from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys
import time

import pytest

from zoo.bench.runtimes import Runtime

TINY = "timm/test_efficientnet"
SMALL = "torchvision/squeezenet1_1"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class BrokenRuntime(Runtime):
    """A runtime that cannot run anything: its rows must carry the error, the run must go on."""

    name = "broken"

    def prepare(self, module, example, mode, device, threads):
        raise RuntimeError("deliberately broken runtime")


class CrashingRuntime(Runtime):
    """Kills the measuring process outright (as a segfault or the OOM killer would)."""

    name = "crashing"

    def prepare(self, module, example, mode, device, threads):
        os._exit(3)


class SleepingRuntime(Runtime):
    name = "sleeping"

    def prepare(self, module, example, mode, device, threads):
        time.sleep(600)


def small_config(**kw):
    from zoo.bench.runner import BenchConfig

    base = dict(patterns=[TINY], runtimes=["eager"], modes=["infer"], batch_sizes=[1, 2], image_size=32,
                device="cpu", warmup=1, repeats=2, threads=1, isolate="none")
    base.update(kw)
    return BenchConfig(**base)


@pytest.fixture(scope="module")
def doc():
    """One in-process run over every non-compile runtime, every mode, and a broken runtime."""
    from zoo.bench.runner import run_bench

    cfg = small_config(runtimes=["eager", "channels_last", "test_bench:BrokenRuntime", "torchscript", "onnxruntime"],
                       modes=["infer", "train-frozen", "train-full"], probe=True)
    return run_bench(cfg)


def ok_rows(doc, **match):
    return [r for r in doc["rows"] if not r["error"] and all(r[k] == v for k, v in match.items())]


def test_every_combination_is_a_row(doc):
    keys = [(r["runtime"], r["mode"], r["batch_size"]) for r in doc["rows"]]
    expected = [(rt, m, b) for m in ("infer", "train-frozen", "train-full")
                for rt in ("eager", "channels_last", "broken", "torchscript", "onnxruntime") for b in (1, 2)]
    assert keys == expected


def test_rows_are_well_formed(doc):
    import torch

    from zoo.backbones import create_backbone
    from zoo.bench.flops import forward_gflops
    from zoo.bench.report import ROW_FIELDS

    module, info = create_backbone(TINY, weights=None)
    gflops = forward_gflops(module, 32)
    assert gflops > 0
    for r in doc["rows"]:
        assert set(ROW_FIELDS) <= set(r), set(ROW_FIELDS) - set(r)
        assert (r["backbone"], r["image_size"], r["device"], r["threads"]) == (TINY, 32, "cpu", 1)
        assert r["params"] == info.num_params and r["feature_dim"] == info.feature_dim == 256
        assert r["gflops"] == pytest.approx(gflops, rel=1e-3)
        assert r["weights"] is None  # random init by default
        assert r["probe_acc"] is not None
    good = ok_rows(doc)
    # every runtime ran every mode it supports at batch 2 (batch 1 train-full may hit BatchNorm's
    # "more than 1 value per channel" at 32 px, which is itself an honest error row)
    for rt in ("eager", "channels_last", "torchscript", "onnxruntime"):
        for mode in ("infer", "train-frozen") + (("train-full",) if rt != "onnxruntime" else ()):
            assert ok_rows(doc, runtime=rt, mode=mode, batch_size=2), (rt, mode)
    for r in good:
        assert r["throughput"] > 0 and r["setup_s"] >= 0
        assert 0 < r["time_p50_ms"] <= r["time_p95_ms"]
        assert r["throughput"] == pytest.approx(r["batch_size"] / (r["time_mean_ms"] / 1e3), rel=0.01)
        if r["batch_size"] == 1:
            assert (r["latency_p50_ms"], r["latency_p95_ms"]) == (r["time_p50_ms"], r["time_p95_ms"])
        else:
            assert r["latency_p50_ms"] is None
        assert r["peak_mem_mb"] is None  # in-process on CPU: not measured rather than contaminated
    assert torch.get_num_threads() >= 1


def test_failing_combinations_are_rows_and_the_run_goes_on(doc):
    broken = [r for r in doc["rows"] if r["runtime"] == "broken"]
    assert len(broken) == 6 and all("deliberately broken runtime" in r["error"] for r in broken)
    assert all(r["throughput"] is None for r in broken)
    ort_full = [r for r in doc["rows"] if r["runtime"] == "onnxruntime" and r["mode"] == "train-full"]
    assert ort_full and all(r["error"].startswith("Unsupported") for r in ort_full)
    # runtimes listed after the broken one were still measured
    assert ok_rows(doc, runtime="torchscript", mode="infer")
    assert ok_rows(doc, runtime="onnxruntime", mode="infer")
    onnx = ok_rows(doc, runtime="onnxruntime", mode="infer")[0]
    assert "onnx exporter" in onnx["note"]


def test_probe_and_training_summary(doc):
    from zoo.bench.report import training_summary

    (probe,) = doc["probe"]
    assert probe["error"] is None and (probe["train_images"], probe["val_images"]) == (400, 200)
    assert 0.0 <= probe["val_acc"] <= 1.0 and probe["val_acc"] > 0.1  # 10 classes: above chance even random
    pairs = training_summary(doc["rows"])
    assert {(p["runtime"], p["batch_size"]) for p in pairs} >= {("eager", 2), ("torchscript", 2)}
    for p in pairs:
        assert p["time_ratio"] == pytest.approx(p["full_ms"] / p["frozen_ms"], rel=0.01)


def test_probe_extracts_through_the_feature_cache_under_zoo_trains_key(tmp_path):
    """`zoo bench --probe` then `zoo train` on the same sample, backbone, weights and image size:
    the training run finds every image's features in the cache (the two share one key), and a
    second probe extracts nothing and scores the same; the control, another image size, is a
    different key and extracts all 600."""
    import zoo
    from zoo.bench.probe import linear_probe

    cache = str(tmp_path / "cache")
    first = linear_probe(TINY, None, 32, "cpu", threads=1, cache_dir=cache)
    again = linear_probe(TINY, None, 32, "cpu", threads=1, cache_dir=cache)
    assert first["error"] is None and again["error"] is None
    assert (first["cache"], again["cache"]) == ("0 hit / 600 extracted", "600 hit / 0 extracted")
    assert again["val_acc"] == first["val_acc"] and again["train_acc"] == first["train_acc"]

    def train(image_size):
        run = zoo.train(TINY, None, weights=None, image_size=image_size, epochs=1, cache_dir=cache,
                        progress=False, folds=0)
        return run.cache["hits"], run.cache["misses"]

    assert train(32) == (600, 0)
    assert train(64) == (0, 600)  # control: a key that differs extracts everything


def test_outputs_table_csv_json_and_plots(doc, tmp_path):
    import matplotlib.image

    from zoo.bench.plots import write_plots
    from zoo.bench.report import render_table, write_outputs

    paths = write_outputs(doc, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["schema"] == "zoo-bench/1" and len(data["rows"]) == len(doc["rows"])
    env = data["environment"]
    for key in ("cpu_model", "cpu_logical_cores", "threads", "torch", "onnxruntime", "gpu_name", "device"):
        assert key in env
    assert env["threads"] == 1 and env["torch"] and env["onnxruntime"]
    with open(paths["csv"], newline="") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == len(doc["rows"])
    assert lines[0]["backbone"] == TINY and lines[0]["env_cpu_model"] == env["cpu_model"]
    assert any(line["error"] for line in lines) and all(line["env_torch"] for line in lines)
    table = render_table(doc)
    assert paths["table"].read_text().strip() == table.strip()
    assert "IMG/S" in table and "P95 MS" in table and "PROBE" in table and "random init" in table
    assert "deliberately broken runtime" in table and "train-frozen vs train-full" in table
    plots = write_plots(doc, tmp_path / "plots")
    names = sorted(p.name for p in plots)
    assert names == ["latency_vs_params.png", "throughput_infer.png", "throughput_train-frozen.png",
                     "throughput_train-full.png"]
    for p in plots:
        assert p.read_bytes()[:8] == PNG_MAGIC
        assert matplotlib.image.imread(p).shape[0] > 100


def test_compare_ratios_row_by_row(doc, tmp_path, capsys):
    from zoo.bench.report import compare, write_outputs
    from zoo.cli.main import main

    b = copy.deepcopy(doc)
    for r in b["rows"]:
        if r["throughput"]:
            r["throughput"] /= 2
            r["time_p50_ms"] *= 2
    b["rows"].append({**b["rows"][0], "batch_size": 64})
    rows = compare(doc, b)
    ratios = [r["throughput_ratio"] for r in rows if r["throughput_ratio"] is not None]
    assert ratios and all(x == pytest.approx(0.5, rel=1e-3) for x in ratios)
    assert all(r["p50_ratio"] == pytest.approx(2.0, rel=1e-3) for r in rows if r["p50_ratio"] is not None)
    assert [r["status"] for r in rows].count("only in B") == 1
    assert any(r["status"] == "error in A and B" for r in rows)
    write_outputs(doc, tmp_path / "a")
    write_outputs(b, tmp_path / "b")
    a_json, b_json = str(tmp_path / "a" / "bench.json"), str(tmp_path / "b" / "bench.json")
    assert main(["bench", "--compare", a_json, b_json]) == 0
    out = capsys.readouterr().out
    assert "0.50x" in out and "2.00x" in out and "only in B" in out
    assert main(["bench", "--compare", a_json, b_json, "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["rows"]) == len(rows)
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert main(["bench", "--compare", a_json, str(tmp_path / "bad.json")]) == 2


def test_cli_end_to_end(tmp_path, capsys):
    from zoo.cli.main import main

    out = tmp_path / "run"
    argv = ["bench", SMALL, TINY, "--image-size", "32", "--batch-size", "1", "--runtime", "eager",
            "--mode", "infer", "--isolate", "none", "--repeats", "2", "--warmup", "1", "--threads", "1",
            "--out", str(out), "-q"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert SMALL in text and TINY in text and "wrote" in text
    assert {p.name for p in out.iterdir()} >= {"bench.json", "bench.csv", "bench.txt", "throughput_infer.png",
                                                 "latency_vs_params.png"}
    assert main(argv[:-3] + ["--out", str(tmp_path / "j"), "--json", "--no-plots"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["backbone"] for r in data["rows"]] == [SMALL, TINY]
    assert not list((tmp_path / "j").glob("*.png"))
    # input mistakes fail fast with a message, not as rows
    assert main(["bench", SMALL, "--runtime", "tensorrt", "--isolate", "none"]) == 2
    assert "unknown runtime 'tensorrt'" in capsys.readouterr().err
    assert main(["bench", "no_such_model_*"]) == 2
    assert main(["bench", SMALL, "--mode", "fly"]) == 2
    assert main(["bench"]) == 2


def test_bench_parser_does_not_import_torch():
    code = ("import argparse, sys; from zoo.cli import cmd_bench\n"
            "p = argparse.ArgumentParser(); cmd_bench.add_parser(p.add_subparsers())\n"
            "p.parse_args(['bench', 'x', '--batch-size', '1,2']); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_helpers():
    from zoo.bench.measure import percentile, time_calls
    from zoo.bench.runner import resolve_backbones

    assert percentile([4, 1, 3, 2], 50) == 2.5 and percentile([1, 2, 3, 4, 5], 95) == pytest.approx(4.8)
    calls = []
    stats = time_calls(lambda: calls.append(1), warmup=3, repeats=4, sync=lambda: None)
    assert len(calls) == 7 and stats["n"] == 4 and stats["p50"] <= stats["p95"]
    assert resolve_backbones(["torchvision/squeezenet1_*", SMALL]) == ["torchvision/squeezenet1_0", SMALL]


@pytest.mark.slow
def test_isolated_children_peak_rss_crash_and_timeout():
    """Each measurement in its own process: peak RSS is the child's; a crashing or hanging
    child becomes an error row and the next measurement still runs.

    The hanging child gets a short limit and the others a long one: one limit for all once made
    a healthy child (spawn, import torch, build, measure) on a loaded CI machine run past it."""
    from zoo.bench.isolate import measure_in_child
    from zoo.bench.runner import run_bench

    cfg = small_config(patterns=[SMALL], batch_sizes=[1], isolate="process", timeout=10,
                       runtimes=["eager", "test_bench:CrashingRuntime", "test_bench:SleepingRuntime",
                                 "test_bench:BrokenRuntime", "onnxruntime"])
    from zoo.bench.measure import rss_mb

    def measure_fn(task):
        return measure_in_child(task, cfg.timeout if task.runtime.endswith("SleepingRuntime") else 600)

    ballast = bytearray(b"\x01") * (1200 * 2**20)  # the parent gets big: children must not inherit that
    parent_rss = rss_mb()
    assert parent_rss > 1200
    rows = run_bench(cfg, measure_fn=measure_fn)["rows"]
    del ballast
    by = {r["runtime"]: r for r in rows}
    assert list(by) == ["eager", "crashing", "sleeping", "broken", "onnxruntime"]
    for name in ("eager", "onnxruntime"):
        r = by[name]
        assert r["error"] is None and r["throughput"] > 0
        assert r["mem_kind"] == "peak RSS (child process)"
        assert parent_rss > r["peak_mem_mb"] > r["base_rss_mb"] > 50
    assert "ChildCrashed" in by["crashing"]["error"] and "status 3" in by["crashing"]["error"]
    assert "Timeout" in by["sleeping"]["error"]
    assert "deliberately broken" in by["broken"]["error"] and by["broken"]["peak_mem_mb"] > 0


@pytest.mark.slow
def test_compile_runtime_runs_or_degrades_to_an_error_row():
    from zoo.bench.runner import run_bench

    rows = run_bench(small_config(runtimes=["compile"], batch_sizes=[2]))["rows"]
    (r,) = rows
    assert r["runtime"] == "compile"
    if r["error"] is None:  # torch.compile works here: compilation counted as setup, not timing
        assert r["throughput"] > 0 and r["setup_s"] * 1e3 > r["time_p50_ms"]
    else:
        assert r["throughput"] is None and r["error"]


@pytest.mark.cuda
def test_cuda_peak_memory_is_the_allocators():
    from zoo.bench.runner import run_bench

    rows = run_bench(small_config(device="cuda", modes=["infer", "train-full"], batch_sizes=[2]))["rows"]
    for r in rows:
        assert r["error"] is None and r["mem_kind"] == "CUDA allocator peak" and r["peak_mem_mb"] > 0


def test_precision_axis_runs_torch_runtimes_under_autocast_and_refuses_the_rest():
    from zoo.bench.report import render_table
    from zoo.bench.runner import run_bench

    doc = run_bench(small_config(runtimes=["eager", "onnxruntime", "compile-cudagraphs"], precisions=["fp32", "bf16"],
                                 batch_sizes=[2]))
    rows = {(r["runtime"], r["precision"]): r for r in doc["rows"]}
    assert set(rows) == {(rt, p) for rt in ("eager", "onnxruntime", "compile-cudagraphs") for p in ("fp32", "bf16")}
    assert rows[("eager", "bf16")]["error"] is None and rows[("eager", "bf16")]["throughput"] > 0
    assert rows[("onnxruntime", "fp32")]["error"] is None
    assert rows[("onnxruntime", "bf16")]["error"].startswith("Unsupported") and "fp32" in rows[("onnxruntime", "bf16")]["error"]
    assert all(rows[("compile-cudagraphs", p)]["error"].startswith("Unsupported") for p in ("fp32", "bf16"))  # CUDA only
    assert "eager bf16" in render_table(doc)


def test_precision_autocast_really_changes_the_compute_dtype():
    import torch

    from zoo.bench.measure import Task, _autocast

    seen = []
    lin = torch.nn.Linear(4, 4)
    step = _autocast(Task("x", "eager", "infer", 1, 8, precision="bf16"), lambda: seen.append(lin(torch.ones(1, 4)).dtype))
    step()
    assert seen == [torch.bfloat16]


def test_unknown_precision_is_refused_up_front():
    from zoo.bench.runner import validate
    from zoo.errors import ZooError

    with pytest.raises(ZooError, match="fp8"):
        validate(small_config(precisions=["fp8"]))
