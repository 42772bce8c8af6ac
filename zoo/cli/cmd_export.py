"""zoo export RUN: the trained model to validated ONNX / TorchScript artifacts (fail-closed)."""

from __future__ import annotations


def add_parser(sub):
    from zoo.options import ExportConfig, defaults

    d = defaults(ExportConfig)
    p = sub.add_parser(
        "export", help="export a trained run to ONNX / TorchScript, validated against eager PyTorch",
        description="Export the whole model (frozen backbone + head) of a run directory. Each artifact is "
        "validated against eager PyTorch on real images at batch sizes 1, 3 and 8 before it is moved into "
        "place; over tolerance, nothing is left behind, the numbers go to OUT/export-report.json, and the "
        "exit code is 3. Each export format's own options are flags too (listed below, after the common ones, "
        "with the formats that take them), generated from the installed exporters' declared options.",
        late_arguments=add_exporter_flags)
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
                   help="an export format's own option, repeatable (`zoo plugins --json` lists them; each also "
                        "has its flag below); a flag given too wins")
    p.add_argument("--preprocess", choices=("normalize", "none", "full"), default=d["preprocess"],
                   help="normalize (default): the model takes RGB uint8 NHWC at its input size, scaling and mean/std "
                        "inside (resize and crop first, with Pillow, exactly as the metadata's \"resize\" says); "
                        "none: float32 NCHW, already normalized; full: uint8 NHWC at any size, one image or a batch "
                        "of one size, with the resize and center crop inside the graph too (ONNX for onnxruntime, "
                        "TorchScript)")
    p.add_argument("--quantize", default=d["quantize"], metavar="KIND",
                   help="also write each format's quantized variant, e.g. int8: model.int8.onnx (static QDQ int8 "
                        "calibrated on your images), validated on top-1 agreement, size and speed reported")
    p.add_argument("--tolerance", type=float, default=d["tolerance"], metavar="TOL",
                   help="the fp32 bound: |logit diff| <= TOL x (1 + max|eager logit| of the batch) (default 1e-4)")
    p.add_argument("--int8-agreement", type=float, default=d["int8_agreement"], metavar="FRAC",
                   help="min top-1 agreement with eager PyTorch for int8 (default 0.9)")
    p.add_argument("--images", default=d["images"], metavar="DIR",
                   help="validation images (default: scikit-image sample photos + synthetic images); "
                        "class-named subfolders also give an accuracy delta")
    p.add_argument("--strict", action="store_true", help="refuse unreadable --images files up front (default: they "
                   "are listed, skipped, and named in the report)")
    p.add_argument("--no-embedding", action="store_true", help="leave the embedding output out")
    p.add_argument("--step-budget", type=float, default=d["step_budget"], metavar="SECONDS",
                   help="the time each export step (reference outputs, each format's export, each format's "
                        "validation) may take before it is stopped with an error naming it (default: "
                        "$ZOO_EXPORT_STEP_BUDGET, else 900 s + 60 s per million parameters)")
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
          f"{report['options']['batch_sizes']}; fp32 bound |dlogit| <= {tol.get('logits')} + {tol.get('logits_rtol')} x "
          f"max|logit| per batch, int8 top-1 agreement >= "
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


OPTION_DEST = "exporter_option:"  # argparse dest prefix of the generated flags (never a Python name)
_TYPES = {"int": int, "float": float}


def export_flags(declared: dict) -> list[dict]:
    """One flag per option name, from each exporter's declared options (`zoo.index.exporter_options`:
    format -> [{name, default, choices, help, type, flag, metavar}], in registry order).

    The rule for a name several formats declare: one flag feeding all of them (each parses the
    value itself). Where they agree on the flag's spelling and type, the flag is the first
    declaration's (a switch stays a switch); where they disagree (a switch here, a value there), the
    flag takes a VALUE (true/false for the switches) and its help gives each format's meaning."""
    by_name: dict[str, list[tuple[str, dict]]] = {}
    for fmt, options in declared.items():
        for o in options:
            by_name.setdefault(o["name"], []).append((fmt, o))
    flags = []
    for name, decls in by_name.items():
        first = decls[0][1]
        formats = ", ".join(fmt for fmt, _ in decls)
        agree = all(o.get("flag") == first.get("flag") and o.get("type") == first.get("type") for _, o in decls)
        if agree:
            defaults = {repr(o["default"]) for _, o in decls}
            flags.append({"name": name, "flag": first["flag"], "type": first.get("type", "str"),
                          "default": first["default"] if len(defaults) == 1 else None,
                          "choices": first.get("choices") or [], "metavar": first.get("metavar") or "",
                          "help": f"{first['help']} [{formats}]"})
        else:
            meanings = "; ".join(f"{fmt}: {o['help']} (default {_shown(o['default'])})" for fmt, o in decls)
            flags.append({"name": name, "flag": "--" + name.replace("_", "-"), "type": "str", "default": None,
                          "choices": [], "metavar": "VALUE",
                          "help": f"{name}, declared differently by {formats}; each parses VALUE itself "
                                  f"(true/false for a switch): {meanings}"})
    return flags


def _shown(value) -> str:
    return {True: "on", False: "off"}.get(value, str(value)) if isinstance(value, bool) else str(value)


def add_exporter_flags(parser) -> None:
    """The installed exporters' options as flags (from the plugin index: no plugin imported). A
    flag that would shadow one of `zoo export`'s own is left out (the option stays reachable as
    -O NAME=VALUE); an index that cannot be read leaves only -O (the export itself then reports
    the plugin problem)."""
    import argparse

    try:
        from zoo import index

        declared = index.export_flag_options()
    except Exception:  # noqa: BLE001 - help and parsing must work with a broken plugin set
        return
    taken = set(parser._option_string_actions)
    group = parser.add_argument_group("export formats' own options (each feeds every format that declares it)")
    for f in export_flags(declared):
        if f["flag"] in taken:
            continue
        taken.add(f["flag"])
        common = {"dest": OPTION_DEST + f["name"], "default": argparse.SUPPRESS}
        if f["type"] == "bool":
            on = f["flag"].startswith("--no-")
            group.add_argument(f["flag"], action="store_const", const=not on, **common,
                               help=f"{f['help']} ({'on by default; this flag turns it off' if on else 'default: off'})")
            continue
        kind = _TYPES.get(f["type"], str)
        choices = f["choices"] if f["choices"] and kind is str else None
        # non-text choices are checked by the exporter (argparse would list every one as the metavar)
        ranged = ([f"{min(f['choices'])}..{max(f['choices'])}"] if f["choices"] and kind is int
                  else [f"one of {', '.join(map(str, f['choices']))}"] if f["choices"] and not choices else [])
        notes = ([] if f["default"] is None else [f"default {f['default']}"]) + ranged
        default = f" ({'; '.join(notes)})" if notes else ""
        metavar = f["metavar"] or (None if choices else {"int": "N", "float": "X"}.get(f["type"], "VALUE"))
        group.add_argument(f["flag"], type=kind, choices=choices, metavar=metavar, **common,
                           help=f"{f['help']}{default}")


def _options(args) -> dict:
    """-O KEY=VALUE pairs (strings; each exporter parses its own), then the generated flags given."""
    from zoo.errors import ZooError

    out: dict = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ZooError(f"--option expects KEY=VALUE, got {item!r}")
        out[key.strip()] = value
    out.update({dest[len(OPTION_DEST):]: value for dest, value in vars(args).items() if dest.startswith(OPTION_DEST)})
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
                        strict=args.strict, step_budget=args.step_budget,
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
