"""zoo doctor: what this machine can do (versions, devices, exporters, cache, plugins)."""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser(
        "doctor", help="what this machine can do: versions, devices, exporters, cache, plugins",
        description="Print versions, CUDA/MPS devices and bf16 support, the CPU and its threads, which images "
        "export validation uses, the feature cache, every plugin's status (from the listing index) and each "
        "exporter's self-check (its runtime, and a real export of a tiny random model unless --no-probe). "
        "Paste it into bug reports. Nothing is downloaded.")
    p.add_argument("--json", action="store_true", help="the same as JSON")
    p.add_argument("--no-probe", action="store_true", help="skip the exporters' export probes")
    return p


def run(args) -> int:
    from zoo.table import print_json
    from zoo.doctor import collect, render

    report = collect(probe=not args.no_probe)
    if args.json:
        print_json(report)
    else:
        print(render(report))
    return 0
