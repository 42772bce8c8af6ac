"""zoo evaluate RUN --data DIR: accuracy, per-class accuracy and confusion matrix of a trained run."""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("evaluate", help="evaluate a trained run on a labelled image folder",
                       description="Evaluate a run directory written by `zoo train` (or any saved zoo model) on a "
                                   "folder with one subfolder per class (names must be among the model's labels).")
    p.add_argument("run", help="run directory (holds model.json)")
    p.add_argument("--data", default=None, help="image folder, one subfolder per class (default: embedded val set)")
    p.add_argument("--csv", default=None, help="CSV of path,label instead of a folder")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--strict", action="store_true", help="refuse unreadable files instead of skipping them")
    p.add_argument("--json", action="store_true", help="print metrics as JSON")
    return p


def run(args) -> int:
    import json

    from zoo.model import load_model
    from zoo.training import evaluate

    model = load_model(args.run)
    m = evaluate(model, args.data, args.csv, batch_size=args.batch_size, device=args.device,
                 num_workers=args.workers, strict=args.strict)
    if args.json:
        print(json.dumps(m))
        return 0
    print(f"top-1: {100 * m['top1']:.2f}%  loss: {m['loss']:.4f}  ({m['count']} images"
          + (f", {len(m['skipped'])} skipped" if m["skipped"] else "") + ")")
    width = max(len(label) for label in m["labels"])
    for label, acc in zip(m["labels"], m["per_class"]):
        print(f"  {label:<{width}}  {'-' if acc is None else f'{100 * acc:.1f}%'}")
    print("confusion (rows: true, columns: predicted):")
    for label, row in zip(m["labels"], m["confusion"]):
        print(f"  {label:<{width}}  " + " ".join(f"{v:4d}" for v in row))
    return 0
