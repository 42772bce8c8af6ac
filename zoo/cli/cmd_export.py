"""zoo export RUN: the trained model to validated ONNX / TorchScript artifacts (fail-closed)."""

from __future__ import annotations


def add_parser(sub):
    from zoo.options import ONNX_OPSETS, ExportConfig, defaults

    d = defaults(ExportConfig)
    p = sub.add_parser(
        "export", help="export a trained run to ONNX / TorchScript, validated against eager PyTorch",
        description="Export the whole model (frozen backbone + head) of a run directory. Each artifact is "
        "validated against eager PyTorch on real images at batch sizes 1, 3 and 8 before it is moved into "
        "place; over tolerance, nothing is left behind, the numbers go to OUT/export-report.json, and the "
        "exit code is 3.")
    p.add_argument("run", metavar="RUN|BACKBONE",
                   help="run directory (model.json + head.safetensors), e.g. from `zoo train`; or, with "
                   "--head pretrained, a backbone name such as torchvision/mobilenet_v2")
    p.add_argument("--head", choices=("run", "pretrained"), default="run",
                   help="run: the head trained in RUN (default); pretrained: BACKBONE with the classifier and "
                   "labels its pretrained weights came with, no training")
    p.add_argument("--weights", default=None, metavar="TAG",
                   help="with --head pretrained: the weights tag (default: the backbone's default weights)")
    p.add_argument("--format", "-f", action="append", default=None, metavar="FORMAT",
                   help="onnx | pt2 | torchscript | all (every exporter marked for it: onnx, pt2, torchscript) | any "
                   "registered exporter; repeatable (default: all)")
    p.add_argument("--out", "-o", default=None, metavar="DIR", help="output folder (default: RUN/export)")
    p.add_argument("--option", "-O", action="append", default=[], metavar="KEY=VALUE",
                   help="an exporter's own option, repeatable (`zoo plugins --json` lists them), "
                        "e.g. -O opset=17 -O onnx_exporter=legacy for ONNX")
    p.add_argument("--opset", type=int, default=None,
                   help=f"shorthand for -O opset=N (ONNX, {ONNX_OPSETS[0]}..{ONNX_OPSETS[1]}; default 18)")
    p.add_argument("--onnx-exporter", choices=("auto", "dynamo", "legacy"), default=None,
                   help="shorthand for -O onnx_exporter=...: auto (default) uses torch's dynamo exporter and falls "
                        "back to the TorchScript-based one with a warning and the reason in export-report.json; "
                        "dynamo makes that fallback an error; legacy: the TorchScript-based exporter")
    p.add_argument("--preprocess", choices=("normalize", "none", "full"), default=d["preprocess"],
                   help="normalize (default): the model takes RGB uint8 NHWC at its input size, scaling and mean/std "
                        "inside (resize and crop first, with Pillow, exactly as the metadata's \"resize\" says); "
                        "none: float32 NCHW, already normalized; full: uint8 NHWC at any size, one image or a batch "
                        "of one size, with the resize and center crop inside the graph too (ONNX for onnxruntime, "
                        "TorchScript)")
    p.add_argument("--quantize", default=d["quantize"], metavar="KIND",
                   help="also write each format's quantized variant, e.g. int8: model.int8.onnx (static QDQ int8 "
                        "calibrated on your images), validated on top-1 agreement, size and speed reported")
    p.add_argument("--int8-mode", choices=("static", "dynamic"), default=None,
                   help="int8 kind: static (default: QDQ, per-channel, calibrated on the run's training images or "
                   "--images; batch-independent) or dynamic (activation scales per batch; ONNX Runtime only)")
    p.add_argument("--int8-ops", choices=("all", "matmul"), default=None,
                   help="shorthand for -O int8_ops=...: quantize Conv+MatMul+Gemm (all, default) or only MatMul+Gemm")
    p.add_argument("--optimize", action="store_true", help="shorthand for -O optimize=true (ONNX Runtime's basic "
                   "offline graph optimizations saved into the .onnx)")
    p.add_argument("--target", choices=("onnxruntime", "openvino", "opencv"), default=None,
                   help="shorthand for -O target=...: the runtime the ONNX file is for (default onnxruntime); its graph "
                        "is fitted to that runtime's profile and validated in it")
    p.add_argument("--no-validate-target", action="store_true",
                   help="shorthand for -O validate_target=false: validate in ONNX Runtime instead of the target "
                        "runtime (e.g. where it is not installed); the report says the target was not tried")
    p.add_argument("--dynamic-size", action="store_true",
                   help="shorthand for -O dynamic_size=true: dynamic input height and width where the backbone "
                        "allows (verified at a second size)")
    p.add_argument("--tolerance", type=float, default=d["tolerance"], metavar="TOL",
                   help="max |logit diff| vs eager PyTorch for fp32 artifacts (default 1e-4)")
    p.add_argument("--int8-agreement", type=float, default=d["int8_agreement"], metavar="FRAC",
                   help="min top-1 agreement with eager PyTorch for int8 (default 0.9)")
    p.add_argument("--images", default=d["images"], metavar="DIR",
                   help="validation images (default: scikit-image sample photos + synthetic images); "
                        "class-named subfolders also give an accuracy delta")
    p.add_argument("--no-embedding", action="store_true", help="leave the embedding output out")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    return p


def _print_table(report) -> None:
    from zoo.table import render

    def num(v, fmt):
        return "" if v is None or isinstance(v, str) else format(v, fmt)

    rows = []
    for name, a in report["artifacts"].items():
        v = a.get("validation") or {}
        rows.append([name, a.get("status", "?"), num(v.get("max_abs_logit_diff"), ".2e"),
                     num(v.get("top1_agreement"), ".3f"), num(v.get("min_embedding_cosine"), ".6f"),
                     a.get("path") or "-"])
    print(render(rows, ["FORMAT", "STATUS", "MAX|dLOGIT|", "TOP1-AGREE", "MIN-COS", "ARTIFACT"]))
    imgs = report.get("images", {})
    tol = report.get("tolerance", {})
    print(f"\nvalidated on {imgs.get('count')} images ({imgs.get('source')}) at batch sizes "
          f"{report['options']['batch_sizes']}; fp32 tolerance {tol.get('logits')}, int8 top-1 agreement >= "
          f"{tol.get('int8_agreement')}; report: {report['out']}/export-report.json")
    for name, a in report["artifacts"].items():
        v = a.get("validation") or {}
        acc = v.get("accuracy")
        if acc:
            print(f"  {name}: accuracy {acc['artifact']:.3f} vs eager {acc['eager']:.3f} on {acc['images']} labelled images")
        value = (a.get("export") or {}).get("value")
        if value:
            print(f"  {name}: {value['size_ratio']:.2f}x the fp32 file's size, {value['speedup']}x its ONNX Runtime speed "
                  f"(batch {value['batch']}: {value['int8_ms']} ms vs {value['fp32_ms']} ms)")
        for line in (value or {}).get("notes", []) + list(v.get("notes") or []) + list(v.get("problems") or []):
            print(f"  {name}: {line}")


def _options(args) -> dict:
    """-O KEY=VALUE pairs (strings; each exporter parses its own) plus the shorthand flags."""
    from zoo.errors import ZooError

    out: dict = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ZooError(f"--option expects KEY=VALUE, got {item!r}")
        out[key.strip()] = value
    for key, value in (("opset", args.opset), ("onnx_exporter", args.onnx_exporter), ("int8_ops", args.int8_ops), ("int8_mode", args.int8_mode),
                       ("optimize", args.optimize or None), ("target", args.target),
                       ("validate_target", False if args.no_validate_target else None),
                       ("dynamic_size", args.dynamic_size or None)):
        if value is not None:
            out[key] = value
    return out


def _source(args):
    """What to export: the run directory, or (--head pretrained) a backbone with its own classifier.
    Each misreading of the positional is an error naming both readings."""
    from pathlib import Path

    from zoo.errors import ZooError

    given = args.run
    is_run = Path(given).is_dir()
    if args.head == "pretrained":
        if is_run:
            raise ZooError(f"--head pretrained exports a backbone's own classifier, but {given!r} is a run directory; "
                           f"drop --head pretrained to export the run, or pass a backbone name (zoo list)")
        from zoo.model import pretrained_classifier

        from zoo.backbones import DEFAULT

        # absent: the backbone's default pretrained weights (a classifier needs real weights); "none" is
        # random init, which pretrained_classifier refuses with the reason
        weights = DEFAULT if args.weights is None else (None if args.weights.lower() == "none" else args.weights)
        model = pretrained_classifier(given, weights=weights)
        out = args.out or f"{model.meta.backbone.replace('/', '-')}-pretrained"
        return model, out
    if args.weights is not None:
        raise ZooError("--weights applies to --head pretrained only; a run's backbone weights are recorded in the run")
    if not is_run:
        from zoo.plugin import registry

        try:
            name = registry.backbones().resolve(given)[0].name
        except ZooError:
            name = None
        if name is not None:
            raise ZooError(f"{given!r} is a backbone, not a run directory: export it with its pretrained classifier "
                           f"(zoo export {given} --head pretrained), or train a head first (zoo train --backbone {given})")
        raise ZooError(f"{given!r} is neither a run directory (written by `zoo train`) nor a registered backbone "
                       "(`zoo list`); check the path or the name")
    return given, args.out


def run(args) -> int:
    import sys

    from zoo.table import print_json
    from zoo.errors import ExportValidationError
    from zoo.exporting import export

    def progress(msg):
        if not args.json:
            print(msg, file=sys.stderr)

    source, out = _source(args)
    try:
        report = export(source, formats=args.format or "all", out=out, preprocess=args.preprocess,
                        quantize=args.quantize, tolerance=args.tolerance, images=args.images,
                        embedding=not args.no_embedding, int8_agreement=args.int8_agreement, progress=progress,
                        options=_options(args))
    except ExportValidationError as exc:
        report = getattr(exc, "report", None)
        if report and "artifacts" in report:
            print_json(report) if args.json else _print_table(report)
        raise
    if args.json:
        print_json(report)
    else:
        _print_table(report)
    return 0
