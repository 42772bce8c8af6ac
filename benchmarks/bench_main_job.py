"""The README's timing claim for the main job, measured: `zoo train` exactly as the README writes it
(no options: the embedded Fashion-MNIST sample, frozen timm/tf_efficientnet_lite0), in a fresh
working directory, cold (an empty feature cache) and warm (the same command again), each in its own
process, as a user runs it. The README's "about N s" is read from README.md and set beside the
measurement, with the machine (CPU model, cores, torch threads, load average before and after).

    python benchmarks/bench_main_job.py [--rounds 1] [--json OUT.json]

Nothing here asserts a time (timings are the machine's, not the code's); a claim more than 1.5x off
what this measures on an idle machine of the kind the README names is a claim to update.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_claim() -> tuple[float | None, str]:
    """The main job's time as the README states it ("About 20 s on two CPU cores ...")."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## The main job", 1)[-1].split("\n## ", 1)[0]
    m = re.search(r"(?:[Aa]bout|took) (\d+(?:\.\d+)?)(?:-(\d+(?:\.\d+)?))? ?s\b([^.;]*)", section)
    if not m:
        return None, ""
    lo, hi = float(m.group(1)), float(m.group(2) or m.group(1))
    return (lo + hi) / 2, m.group(0)


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def one_run(cwd: Path, cache: Path) -> dict:
    env = dict(os.environ, ZOO_CACHE_DIR=str(cache), HF_HUB_OFFLINE="1")
    zoo = shutil.which("zoo", path=str(Path(sys.executable).parent)) or "zoo"
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run([zoo, "train"], cwd=cwd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"zoo train failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    top1 = re.search(r"validation top-1: ([\d.]+)%", proc.stdout)
    inner = re.search(r"time: ([\d.]+)s", proc.stdout)
    return {"wall_s": round(seconds, 1), "reported_s": float(inner.group(1)) if inner else None,
            "val_top1": float(top1.group(1)) if top1 else None,
            "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1, help="cold+warm pairs, interleaved")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    claim, claim_text = readme_claim()
    results = {"machine": machine(), "readme_claim": claim_text, "rounds": []}
    print(f"machine: {results['machine']}")
    print(f"README claims: {claim_text!r}")
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="zoo-main-job-") as tmp:
            cwd, cache = Path(tmp) / "work", Path(tmp) / "cache"
            cwd.mkdir()
            cold = one_run(cwd, cache)
            warm = one_run(cwd, cache)
        results["rounds"].append({"cold": cold, "warm": warm})
        print(f"round {r + 1}: cold {cold['wall_s']} s (zoo's own 'time:' {cold['reported_s']} s, load "
              f"{cold['load_before']}->{cold['load_after']}), warm {warm['wall_s']} s; top-1 {cold['val_top1']}%")
    cold_s = min(x["cold"]["wall_s"] for x in results["rounds"])
    warm_s = min(x["warm"]["wall_s"] for x in results["rounds"])
    if claim:
        print(f"best cold {cold_s} s = {cold_s / claim:.2f}x the README's {claim:g} s; best warm {warm_s} s = "
              f"{warm_s / claim:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
