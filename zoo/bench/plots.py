"""PNG plots of a benchmark (matplotlib, Agg backend: no display needed).

throughput_<mode>.png  throughput vs batch size, one panel per backbone, one line per runtime
latency_vs_params.png  batch-1 inference latency (p50) vs parameter count, per runtime
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zoo.io import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def plot_throughput(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    plt = _pyplot()
    ok = [r for r in doc["rows"] if not r.get("error") and r.get("throughput")]
    paths = []
    for mode in dict.fromkeys(r["mode"] for r in ok):
        rows = [r for r in ok if r["mode"] == mode]
        backbones = list(dict.fromkeys(r["backbone"] for r in rows))
        cols = min(3, len(backbones))
        nrows = (len(backbones) + cols - 1) // cols
        fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.8 * nrows), squeeze=False)
        for ax, backbone in zip(axes.flat, backbones):
            for runtime in dict.fromkeys(r["runtime"] for r in rows if r["backbone"] == backbone):
                pts = sorted((r["batch_size"], r["throughput"]) for r in rows
                             if r["backbone"] == backbone and r["runtime"] == runtime)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=runtime)
            ax.set_xscale("log", base=2)
            sizes = sorted({r["batch_size"] for r in rows if r["backbone"] == backbone})
            ax.set_xticks(sizes, [str(b) for b in sizes])
            ax.minorticks_off()
            ax.set_title(backbone, fontsize=10)
            ax.set_xlabel("batch size")
            ax.set_ylabel("images / s")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        for ax in list(axes.flat)[len(backbones):]:
            ax.set_visible(False)
        env = doc.get("environment", {})
        fig.suptitle(f"{mode}: throughput vs batch size ({env.get('device')}, {env.get('threads')} threads)")
        paths.append(_save(fig, out_dir / f"throughput_{mode}.png"))
        plt.close(fig)
    return paths


def plot_latency_vs_params(doc: dict[str, Any], out_dir: Path) -> Path | None:
    plt = _pyplot()
    rows = [r for r in doc["rows"] if r["mode"] == "infer" and r.get("batch_size") == 1
            and not r.get("error") and r.get("latency_p50_ms") and r.get("params")]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for runtime in dict.fromkeys(r["runtime"] for r in rows):
        pts = [r for r in rows if r["runtime"] == runtime]
        ax.scatter([r["params"] / 1e6 for r in pts], [r["latency_p50_ms"] for r in pts], label=runtime)
    for backbone in dict.fromkeys(r["backbone"] for r in rows):
        r = min((r for r in rows if r["backbone"] == backbone), key=lambda r: r["latency_p50_ms"])
        ax.annotate(backbone, (r["params"] / 1e6, r["latency_p50_ms"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("latency p50 at batch 1 (ms)")
    ax.set_title("inference latency vs parameters")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    path = _save(fig, out_dir / "latency_vs_params.png")
    plt.close(fig)
    return path


def write_plots(doc: dict[str, Any], out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = plot_throughput(doc, out)
    lat = plot_latency_vs_params(doc, out)
    return paths + ([lat] if lat else [])
