"""Does the fp32 validation bound separate float noise from a wrong export?

    python benchmarks/bench_tolerance.py [--count 20] [--formats all] [--json out.json]

Positive side: `--count` default exports (`zoo.export(run)`, all formats, the run's own
validation split) of varied runs on the embedded Fashion-MNIST sample: backbones (the default
lite0, and torchvision/mobilenet_v2 with ImageNet weights from ../shared seeded in a temporary
TORCH_HOME, where present), heads (linear, mlp), weight decays (tuned by default, 0, 1e-3) and
seeds. Every refusal is counted and printed; for each artifact the largest |logit diff| and its
ratio to the bound (`logit_diff_to_bound`, <= 1 passes) are collected.

Negative side, on the first run's model, validated against that run's unchanged model on the
same images: (a) one weight tensor off by a relative 1e-3 (the head's weight, and the largest
backbone tensor), exported to ONNX; (b) a wrong preprocessing (the ImageNet mean/std baked in where
the backbone uses 0.5/0.5, or the reverse). Each must fail; the ratio says by how much it exceeds the bound.

The bound: |artifact - eager| <= 1e-4 + 1e-4 x max|eager logit| of each batch (zoo.validation).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

SHARED_WEIGHTS = Path(__file__).resolve().parents[1] / ".." / "shared" / "weights" / "mobilenet_v2-b0353104.pth"


def _torch_home(work: Path) -> bool:
    """Seed a temporary torch hub cache with ../shared's MobileNetV2 weights; False when absent."""
    if not SHARED_WEIGHTS.exists():
        return False
    ckpt = work / "torch-home" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    os.symlink(SHARED_WEIGHTS.resolve(), ckpt / SHARED_WEIGHTS.name)
    os.environ["TORCH_HOME"] = str(work / "torch-home")
    return True


def configs(count: int, mobilenet: bool):
    # the ImageNet-1k V1 weights: the file ../shared holds (torchvision's default tag is V2)
    backbones = [None] + (["torchvision/mobilenet_v2.IMAGENET1K_V1"] if mobilenet else [])
    heads = ["linear", "mlp"]
    decays = [None, 0.0, 1e-3]  # None: the default (tuned for linear heads)
    grid = list(itertools.product(decays, heads, backbones))
    for i in range(count):
        wd, head, bb = grid[i % len(grid)]
        yield {"backbone": bb, "head": head, "weight_decay": wd, "seed": i // len(grid)}


def _train(cfg: dict, out: Path):
    import zoo

    kwargs = {k: v for k, v in (("head", cfg["head"]), ("weight_decay", cfg["weight_decay"]), ("seed", cfg["seed"]))
              if v is not None}
    if cfg["weight_decay"] is not None:
        kwargs["tune"] = "off"  # the given weight decay, as a user who sets it gets
    return zoo.train(cfg["backbone"], out=str(out), progress=False, **kwargs)


def _negative_controls(run_dir: Path, work: Path) -> dict:
    import torch
    from zoo_onnx import export_onnx, validate_onnx

    from zoo.exporting.images import _validation_images
    from zoo.model import load_model

    model = load_model(run_dir).eval()
    vimages = _validation_images(None, model, run_dir, lambda m: None)
    out = {}

    def check(name, broken):
        path = work / f"negative-{len(out)}.onnx"
        export_onnx(broken, path)
        r = validate_onnx(model, path, vimages.pixels, targets=vimages.targets)
        out[name] = {"passed": r["passed"], "logit_diff_to_bound": r["logit_diff_to_bound"],
                     "max_abs_logit_diff": r["max_abs_logit_diff"], "min_embedding_cosine": r["min_embedding_cosine"],
                     "problems": r["problems"][:2]}

    for which in ("head", "backbone"):
        broken = copy.deepcopy(model)
        params = dict(broken.head.named_parameters() if which == "head" else broken.backbone.named_parameters())
        name = max((n for n in params if n.endswith("weight")), key=lambda n: params[n].numel())
        with torch.no_grad():
            params[name].mul_(1 + 1e-3)
        check(f"{which} tensor {name} x (1 + 1e-3)", broken)
    broken = copy.deepcopy(model)
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    mean, std = (((0.5,) * 3, (0.5,) * 3) if tuple(model.meta.normalization.mean) == imagenet[0] else imagenet)
    broken.meta = dataclasses.replace(model.meta, normalization=dataclasses.replace(model.meta.normalization, mean=mean,
                                                                                    std=std))
    check(f"wrong preprocessing (mean {mean}, std {std} baked in)", broken)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=20, help="default exports of varied runs (>= 20 for the claim)")
    ap.add_argument("--formats", default="all")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import zoo
    from zoo.errors import ExportValidationError

    work = Path(tempfile.mkdtemp(prefix="bench-tolerance-"))
    mobilenet = _torch_home(work)
    rows, refusals, negatives = [], [], {}
    t0 = time.perf_counter()
    try:
        for i, cfg in enumerate(configs(args.count, mobilenet)):
            run = _train(cfg, work / f"run{i}")
            try:
                report = zoo.export(run.dir, formats=args.formats)
            except ExportValidationError as exc:
                report = exc.report
                refusals.append({"config": cfg, "error": str(exc)[:400]})
            for name, a in report["artifacts"].items():
                v = a.get("validation") or {}
                rows.append({"run": i, **cfg, "format": name, "status": a.get("status"),
                             "max_abs_logit_diff": v.get("max_abs_logit_diff"),
                             "logit_diff_to_bound": v.get("logit_diff_to_bound"),
                             "max_abs_reference_logit": v.get("max_abs_reference_logit"),
                             "min_embedding_cosine": v.get("min_embedding_cosine")})
            last = [r for r in rows if r["run"] == i]
            print(f"run {i:2d} {cfg['backbone'] or 'default (lite0)':<26} head {cfg['head']:<6} wd "
                  f"{'tuned' if cfg['weight_decay'] is None else cfg['weight_decay']!s:<6} seed {cfg['seed']}: "
                  + "  ".join(f"{r['format']} {r['status']} {r['max_abs_logit_diff'] or 0:.2e} "
                              f"({r['logit_diff_to_bound'] or 0:.3f}x bound)" for r in last), flush=True)
            if i == 0:
                negatives = _negative_controls(run.dir, work)
                for name, n in negatives.items():
                    print(f"  negative control {name}: passed={n['passed']} max|dlogit| {n['max_abs_logit_diff']:.3g} "
                          f"= {n['logit_diff_to_bound']:.1f}x the bound", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratios = [r["logit_diff_to_bound"] for r in rows if isinstance(r["logit_diff_to_bound"], float)]
    exports = len({r["run"] for r in rows})
    print(f"\n{exports} exports ({len(rows)} artifacts, formats {args.formats}) in {time.perf_counter() - t0:.0f} s: "
          f"{len(refusals)} refused")
    if ratios:
        print(f"|logit diff| / bound over all artifacts: median {statistics.median(ratios):.3f}, max {max(ratios):.3f}")
    for name, n in negatives.items():
        print(f"negative control {name}: {'PASSED (bad)' if n['passed'] else 'refused'}, "
              f"{n['logit_diff_to_bound']:.1f}x the bound")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "refusals": refusals, "negatives": negatives}, indent=2))
    bad = refusals or any(n["passed"] for n in negatives.values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
