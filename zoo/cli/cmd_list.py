"""zoo list: registered backbones with their stats and feature dimensions (no model is built).

Answers from the listing index (zoo.index) when it is current: no plugin and no torch imported."""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("list", help="list backbones (glob patterns match provider/model or model)",
                       description="List registered backbones. Nothing is instantiated.")
    p.add_argument("patterns", nargs="*", metavar="PATTERN", help="glob, e.g. 'resnet18*' or 'timm/vit_*'")
    p.add_argument("--provider", help="only this provider (torchvision, timm, ...)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN")
    p.add_argument("--pretrained-only", action="store_true", help="only backbones with pretrained weights")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--refresh", action="store_true", help="rebuild the cached listing index first")
    return p


def run(args) -> int:
    import sys

    from zoo import index
    from zoo.table import fmt_stats, print_json, render

    reg = index.catalog(refresh=args.refresh)
    for st in index.plugin_statuses(reg):
        if st.status in ("broken", "conflict"):
            print(f"zoo list: note: plugin {st.name!r} is {st.status} and not listed ({st.error.splitlines()[0][:200]}); "
                  "see `zoo plugins`", file=sys.stderr)
    names = reg.list_models(args.patterns or None, args.exclude or None, args.provider, args.pretrained_only)
    rows = []
    for name in names:
        rec, _ = reg.resolve(name)
        norm = reg.normalization(rec, rec.spec.default_weights)
        rows.append({
            "name": name,
            "provider": rec.spec.provider,
            "family": rec.spec.family,
            "default_weights": rec.spec.default_weights,
            "num_weights": len(rec.spec.weights),
            "feature_dim": reg.static_feature_dim(rec),
            "input_size": list(norm.input_size),
            "resize_size": norm.resize_size,
            "interpolation": norm.interpolation,
            "mean": list(norm.mean),
            "std": list(norm.std),
        })
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print("no backbone matches" + (f" {' '.join(args.patterns)}" if args.patterns else ""))
        return 0
    table = [[r["name"], r["default_weights"] or "-", r["num_weights"], r["feature_dim"] or "?",
              "x".join(map(str, r["input_size"][1:])), r["resize_size"], r["interpolation"],
              fmt_stats(r["mean"]), fmt_stats(r["std"])] for r in rows]
    print(render(table, ["NAME", "DEFAULT WEIGHTS", "#W", "FEAT", "INPUT", "RESIZE", "INTERP", "MEAN", "STD"]))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["provider"]] = counts.get(r["provider"], 0) + 1
    print(f"\n{len(rows)} backbones (" + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) + ")")
    return 0
