"""zoo select: rank backbones on your own images by cross-validated accuracy and cost."""

from __future__ import annotations

import argparse


def add_parser(sub):
    from zoo.options import SelectConfig, defaults

    d = defaults(SelectConfig)
    p = sub.add_parser(
        "select", help="rank backbones on your images: CV accuracy, ms/image, size",
        description="Extract each backbone's features from --data once (through the feature cache, so a later "
                    "`zoo train` with the chosen one is warm), cross-validate the default head on them, time the "
                    "forward pass here, and print a ranked table; writes select.json, select.csv and select.png "
                    "(accuracy vs ms/image). With no BACKBONE: every backbone whose pretrained weights are "
                    "available offline on this machine.",
        argument_default=argparse.SUPPRESS)  # options not given keep SelectConfig's defaults
    p.add_argument("backbones", nargs="*", metavar="BACKBONE",
                   help="provider/model[.tag] (default: all with offline pretrained weights here)")
    p.add_argument("--data", help="image folder, one subfolder per class (required, or --csv)")
    p.add_argument("--csv", help="CSV of path,label (paths relative to --data or the CSV's folder)")
    p.add_argument("--budget-ms", type=float, help="keep only backbones whose forward pass takes at most this many "
                   "ms per image on this machine (the others are timed, not extracted)")
    p.add_argument("--folds", type=int, help=f"cross-validation folds (default {d['folds']}; fewer when a class "
                   "has fewer images, said so)")
    p.add_argument("--seed", type=int, help=f"default {d['seed']}")
    p.add_argument("--device", help="auto (CUDA, then MPS, then CPU; default), cpu, cuda[:N] or mps")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), help="mixed precision, as for zoo train "
                   "(default auto)")
    p.add_argument("--engine", metavar="ENGINE",
                   help="feature extraction engine, as for zoo train: auto (default) or a registered engine "
                   "(`zoo plugins` lists them)")
    p.add_argument("--batch-size", type=int, help=f"default {d['batch_size']}")
    p.add_argument("--timing-batch", type=int, help=f"images per timed forward call (default {d['timing_batch']})")
    p.add_argument("--workers", dest="num_workers", type=int, help="DataLoader worker processes (default: auto)")
    p.add_argument("--strict", action="store_true", help="refuse unreadable/non-image files instead of skipping them")
    p.add_argument("--max-image-pixels", type=int, help="skip larger images (decompression bombs) with a reason")
    p.add_argument("--no-cache", dest="cache", action="store_false", help="do not read or write the feature cache")
    p.add_argument("--cache-dir", help="feature cache (default $ZOO_CACHE_DIR or ~/.cache/backbone-zoo)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress lines")
    p.add_argument("--out", default=None, help="folder for select.json/.csv/.png (default runs/select-<time>); "
                   "an earlier selection there is never overwritten")
    p.add_argument("--json", action="store_true", default=False, help="print the result as JSON")
    return p


NOT_OPTIONS = ("out", "json", "command", "debug")


def run(args) -> int:
    import json

    from zoo.runs import default_run_dir
    from zoo.selection import render, select

    opts = {k: v for k, v in vars(args).items() if k not in NOT_OPTIONS and not k.startswith("_")}
    result = select(out=args.out or default_run_dir("select"), **opts)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        print(render(result))
        print(f"wrote {', '.join(result.files.values())}")
    return 0
