"""The README is the first thing a user reads: what it points to exists in this repository, its
pipeline picture lists the passes the compiler runs, and every flag of every command appears in
it (the synopses once missed half of them)."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from nanoforge.cli import build_parser
from nanoforge.passes import PIPELINES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_linked_documents_are_in_the_repository():
    links = re.findall(r"\]\(([^)#\s]+)\)", README) + re.findall(r"`((?:docs|bench|tests|scripts)/[\w./-]+)`", README)
    assert "docs/design.md" in links
    missing = [x for x in links if not x.startswith("http") and not (ROOT / x).exists()]
    assert not missing, f"README points to files this repository lacks: {missing}"
    assert "../shared" not in README


def test_architecture_lists_the_default_pipeline_in_order():
    picture = README[README.index("## Architecture"):]
    where = [picture.find(name) for name in PIPELINES["default"]]
    assert -1 not in where, [n for n, w in zip(PIPELINES["default"], where) if w == -1]
    assert where == sorted(where)


def _subcommands(parser: argparse.ArgumentParser, prefix: str = ""):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subcommands(sub, f"{prefix} {name}".strip())
    yield prefix, parser


@pytest.mark.parametrize("command, parser", [(c, p) for c, p in _subcommands(build_parser()) if c])
def test_every_flag_is_in_the_readme(command, parser):
    flags = [s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
    missing = [f for f in flags if f not in README]
    assert not missing, f"nanoforge {command}: flags the README does not mention: {missing}"


def test_bench_commands_shown_are_valid():
    """The CPU-sized bench commands once asked for --max-output 64 under the default --min-output 100."""
    text = README.replace("\\\n", " ")
    lines = [x.split("#")[0].split() for x in text.splitlines() if x.startswith("nanoforge bench offline --model")]
    assert lines
    for argv in lines:
        a = build_parser().parse_args(argv[1:])
        assert 1 <= a.min_input <= a.max_input and 1 <= a.min_output <= a.max_output, " ".join(argv)
