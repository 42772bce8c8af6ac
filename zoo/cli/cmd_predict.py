"""zoo predict MODEL.onnx IMAGE|DIR...: classify with the exported file alone (no torch)."""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser(
        "predict", help="classify images with an exported .onnx (onnxruntime + numpy + Pillow; no torch)",
        description="Reads the labels and the preprocessing from the ONNX file's metadata.")
    p.add_argument("model", metavar="MODEL.onnx", help="an ONNX file written by `zoo export`")
    p.add_argument("inputs", nargs="+", metavar="IMAGE|DIR", help="image files or folders (searched recursively)")
    p.add_argument("--top-k", "-k", type=int, default=5, metavar="K", help="classes to show per image (default 5)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def run(args) -> int:
    import json
    import sys

    from zoo.predict import Predictor

    predictor = Predictor(args.model)
    results = predictor.predict_files(args.inputs, top_k=args.top_k)
    if args.json:
        json.dump({"model": args.model, "backbone": predictor.metadata.get("backbone"), "predictions": results},
                  sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    for res in results:
        top = res["top"]
        print(f"{res['path']}: " + ", ".join(f"{t['label']} ({t['probability']:.3f})" for t in top))
    return 0
