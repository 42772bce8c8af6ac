"""zoo predict MODEL IMAGE|DIR...: classify with the exported file alone (.onnx: no torch)."""

from __future__ import annotations


def add_parser(sub):
    from zoo.options import PredictConfig, defaults

    d = defaults(PredictConfig)
    p = sub.add_parser(
        "predict", help="classify images with an exported model (.onnx: onnxruntime + numpy + Pillow, no torch; "
        ".pt2 / .torchscript.pt: torch)",
        description="Reads the labels and the preprocessing from the file's own metadata. A file that cannot be "
                    "read is reported on its own line and the others are still predicted (exit 2 at the end).")
    p.add_argument("model", metavar="MODEL", help="a model.onnx, model.pt2 or model.torchscript.pt written by `zoo export`")
    p.add_argument("inputs", nargs="+", metavar="IMAGE|DIR", help="image files or folders (searched recursively)")
    p.add_argument("--top-k", "-k", type=int, default=d["top_k"], metavar="K",
                   help=f"classes to show per image, >= 1 (default {d['top_k']})")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def run(args) -> int:
    import json
    import sys

    from zoo.options import PredictConfig
    from zoo.predict import Predictor
    from zoo.preprocess import printable

    cfg = PredictConfig(model=args.model, inputs=tuple(args.inputs), top_k=args.top_k)
    predictor = Predictor(cfg.model)
    results = predictor.predict_files(cfg.inputs, top_k=cfg.top_k)
    failed = [r for r in results if "error" in r]
    if args.json:
        json.dump({"model": args.model, "backbone": predictor.metadata.get("backbone"), "predictions": results},
                  sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for res in results:
            if "error" not in res:
                print(f"{printable(res['path'])}: "
                      + ", ".join(f"{t['label']} ({t['probability']:.3f})" for t in res["top"]))
    for res in failed:
        print(f"zoo predict: error: {res['error']}", file=sys.stderr)
    if failed:
        print(f"zoo predict: error: {len(failed)} of {len(results)} files could not be read (listed above); "
              "the others were predicted", file=sys.stderr)
        return 2
    return 0
