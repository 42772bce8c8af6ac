"""zoo plugins: every discovered plugin with its version, hooks and status (ok/broken/disabled)."""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("plugins", help="list plugins, their hooks and whether they loaded")
    p.add_argument("--json", action="store_true")
    return p


def run(args) -> int:
    from dataclasses import asdict

    from zoo import registry
    from zoo.cli.table import print_json, render
    from zoo.plugins import get_host

    host = get_host()
    registry.backbones()  # registration is where most plugin failures show
    registry.exporters()
    statuses = sorted(host.status.values(), key=lambda s: s.name)
    if args.json:
        print_json([asdict(s) for s in statuses])
        return 0
    rows = [[s.name, s.distribution, s.version, s.status, s.backbones, s.exporters, ", ".join(s.hooks)]
            for s in statuses]
    print(render(rows, ["PLUGIN", "DISTRIBUTION", "VERSION", "STATUS", "BACKBONES", "EXPORTERS", "HOOKS"]))
    for s in statuses:
        if s.status != "ok":
            print(f"\n{s.name}: {s.status}: {s.error}")
    return 0
