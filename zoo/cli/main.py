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
    ("select", "zoo.cli.cmd_select"),
    ("train", "zoo.cli.cmd_train"),
    ("evaluate", "zoo.cli.cmd_evaluate"),
    ("export", "zoo.cli.cmd_export"),
    ("predict", "zoo.cli.cmd_predict"),
    ("bench", "zoo.cli.cmd_bench"),
    ("doctor", "zoo.cli.cmd_doctor"),
)


class HelpFormatter(argparse.HelpFormatter):
    """Help texts may name `{default_backbone}`: the backbone `zoo train` really uses without
    --backbone (the one a plugin declares), looked up only when help is shown (the listing index,
    no model built), so `zoo train --help` shows the real default and not the word "default"."""

    def _get_help_string(self, action):
        text = super()._get_help_string(action) or ""
        if "{default_backbone}" in text:
            text = text.replace("{default_backbone}", _default_backbone())
        return text


def _default_backbone() -> str:
    try:
        from zoo import index

        name = index.catalog().default_backbone
    except Exception:  # noqa: BLE001 - help must print even with a broken plugin set
        name = None
    return name or "the backbone a plugin declares as default; none is installed"


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line `zoo CMD: error: ...` (exit 2) like every other
    error, pointing at --help instead of printing the usage block."""

    def __init__(self, *args, late_arguments=None, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        # arguments that cost a look-up to declare (e.g. `zoo export`'s flags from the plugin index):
        # added when this command is parsed or its help shown, so other commands never pay for them
        self._late_arguments = late_arguments

    def _add_late_arguments(self) -> None:
        late, self._late_arguments = self._late_arguments, None
        if late is not None:
            late(self)

    def parse_known_args(self, args=None, namespace=None):
        self._add_late_arguments()
        return super().parse_known_args(args, namespace)

    def format_help(self):
        self._add_late_arguments()
        return super().format_help()

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from zoo import __version__

    parser = Parser(
        prog="zoo",
        description="backbone-zoo: pretrained image backbones as feature extractors. "
        "Pick a backbone, train a head on your images, export it validated.",
        epilog="Environment: ZOO_LOAD_PLUGINS=a,b (allow-list), ZOO_DISABLE_PLUGINS=a,b, ZOO_STRICT_PLUGINS=1.",
    )
    parser.add_argument("--version", action="version", version=f"backbone-zoo {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also: ZOO_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, module_name in COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # a command still being built is simply not offered
        p = module.add_parser(sub)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an error (also: ZOO_DEBUG=1)")
        p.set_defaults(_run=module.run, _parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the command's parser, so the message names the command
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    from zoo.errors import ZooError

    debug = bool(getattr(args, "debug", False) or os.environ.get("ZOO_DEBUG"))
    prefix = f"zoo {args.command}: error:"
    try:
        return int(args._run(args) or 0)
    except ZooError as exc:
        _say(prefix, str(exc))
        if debug:
            raise
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `zoo list | head`
        return 0
    except OSError as exc:  # a path that cannot be read or written: name it, no traceback
        where = f" {exc.filename!r}" if exc.filename else ""
        _say(prefix, f"{exc.strerror or exc}:{where} ({type(exc).__name__}); check the path and its permissions")
        if debug:
            raise
        return 2
    except Exception as exc:  # noqa: BLE001 - a bug, still one line; --debug shows where
        _say(prefix, f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback, and please report it)")
        if debug:
            raise
        return 2


def _say(prefix: str, message: str) -> None:
    """The error's first line after `zoo CMD: error:`; listings (skipped files...) follow indented."""
    print(f"{prefix} {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
