"""zoo plugins: every discovered plugin with its version, hooks, what it provides and its status
(ok/broken/disabled); `--reference` prints the plugin API reference (hooks, providers, records)."""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("plugins", help="list plugins, what they provide and whether they loaded")
    p.add_argument("--json", action="store_true")
    p.add_argument("--reference", action="store_true",
                   help="print the plugin API reference (Markdown, generated from the code)")
    return p


def _exporter_options():
    from zoo.plugin import registry

    reg = registry.exporters()
    return {name: [{"name": o.name, "default": o.default, "choices": list(o.choices), "help": o.help}
                   for o in reg.get(name).options] for name in reg.names()}


def run(args) -> int:
    from dataclasses import asdict

    from zoo.plugin import registry
    from zoo.table import print_json, render
    from zoo.plugin.host import get_host

    if args.reference:
        from zoo.plugin.reference import reference_markdown

        print(reference_markdown(), end="")
        return 0
    host = get_host()
    registry.backbones()  # registration is where most plugin failures show
    registry.exporters()
    statuses = sorted(host.status.values(), key=lambda s: (not s.builtin, s.name))
    if args.json:
        options = _exporter_options()
        print_json([asdict(s) | {"exporter_options": {e: options[e] for e in s.exporters}} for s in statuses])
        return 0
    rows = [[s.name + (" (built-in)" if s.builtin else ""), s.distribution, s.version, s.status,
             ", ".join(s.providers) or "-", s.backbones, ", ".join(s.exporters) or "-", ", ".join(s.hooks)]
            for s in statuses]
    print(render(rows, ["PLUGIN", "DISTRIBUTION", "VERSION", "STATUS", "PROVIDERS", "BACKBONES", "EXPORTERS",
                        "HOOKS"]))
    for s in statuses:
        if s.status != "ok":
            print(f"\n{s.name}: {s.status}: {s.error}")
    return 0
