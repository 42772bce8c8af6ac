"""Benchmark output: the human table, CSV and JSON files (with the environment), and --compare."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Sequence

from zoo.table import fmt_count, render
from zoo.io import write_json, write_text

ROW_FIELDS = (
    "backbone", "weights", "runtime", "precision", "mode", "device", "batch_size", "image_size", "params", "gflops",
    "feature_dim", "throughput", "time_mean_ms", "time_p50_ms", "time_p95_ms", "latency_p50_ms",
    "latency_p95_ms", "setup_s", "peak_mem_mb", "mem_kind", "base_rss_mb", "threads", "load_avg_1m", "warmup",
    "repeats",
    "probe_acc", "note", "error",
)
ENV_FIELDS = ("cpu_model", "cpu_logical_cores", "cpu_physical_cores", "threads", "device", "gpu_name", "torch",
              "onnxruntime", "python", "platform")


def _num(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.{digits}f}" if isinstance(v, float) else str(v)


def _sig(v: Any) -> str:
    return "-" if v is None else f"{v:.3g}"


def _short(text: str | None, width: int = 60) -> str:
    if not text:
        return ""
    return text if len(text) <= width else text[: width - 3] + "..."


def environment_lines(doc: dict[str, Any]) -> list[str]:
    env, cfg = doc.get("environment", {}), doc.get("config", {})
    cores = f"{env.get('cpu_physical_cores') or '?'} physical / {env.get('cpu_logical_cores') or '?'} logical cores"
    lines = [
        f"machine: {env.get('cpu_model')} ({cores}); {env.get('threads')} threads; device {env.get('device')}"
        + (f" ({env['gpu_name']})" if env.get("gpu_name") else ""),
        f"software: torch {env.get('torch')}, onnxruntime {env.get('onnxruntime')}, python {env.get('python')}",
        f"timing: first call timed as setup, then {cfg.get('warmup')} warm-up + {cfg.get('repeats')} timed calls; "
        f"measurements isolated: {cfg.get('isolate')}",
    ]
    if cfg.get("weights_note"):
        lines.append(cfg["weights_note"])
    loads = [r["load_avg_1m"] for r in doc.get("rows", []) if r.get("load_avg_1m") is not None]
    if loads:
        busy = env.get("device") == "cpu" and max(loads) > (env.get("threads") or 1) + 0.75
        lines.append(f"1-min load average during the run: {min(loads):.2f}-{max(loads):.2f} (includes the "
                     f"benchmark's own {env.get('threads')} threads)"
                     + ("; other processes competed for the CPU, so CPU timings are pessimistic and noisy"
                        if busy else ""))
    return lines


def render_table(doc: dict[str, Any]) -> str:
    rows = doc["rows"]
    with_probe = any(r.get("probe_acc") is not None for r in rows) or bool(doc.get("probe"))
    headers = ["BACKBONE", "RUNTIME", "MODE", "BATCH", "PX", "PARAMS", "GFLOPS", "FEAT", "IMG/S",
               "P50 MS", "P95 MS", "PEAK MIB", "SETUP S"]
    if with_probe:
        headers.append("PROBE")
    headers.append("ERROR")
    table = []
    for r in rows:
        line = [r["backbone"], _runtime_cell(r), r["mode"], r.get("batch_size") or "-", r.get("image_size") or "-",
                fmt_count(r.get("params")) if r.get("params") else "-", _sig(r.get("gflops")),
                r.get("feature_dim") or "-", _num(r.get("throughput")), _num(r.get("time_p50_ms"), 2),
                _num(r.get("time_p95_ms"), 2), _num(r.get("peak_mem_mb"), 0), _num(r.get("setup_s"), 2)]
        if with_probe:
            line.append(_num(r.get("probe_acc"), 3))
        line.append(_short(r.get("error")))
        table.append(line)
    out = [render(table, headers)]
    training = training_summary(rows)
    if training:
        out += ["", "train-frozen vs train-full (one optimizer step; ratio = full / frozen):",
                render([[t["backbone"], t["runtime"], t["batch_size"], _num(t["frozen_ms"], 1), _num(t["full_ms"], 1),
                         _num(t["time_ratio"], 2) + "x", _num(t["frozen_mem_mb"], 0), _num(t["full_mem_mb"], 0),
                         (_num(t["mem_ratio"], 2) + "x") if t["mem_ratio"] else "-"] for t in training],
                       ["BACKBONE", "RUNTIME", "BATCH", "FROZEN MS", "FULL MS", "TIME", "FROZEN MIB", "FULL MIB",
                        "MEM"])]
    errors = sum(1 for r in rows if r.get("error"))
    out += ["", *environment_lines(doc),
            "P50/P95 MS: time per call (per optimizer step in train modes); at batch 1 that is the latency. "
            "PEAK MIB: " + _mem_legend(rows) + ". GFLOPS: forward, per image, FlopCounterMode "
            "(a multiply-add is 2 FLOPs; model cards that list MACs show half). SETUP S: export/trace/compile "
            "+ first call.",
            f"{len(rows)} rows, {errors} with errors" + (" (full messages in the JSON/CSV)" if errors else "")]
    return "\n".join(out)


def _runtime_cell(r: dict[str, Any]) -> str:
    """The runtime, with its precision when not fp32 (and the ONNX Runtime provider on CUDA)."""
    text = r["runtime"] if r.get("precision", "fp32") == "fp32" else f"{r['runtime']} {r['precision']}"
    note = r.get("note") or ""
    if r["runtime"] == "onnxruntime" and str(r.get("device", "")).startswith("cuda") and "provider" in note:
        text += " (CPU EP)" if note.startswith("CPU provider") else " (CUDA EP)"
    return text


def _mem_legend(rows) -> str:
    kinds = sorted({r["mem_kind"] for r in rows if r.get("mem_kind")})
    return "; ".join(kinds) if kinds else "not measured (in-process on CPU: use process isolation)"


def training_summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pair train-frozen and train-full rows of the same backbone/runtime/batch/size."""
    key = lambda r: (r["backbone"], r["runtime"], r.get("precision", "fp32"), r.get("batch_size"),  # noqa: E731
                     r.get("image_size"))
    frozen = {key(r): r for r in rows if r["mode"] == "train-frozen" and not r.get("error")}
    out = []
    for r in rows:
        if r["mode"] != "train-full" or r.get("error") or key(r) not in frozen:
            continue
        f = frozen[key(r)]
        out.append({
            "backbone": r["backbone"], "runtime": _runtime_cell(r), "batch_size": r["batch_size"],
            "image_size": r["image_size"], "frozen_ms": f["time_mean_ms"], "full_ms": r["time_mean_ms"],
            "time_ratio": _ratio(r["time_mean_ms"], f["time_mean_ms"]),
            "frozen_mem_mb": f.get("peak_mem_mb"), "full_mem_mb": r.get("peak_mem_mb"),
            "mem_ratio": _ratio(r.get("peak_mem_mb"), f.get("peak_mem_mb")),
        })
    return out


def _ratio(a, b) -> float | None:
    if a is None or b in (None, 0):
        return None
    return round(a / b, 3)


def to_csv(doc: dict[str, Any]) -> str:
    """One line per measurement; the environment is repeated in env_* columns so each line stands alone."""
    env = doc.get("environment", {})
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*ROW_FIELDS, *(f"env_{k}" for k in ENV_FIELDS)])
    for r in doc["rows"]:
        writer.writerow([("" if r.get(k) is None else r.get(k)) for k in ROW_FIELDS]
                        + [("" if env.get(k) is None else env.get(k)) for k in ENV_FIELDS])
    return buf.getvalue()


def write_outputs(doc: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "csv": out / "bench.csv", "table": out / "bench.txt"}
    write_json(paths["json"], doc)
    write_text(paths["csv"], to_csv(doc))
    write_text(paths["table"], render_table(doc) + "\n")
    return paths


def load(path: str | Path) -> dict[str, Any]:
    from zoo.errors import ZooError

    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ZooError(f"cannot read benchmark results {str(path)!r}: {exc}") from exc
    if not isinstance(doc, dict) or "rows" not in doc:
        raise ZooError(f"{str(path)!r} is not a `zoo bench` JSON file (no 'rows'); use the bench.json it wrote")
    return doc


def _key(r: dict[str, Any]) -> tuple:
    return (r["backbone"], r["runtime"], r.get("precision", "fp32"), r["mode"], r.get("batch_size"),
            r.get("image_size"))


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Row by row (matched on backbone, runtime, mode, batch, image size): B / A ratios."""
    rows_b = {_key(r): r for r in b["rows"]}
    out, seen = [], set()
    for ra in a["rows"]:
        k = _key(ra)
        rb = rows_b.get(k)
        seen.add(k)
        item = {"backbone": k[0], "runtime": k[1], "mode": k[2], "batch_size": k[3], "image_size": k[4],
                "a_throughput": ra.get("throughput"), "b_throughput": None, "throughput_ratio": None,
                "a_p50_ms": ra.get("time_p50_ms"), "b_p50_ms": None, "p50_ratio": None,
                "a_peak_mb": ra.get("peak_mem_mb"), "b_peak_mb": None, "peak_ratio": None,
                "status": "only in A" if rb is None else "", "a_error": ra.get("error"), "b_error": None}
        if rb is not None:
            item.update(b_throughput=rb.get("throughput"), b_p50_ms=rb.get("time_p50_ms"),
                        b_peak_mb=rb.get("peak_mem_mb"), b_error=rb.get("error"),
                        throughput_ratio=_ratio(rb.get("throughput"), ra.get("throughput")),
                        p50_ratio=_ratio(rb.get("time_p50_ms"), ra.get("time_p50_ms")),
                        peak_ratio=_ratio(rb.get("peak_mem_mb"), ra.get("peak_mem_mb")))
            if ra.get("error") or rb.get("error"):
                item["status"] = "error in " + " and ".join(s for s, r in (("A", ra), ("B", rb)) if r.get("error"))
        out.append(item)
    for rb in b["rows"]:
        if _key(rb) not in seen:
            k = _key(rb)
            out.append({"backbone": k[0], "runtime": k[1], "mode": k[2], "batch_size": k[3], "image_size": k[4],
                        "a_throughput": None, "b_throughput": rb.get("throughput"), "throughput_ratio": None,
                        "a_p50_ms": None, "b_p50_ms": rb.get("time_p50_ms"), "p50_ratio": None,
                        "a_peak_mb": None, "b_peak_mb": rb.get("peak_mem_mb"), "peak_ratio": None,
                        "status": "only in B", "a_error": None, "b_error": rb.get("error")})
    return out


def render_compare(a: dict[str, Any], b: dict[str, Any], rows: list[dict[str, Any]],
                   names: tuple[str, str] = ("A", "B")) -> str:
    def x(v):
        return "-" if v is None else f"{v:.2f}x"

    table = [[r["backbone"], r["runtime"], r["mode"], r["batch_size"] or "-", r["image_size"] or "-",
              _num(r["a_throughput"]), _num(r["b_throughput"]), x(r["throughput_ratio"]),
              _num(r["a_p50_ms"], 2), _num(r["b_p50_ms"], 2), x(r["p50_ratio"]),
              _num(r["a_peak_mb"], 0), _num(r["b_peak_mb"], 0), x(r["peak_ratio"]), r["status"]] for r in rows]
    out = [f"A = {names[0]}", *("    " + ln for ln in environment_lines(a)[:2]),
           f"B = {names[1]}", *("    " + ln for ln in environment_lines(b)[:2]), "",
           render(table, ["BACKBONE", "RUNTIME", "MODE", "BATCH", "PX", "A IMG/S", "B IMG/S", "B/A",
                          "A P50 MS", "B P50 MS", "B/A", "A MIB", "B MIB", "B/A", "STATUS"]),
           "", "B/A > 1 for IMG/S means B is faster; for P50 MS and MIB, B/A < 1 means B is faster / smaller."]
    return "\n".join(out)
