"""zoo info NAME: stats, input size, feature dimension, parameters, layer groups, weights."""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("info", help="describe one backbone (builds its architecture, without weights, to count parameters)")
    p.add_argument("name", help="provider/model[.tag], e.g. torchvision/vgg16 or timm/resnet18.a1_in1k")
    p.add_argument("--weights", default=None, help="weights tag to describe (default: the name's tag or the default)")
    p.add_argument("--no-build", action="store_true",
                   help="skip building the model (no params / layer groups; answered from the listing index)")
    p.add_argument("--json", action="store_true")
    return p


def run(args) -> int:
    import warnings

    from zoo import index
    from zoo.backbones import DEFAULT, describe_backbone, get_info
    from zoo.table import fmt_count, fmt_stats, print_json, render

    weights = args.weights or DEFAULT
    if weights.lower() == "none":
        weights = None
    info = get_info(args.name, weights, catalog=index.catalog() if args.no_build else None)
    data = info.to_dict()
    if not args.no_build:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the architecture only (random init, on the meta device where it builds there): nothing is
            # downloaded or computed
            module, built = describe_backbone(info.name)
        data["num_params"] = built.num_params
        data["feature_dim"] = built.feature_dim
        params = dict(module.named_parameters())
        data["layer_groups"] = [
            {"name": g.name, "parameters": len(g.parameters), "num_params": sum(params[p].numel() for p in g.parameters)}
            for g in built.layer_groups
        ]
    if args.json:
        print_json(data)
        return 0
    n = data["normalization"]
    print(f"{info.name}  ({info.description or info.family}; plugin {info.plugin})")
    print(f"  weights         {data['weights'] or 'random init'} (default: {info.default_weights or 'none'})")
    print(f"  feature dim     {data['feature_dim'] or '?'}")
    print(f"  parameters      {fmt_count(data['num_params'])}" + (f" ({data['num_params']:,})" if data["num_params"] else ""))
    print(f"  input size      {tuple(n['input_size'])} (C, H, W)")
    print(f"  resize / crop   resize {n['resize_size']} ({n['interpolation']}, {n['crop_mode']}), "
          f"crop {n['input_size'][1]}x{n['input_size'][2]} (crop_pct {n['crop_pct']})")
    print(f"  mean            {fmt_stats(n['mean'])}")
    print(f"  std             {fmt_stats(n['std'])}")
    if data["layer_groups"] and "num_params" in data["layer_groups"][0] and data["layer_groups"][0]["num_params"] is not None:
        print("\nlayer groups (input -> output; --freeze K freezes the first K):")
        print(render([[i, g["name"], g["parameters"], fmt_count(g["num_params"])]
                      for i, g in enumerate(data["layer_groups"], 1)], ["#", "GROUP", "TENSORS", "PARAMS"]))
    if data["available_weights"]:
        print("\nweights:")
        rows = []
        for w in data["available_weights"]:
            metric = ", ".join(f"{k} {v:g}" for k, v in w["metrics"].items())
            rows.append([w["tag"] + (" (default)" if w["tag"] == info.default_weights else ""), w["num_classes"] or "",
                         metric, w.get("license") or "?", w["source"]])
        print(render(rows, ["TAG", "CLASSES", "METRICS", "LICENSE", "SOURCE"]))
    return 0
