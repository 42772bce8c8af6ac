"""Frozen-backbone training step vs full fine-tuning step: time and peak memory, one run.

    python benchmarks/bench_frozen_step.py [--backbone torchvision/resnet18] [--batch 16] [--size 224]

Each mode runs in its own child process (so peak RSS is that mode's alone), and the modes are
interleaved over --rounds rounds (the fastest round counts: other load on the machine only slows).
Modes, all on the same backbone, batch, input and memory format (channels_last):
  full           full fine-tuning: model.train(), backbone + head under autograd, AdamW over all
  naive_frozen   the common recipe: requires_grad=False on the backbone but still model.train() and
                 the forward under autograd (BatchNorm in train mode, so also wrong)
  frozen         zoo's frozen step: zoo.freezer.freeze, backbone under torch.no_grad in eval, head
                 forward/backward, AdamW over the head only (what zoo.train runs when it cannot cache)
  frozen_bf16    the same with the backbone forward under CPU bf16 autocast (zoo.train --amp bf16)
  cached         what zoo.train runs per step once features are cached: the head step alone
Peak memory is the step's own: the rise of the process's peak RSS (VmHWM, reset through
/proc/self/clear_refs) over its RSS with the model, optimizer and batch in memory. Weights are
random init (no offline ResNet-18 weights; weights do not change time or memory).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODES = ("full", "naive_frozen", "frozen", "frozen_bf16", "cached")


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(mode: str, backbone: str, batch: int, size: int, steps: int, threads: int) -> dict:
    import torch

    from zoo.freezer import build_optimizer, freeze
    from zoo.model import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(backbone, 10, weights=None)
    model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    loss_fn = torch.nn.CrossEntropyLoss()
    if mode == "full":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    elif mode == "naive_frozen":
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        opt = torch.optim.AdamW(model.head.parameters(), lr=1e-3)
    else:
        freeze(model)
        opt = build_optimizer(model, lr=1e-3)
    feats = None
    if mode == "cached":
        with torch.no_grad():
            feats = model.backbone.eval()(x)

    def step():
        model.train()  # every mode enters train mode, as an epoch loop does
        if mode in ("full", "naive_frozen"):
            logits = model(x)
        elif mode == "cached":
            logits = model.head(feats)
        else:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "frozen_bf16"):
                f = model.backbone(x)
            logits = model.head(f.float())
        loss = loss_fn(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    base = _rss_kb("VmRSS")
    reset = _reset_peak()
    times = []
    n = steps if mode != "cached" else steps * 20
    for i in range(n + 1):  # the first step (allocations, optimizer state) is not timed, but its memory counts
        t = time.perf_counter()
        step()
        if i:
            times.append(time.perf_counter() - t)
    peak = _rss_kb("VmHWM")
    return {"mode": mode, "min_s": min(times), "median_s": statistics.median(times),
            "step_peak_mb": (peak - base) / 1024, "process_peak_mb": peak / 1024, "base_mb": base / 1024,
            "peak_reset": reset}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="torchvision/resnet18")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.backbone, args.batch, args.size, args.steps, args.threads)))
        return 0
    modes = args.modes.split(",")
    best: dict[str, dict] = {}
    for r in range(args.rounds):
        for mode in modes:
            cmd = [sys.executable, __file__, "--child", mode, "--backbone", args.backbone, "--batch", str(args.batch),
                   "--size", str(args.size), "--steps", str(args.steps), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
            prev = best.get(mode)
            if prev is None or res["min_s"] < prev["min_s"]:
                res["step_peak_mb"] = min(res["step_peak_mb"], prev["step_peak_mb"]) if prev else res["step_peak_mb"]
                best[mode] = res
            print(f"  round {r + 1} {mode:<13} {res['min_s'] * 1000:8.1f} ms  step peak {res['step_peak_mb']:7.1f} MB",
                  file=sys.stderr)
    full = best.get("full")
    print(f"{args.backbone}, batch {args.batch}, {args.size}px, CPU x{args.threads} threads, channels_last, "
          f"random init; best of {args.rounds} rounds x {args.steps} steps")
    print(f"{'mode':<14}{'step ms':>10}{'step peak MB':>14}{'process MB':>12}{'speed vs full':>15}{'mem vs full':>13}")
    for mode in modes:
        m = best[mode]
        speed = full["min_s"] / m["min_s"] if full else float("nan")
        mem = full["step_peak_mb"] / max(m["step_peak_mb"], 1e-9) if full else float("nan")
        print(f"{mode:<14}{m['min_s'] * 1000:>10.1f}{m['step_peak_mb']:>14.1f}{m['process_peak_mb']:>12.1f}"
              f"{speed:>14.1f}x{mem:>12.1f}x")
    if full and "frozen" in best:
        f = best["frozen"]
        print(f"frozen (fp32) step: {full['min_s'] / f['min_s']:.1f}x faster, "
              f"{full['step_peak_mb'] / f['step_peak_mb']:.1f}x less peak memory than full fine-tuning "
              f"(targets: >= 5x, >= 3x)")
        if "frozen_bf16" in best:
            b = best["frozen_bf16"]
            print(f"frozen (bf16 autocast) step: {full['min_s'] / b['min_s']:.1f}x faster, "
                  f"{full['step_peak_mb'] / b['step_peak_mb']:.1f}x less peak memory")
    if args.json:
        print(json.dumps(best))
    return 0


if __name__ == "__main__":
    sys.exit(main())
