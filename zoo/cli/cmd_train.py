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


def _weights(value: str):
    return None if value.lower() == "none" else value


def add_parser(sub):
    from zoo.options import TrainConfig, defaults

    d = defaults(TrainConfig)
    p = sub.add_parser(
        "train", help="train a classifier head on a frozen backbone",
        description="Train a classifier head on a frozen pretrained backbone. With no --data it trains on the "
                    "embedded Fashion-MNIST sample with timm/tf_efficientnet_lite0 (offline ImageNet weights).",
        argument_default=argparse.SUPPRESS)  # options not given are not passed: TrainConfig's defaults apply
    p.add_argument("--backbone", help="provider/model[.tag] (default {default_backbone})")
    p.add_argument("--weights", type=_weights, help="weights tag, 'none' for random init, or a local "
                   ".safetensors/.pth file (default: the backbone's default pretrained weights)")
    p.add_argument("--data", help="image folder, one subfolder per class (default: embedded sample)")
    p.add_argument("--csv", help="CSV of path,label (paths relative to --data or the CSV's folder)")
    p.add_argument("--csv-outside-root", action="store_true",
                   help="allow CSV rows that point outside --data (or the CSV's folder)")
    p.add_argument("--val-data", help="separate validation folder (else a stratified split)")
    p.add_argument("--val-split", type=float,
                   help=f"validation fraction of --data, 0 <= F < 1; 0 = none (default {d['val_split']})")
    p.add_argument("--freeze", type=_freeze, help="'all' (default) or N: freeze the first N layer groups")
    p.add_argument("--bn-adapt", action="store_true", help="with --freeze N: let unfrozen BatchNorm layers update stats")
    p.add_argument("--head", choices=("linear", "mlp"), help=f"default {d['head']}")
    p.add_argument("--hidden", type=_hidden, help="MLP hidden sizes, e.g. 512 or 512,256 (default 512)")
    p.add_argument("--dropout", type=float, help=f"head dropout, 0 <= P < 1 (default {d['dropout']})")
    p.add_argument("--head-norm", choices=("batchnorm", "layernorm"), help="MLP head normalization")
    p.add_argument("--epochs", type=int, help=f"default {d['epochs']} (or the saved value with --resume)")
    p.add_argument("--lr", type=float, help=f"default {d['lr']}")
    p.add_argument("--weight-decay", type=float, help=f"default {d['weight_decay']}")
    p.add_argument("--label-smoothing", type=float, help=f"0 <= S < 1 (default {d['label_smoothing']})")
    p.add_argument("--batch-size", type=int, help=f"default {d['batch_size']}")
    p.add_argument("--patience", type=int, help="with --holdout: stop after N epochs without holdout improvement "
                   "(default 0: off)")
    p.add_argument("--folds", type=int, help=f"choose the epoch and the weight decay by stratified k-fold "
                   f"cross-validation over the training images, then refit on all of them (default {d['folds']}; "
                   "fewer when a class has fewer images; 0: keep the last epoch)")
    p.add_argument("--holdout", type=float, help="instead of cross-validation, choose on this fraction of the "
                   "training images held out (then refit on all); never the validation split (default 0: off)")
    p.add_argument("--tune", dest="tune", action="store_const", const="on",
                   help="choose the weight decay from a grid (by CV or on the holdout), MLP heads too (default: for "
                   "a linear head whenever features are cached)")
    p.add_argument("--no-tune", dest="tune", action="store_const", const="off",
                   help="train with --weight-decay as given")
    p.add_argument("--no-standardize", dest="standardize", action="store_false",
                   help="do not standardize the features for the head (default: per-feature mean/std of the "
                   "training features, folded into the head's first layer when saved)")
    p.add_argument("--device", help="auto (CUDA, then MPS, then CPU; default), cpu, cuda[:N] or mps")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), help="mixed precision: auto (bf16, or fp16 without bf16 support, on CUDA; off elsewhere), bf16 or fp16 (CPU autocast too), off")
    p.add_argument("--workers", dest="num_workers", type=int, help="DataLoader worker processes (default: auto)")
    p.add_argument("--engine", choices=("auto", "eager", "channels_last", "bf16", "onnxruntime", "compile"),
                   help="feature extraction engine, checked against eager fp32 on the first batch "
                   "(auto: the fastest fp32 engine by a short probe, remembered per machine; bf16 with --amp bf16)")
    p.add_argument("--jpeg-draft", action="store_true",
                   help="decode large JPEGs at reduced size for extraction (faster; slightly different pixels, "
                   "cached separately)")
    p.add_argument("--gpu-decode", action="store_true",
                   help="CUDA: decode JPEGs on the GPU in batches for extraction (CPU fallback per image; "
                   "slightly different pixels, cached separately)")
    p.add_argument("--out", default=None, help="run directory (default runs/<backbone>-<time>); never overwritten")
    p.add_argument("--resume", action="store_true", default=False, help="continue the interrupted run in --out")
    p.add_argument("--seed", type=int, help=f"default {d['seed']}")
    p.add_argument("--allow-duplicates", action="store_true",
                   help="keep training images whose content appears under two labels (default: an error naming them)")
    p.add_argument("--strict", action="store_true", help="refuse unreadable/non-image files instead of skipping them")
    p.add_argument("--max-image-pixels", type=int,
                   help=f"skip larger images (decompression bombs) with a reason (default {d['max_image_pixels']})")
    p.add_argument("--no-cache", dest="cache", action="store_false", help="do not read or write the feature cache")
    p.add_argument("--cache-dir", help="feature cache (default $ZOO_CACHE_DIR or ~/.cache/backbone-zoo)")
    p.add_argument("--augment", action="store_true", help="random resized crop + flip (turns caching off unless --views)")
    p.add_argument("--views", type=int, help="with --augment: cache N augmented views per image")
    p.add_argument("--image-size", type=int, help="input size override (keeps the crop ratio)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--json", action="store_true", default=False, help="print the result as JSON")
    return p


NOT_OPTIONS = ("out", "resume", "json", "command", "debug")


def options_of(args) -> dict:
    """The TrainConfig fields given on the command line (only those: the rest keep their defaults,
    or on --resume their saved values)."""
    return {k: v for k, v in vars(args).items() if k not in NOT_OPTIONS and not k.startswith("_")}


def run(args) -> int:
    import json
    import sys

    import zoo.training as T
    from zoo.errors import ZooError
    from zoo.runs import default_run_dir

    opts = options_of(args)
    if args.resume:
        if not args.out:
            raise ZooError("--resume needs --out DIR (the run directory to continue)")
        run = T.train(out=args.out, resume=True, **opts)
    else:
        if "backbone" in opts:
            backbone = opts["backbone"]
        else:
            from zoo.plugin.registry import default_backbone

            backbone = default_backbone(with_tag="weights" not in opts)
        out = args.out or default_run_dir(backbone)
        run = T.train(out=out, **(opts | {"backbone": backbone}))
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
