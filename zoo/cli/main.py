"""`zoo` entry point: builds the argparse tree from the command modules, runs one, maps errors.

Each command module defines `add_parser(subparsers)` (no heavy imports) and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# (command, module): order is the order `zoo --help` lists them in.
COMMANDS = (
    ("list", "zoo.cli.cmd_list"),
    ("info", "zoo.cli.cmd_info"),
    ("plugins", "zoo.cli.cmd_plugins"),
    ("train", "zoo.cli.cmd_train"),
    ("evaluate", "zoo.cli.cmd_evaluate"),
    ("export", "zoo.cli.cmd_export"),
    ("predict", "zoo.cli.cmd_predict"),
    ("bench", "zoo.cli.cmd_bench"),
    ("doctor", "zoo.cli.cmd_doctor"),
)


def build_parser() -> argparse.ArgumentParser:
    from zoo import __version__

    parser = argparse.ArgumentParser(
        prog="zoo",
        description="backbone-zoo: pretrained image backbones as feature extractors. "
        "Pick a backbone, train a head on your images, export it validated.",
        epilog="Environment: ZOO_LOAD_PLUGINS=a,b (allow-list), ZOO_DISABLE_PLUGINS=a,b, ZOO_STRICT_PLUGINS=1.",
    )
    parser.add_argument("--version", action="version", version=f"backbone-zoo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # a command still being built is simply not offered
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    from zoo.errors import ZooError

    try:
        return int(args._run(args) or 0)
    except ZooError as exc:
        print(f"zoo {args.command}: error: {exc}", file=sys.stderr)
        if os.environ.get("ZOO_DEBUG"):
            raise
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `zoo list | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
