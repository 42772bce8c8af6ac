"""zoo plugins: every discovered plugin with its version, hooks, what it provides and its status
(ok/broken/disabled/conflict), answered from the listing index when it is current (no plugin is
imported); `--check` imports and verifies every plugin now; `--reference` prints the plugin API
reference; `zoo plugins new NAME` writes a new plugin package."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("plugins", help="list plugins, what they provide and whether they loaded; `new` scaffolds one",
                       description="List every plugin (from the cached listing index when it is current). "
                       "`zoo plugins new NAME` writes a complete plugin package to start from.")
    p.add_argument("--json", action="store_true")
    p.add_argument("--check", action="store_true",
                   help="import and verify every plugin now (not from the index): registration, every weights "
                        "tag's stats, listed feature dimensions; exit 1 if any plugin is broken or in conflict")
    p.add_argument("--reference", action="store_true",
                   help="print the plugin API reference (Markdown, generated from the code)")
    actions = p.add_subparsers(dest="action", metavar="{new}")
    new = actions.add_parser("new", help="write a new plugin package (provider, exporter, tests) to start from",
                             description="Write a complete plugin package: pyproject.toml with the entry point, a "
                             "backbone provider (weights from a package or a file, the offline error, a pretrained "
                             "head) and an exporter, and tests running the conformance kit. "
                             "`pip install -e DIR && pytest DIR` passes as generated.")
    new.add_argument("name", help="the provider name users type (NAME/model), e.g. mynets")
    new.add_argument("--dir", default=None, help="where to write it (default: ./zoo-NAME)")
    new.add_argument("--force", action="store_true", help="write into an existing, non-empty directory")
    return p


def run(args: Any) -> int:
    from zoo.table import print_json, render

    if getattr(args, "action", None) == "new":
        return _new(args)
    if args.reference:
        from zoo.plugin.reference import reference_markdown

        print(reference_markdown(), end="")
        return 0
    statuses, options, problems = _check() if args.check else _from_index()
    statuses = sorted(statuses, key=lambda s: (not s.builtin, s.name))
    if args.json:
        from dataclasses import asdict

        print_json([asdict(s) | {"exporter_options": {e: options.get(e, []) for e in s.exporters}}
                    | ({"problems": problems.get(s.name, [])} if args.check else {}) for s in statuses])
    else:
        rows = [[s.name + (" (built-in)" if s.builtin else ""), s.distribution, s.version, s.status,
                 ", ".join(s.providers) or "-", s.backbones, ", ".join(s.exporters) or "-",
                 ", ".join(s.engines) or "-", ", ".join(s.hooks)]
                for s in statuses]
        print(render(rows, ["PLUGIN", "DISTRIBUTION", "VERSION", "STATUS", "PROVIDERS", "BACKBONES", "EXPORTERS",
                            "ENGINES", "HOOKS"]))
        for s in statuses:
            if s.status != "ok":
                print(f"\n{s.name}: {s.status}: {s.error}")
            for problem in problems.get(s.name, []):
                print(f"\n{s.name}: check: {problem}")
    if args.check:
        bad = [s for s in statuses if s.status in ("broken", "conflict") or problems.get(s.name)]
        return 1 if bad else 0
    return 0


def _from_index() -> tuple[list[Any], dict[str, Any], dict[str, list[str]]]:
    from zoo import index

    statuses = index.plugin_statuses(index.catalog())
    return statuses, index.export_flag_options(), {}


def _check() -> tuple[list[Any], dict[str, Any], dict[str, list[str]]]:
    """Every plugin imported and registered now, then asked for what the index records."""
    from zoo import index
    from zoo.plugin import host, registry

    host.reset()
    live = host.get_host()
    for load in (registry.backbones, registry.exporters, registry.engines):
        try:
            load()
        except Exception:  # noqa: BLE001 - strict mode raises; the statuses still say which plugin
            pass
    problems: dict[str, list[str]] = {}
    reg = registry.backbones()
    for rec in reg:
        for tag in dict.fromkeys((rec.spec.default_weights, *rec.spec.weight_tags, None)):
            try:
                reg.normalization(rec, tag)
            except Exception as exc:  # noqa: BLE001 - reported, per plugin
                problems.setdefault(rec.plugin, []).append(f"{rec.name} weights {tag!r}: {exc}")
        try:
            reg.static_feature_dim(rec)
        except Exception as exc:  # noqa: BLE001
            problems.setdefault(rec.plugin, []).append(f"{rec.name} feature_dim: {exc}")
    index.build()  # what was just verified is what `zoo list` answers from
    return list(live.status.values()), index.exporter_options(registry.exporters()), problems


def _new(args: Any) -> int:
    from pathlib import Path

    from zoo.plugin.scaffold import write_plugin

    target = Path(args.dir) if args.dir else Path(f"zoo-{args.name.replace('_', '-')}")
    written = write_plugin(args.name, target, force=args.force)
    print(f"wrote {len(written)} files to {target}/ (plugin {args.name!r}):")
    for path in written:
        print(f"  {path.relative_to(target)}")
    print(f"\nnext: pip install -e {target} && python -m pytest {target}/tests   (then `zoo plugins`, "
          f"`zoo list '{args.name}/*'`)")
    return 0
