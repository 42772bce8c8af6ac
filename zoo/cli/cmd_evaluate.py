"""zoo evaluate RUN --data DIR: accuracy, per-class accuracy and confusion matrix of a trained run."""

from __future__ import annotations


def add_parser(sub):
    from zoo.options import EvaluateConfig, defaults

    d = defaults(EvaluateConfig)
    p = sub.add_parser("evaluate", help="evaluate a trained run on a labelled image folder",
                       description="Evaluate a run directory written by `zoo train` (or any saved zoo model) on a "
                                   "folder with one subfolder per class (names must be among the model's labels; "
                                   "some of them are enough). With no --data/--csv: the run's own validation split.")
    p.add_argument("run", help="run directory (holds model.json)")
    p.add_argument("--data", default=d["data"],
                   help="image folder, one subfolder per class (default: the run's recorded validation split)")
    p.add_argument("--csv", default=d["csv"], help="CSV of path,label instead of a folder")
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--device", default=d["device"])
    p.add_argument("--workers", dest="num_workers", type=int, default=d["num_workers"])
    p.add_argument("--strict", action="store_true", help="refuse unreadable files instead of skipping them")
    p.add_argument("--max-image-pixels", type=int, default=d["max_image_pixels"],
                   help=f"skip larger images with a reason (default {d['max_image_pixels']})")
    p.add_argument("--json", action="store_true", help="print metrics as JSON")
    return p


def run(args) -> int:
    import json

    from zoo.training import evaluate

    m = evaluate(args.run, args.data, args.csv, batch_size=args.batch_size, device=args.device,
                 num_workers=args.num_workers, strict=args.strict, max_image_pixels=args.max_image_pixels)
    if args.json:
        print(json.dumps(m))
        return 0
    ci = m.get("top1_ci95")
    print(f"top-1: {100 * m['top1']:.2f}%" + (f" (95% interval {100 * ci[0]:.1f}-{100 * ci[1]:.1f}%, Wilson)" if ci
                                            else "")
          + f"  loss: {m['loss']:.4f}  ({m['count']} images from {m['source']}"
          + (f", {len(m['skipped'])} skipped" if m["skipped"] else "") + ")")
    cv = m.get("cv")
    if cv:
        print(f"training cross-validation: {cv['folds']}-fold top-1 {100 * cv['cv_top1']:.1f}% +/- "
              f"{100 * cv['cv_sd']:.1f} (sd over folds), epoch {cv['epoch']}, weight decay {cv['weight_decay']:g}")
    print("per-class recall:")
    width = max(len(label) for label in m["labels"])
    for label, acc in zip(m["labels"], m["per_class"]):
        print(f"  {label:<{width}}  {'-' if acc is None else f'{100 * acc:.1f}%'}")
    print("confusion (rows: true, columns: predicted):")
    for label, row in zip(m["labels"], m["confusion"]):
        print(f"  {label:<{width}}  " + " ".join(f"{v:4d}" for v in row))
    return 0
