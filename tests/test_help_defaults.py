"""Help texts show real defaults: every `zoo CMD --help` names values a user can type, never the
placeholder word of a config ("default default") or Python's None."""

from __future__ import annotations

import re

import pytest

from zoo.cli.main import build_parser

COMMANDS = ["train", "evaluate", "export", "predict", "bench", "list", "info", "plugins", "doctor"]


def _help(command: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return " ".join(sub.choices[command].format_help().split())


@pytest.mark.parametrize("command", COMMANDS)
def test_help_names_real_defaults(command):
    text = _help(command)
    bad = re.findall(r"default:? (?:default|None)\b[^,;)]*", text)
    assert not bad, f"zoo {command} --help shows placeholder defaults: {bad}"


def test_train_help_shows_the_declared_default_backbone():
    from zoo.plugin.registry import default_backbone

    text = _help("train")
    assert f"--backbone BACKBONE provider/model[.tag] (default {default_backbone()})" in text
    assert "{default_backbone}" not in text
