"""zoo train: train a classifier head on a frozen backbone (default: the embedded Fashion-MNIST demo)."""

from __future__ import annotations

import argparse


def _freeze(value: str):
    if value == "all":
        return "all"
    try:
        k = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--freeze takes 'all' or a number of layer groups, got {value!r}") from None
    if k < 0:
        raise argparse.ArgumentTypeError("--freeze N needs N >= 0")
    return k


def _hidden(value: str) -> tuple:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--hidden takes sizes like 512 or 512,256, got {value!r}") from None


def add_parser(sub):
    p = sub.add_parser(
        "train", help="train a classifier head on a frozen backbone",
        description="Train a classifier head on a frozen pretrained backbone. With no --data it trains on the "
                    "embedded Fashion-MNIST sample with timm/tf_efficientnet_lite0 (offline ImageNet weights).")
    p.add_argument("--backbone", default=None, help="provider/model[.tag] (default timm/tf_efficientnet_lite0, in1k)")
    p.add_argument("--weights", default=None, help="weights tag, 'none' for random init, or a local "
                   ".safetensors/.pth file (default: the backbone's default pretrained weights)")
    p.add_argument("--data", default=None, help="image folder, one subfolder per class (default: embedded sample)")
    p.add_argument("--csv", default=None, help="CSV of path,label (paths relative to --data or the CSV's folder)")
    p.add_argument("--val-data", default=None, help="separate validation folder (else a stratified split)")
    p.add_argument("--val-split", type=float, default=0.2, help="validation fraction of --data (default 0.2)")
    p.add_argument("--freeze", type=_freeze, default="all", help="'all' (default) or N: freeze the first N layer groups")
    p.add_argument("--bn-adapt", action="store_true", help="with --freeze N: let unfrozen BatchNorm layers update stats")
    p.add_argument("--head", choices=("linear", "mlp"), default="linear")
    p.add_argument("--hidden", type=_hidden, default=(512,), help="MLP hidden sizes, e.g. 512 or 512,256")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--head-norm", choices=("batchnorm", "layernorm"), default=None, help="MLP head normalization")
    p.add_argument("--epochs", type=int, default=None, help="default 20 (or the saved value with --resume)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--patience", type=int, default=0, help="early stopping: epochs without val improvement (0: off)")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda[:N] or mps")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto", help="mixed precision (CUDA)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader worker processes (default: auto)")
    p.add_argument("--out", default=None, help="run directory (default runs/<backbone>-<time>); never overwritten")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strict", action="store_true", help="refuse unreadable/non-image files instead of skipping them")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    p.add_argument("--cache-dir", default=None, help="feature cache (default $ZOO_CACHE_DIR or ~/.cache/backbone-zoo)")
    p.add_argument("--augment", action="store_true", help="random resized crop + flip (turns caching off unless --views)")
    p.add_argument("--views", type=int, default=0, help="with --augment: cache N augmented views per image")
    p.add_argument("--image-size", type=int, default=None, help="input size override (keeps the crop ratio)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def run(args) -> int:
    import json
    import sys

    import zoo.training as T
    from zoo.errors import ZooError
    from zoo.runs import default_run_dir

    if args.resume:
        if not args.out:
            raise ZooError("--resume needs --out DIR (the run directory to continue)")
        opts = {"device": args.device, "progress": not args.no_progress}
        if args.epochs is not None:
            opts["epochs"] = args.epochs
        if args.workers is not None:
            opts["num_workers"] = args.workers
        run = T.train(out=args.out, resume=True, **opts)
    else:
        if args.backbone is None:
            from zoo.registry import default_backbone

            backbone = default_backbone(with_tag=args.weights is None)
        else:
            backbone = args.backbone
        weights = args.weights
        if weights is None:
            weights = "default"
        elif weights.lower() == "none":
            weights = None
        out = args.out or default_run_dir(backbone)
        run = T.train(
            backbone, args.data, out=out, weights=weights, csv=args.csv, val_data=args.val_data,
            val_split=args.val_split, freeze=args.freeze, bn_adapt=args.bn_adapt, head=args.head,
            hidden=args.hidden, dropout=args.dropout, head_norm=args.head_norm,
            epochs=args.epochs if args.epochs is not None else 20, lr=args.lr, weight_decay=args.weight_decay,
            label_smoothing=args.label_smoothing, batch_size=args.batch_size, patience=args.patience,
            device=args.device, amp=args.amp, seed=args.seed, strict=args.strict, cache=not args.no_cache,
            cache_dir=args.cache_dir, augment=args.augment, views=args.views, image_size=args.image_size,
            num_workers=args.workers, progress=not args.no_progress)
    from zoo.distributed import context

    if not context().is_main:  # under torchrun only rank 0 reports
        return 0
    if args.json:
        print(json.dumps({"run": str(run.dir), "val_top1": run.val_top1, "best_epoch": run.best_epoch,
                          "epochs": len(run.history), "seconds": round(run.seconds, 2), "device": run.device,
                          "cache": run.cache, "per_class": dict(zip(run.model.labels, run.final.get("per_class", [])))}))
    else:
        print(run.summary())
    sys.stdout.flush()
    return 0
