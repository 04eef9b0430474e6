"""Helpers for the IR-in / IR-out pass tests: write a module as IR text, run one pass, compare text.

    out = run("fuse_elementwise", '''
        module
        ...
    ''', fuse_elementwise.Options())
    assert out == ir('''...expected...''')

`ir` only removes the common leading indentation (and the first newline), so expected text reads
exactly as `nanoforge.ir.printer.format_module` prints it.
"""
from __future__ import annotations

import textwrap

from nanoforge.ir.graph import Module
from nanoforge.ir.parser import parse_module
from nanoforge.ir.printer import format_function, format_module
from nanoforge.ir.verifier import verify_module
from nanoforge.passes import PASSES

# The ModelInfo fact of every tiny module here (printed with sorted keys, as format_module does).
MODEL = ('meta model = {"architecture": "TinyForCausalLM", "dtype": "f32", "hidden_size": 8, '
         '"max_position_embeddings": 64, "num_layers": 1, "vocab_size": 32}')


def ir(text: str) -> str:
    """IR text written indented inside a test -> the text as the printer writes it."""
    return textwrap.dedent(text).lstrip("\n").rstrip() + "\n"


def parse(text: str) -> Module:
    module = parse_module(ir(text))
    verify_module(module)  # the input is valid IR, so whatever breaks is the pass's doing
    return module


def apply(pass_name: str, text: str, options) -> tuple[Module, int]:
    """Parse `text`, run one pass over it as the pass manager would (then verify): (module, changes)."""
    module = parse(text)
    changes = PASSES[pass_name].run(module, options)
    verify_module(module)
    return module, changes


def run(pass_name: str, text: str, options) -> str:
    """The module's text after one pass."""
    return format_module(apply(pass_name, text, options)[0])


def run_fn(pass_name: str, text: str, options, fn: str = "forward") -> str:
    """One function's text after one pass (for passes whose param lines are not the point)."""
    return format_function(apply(pass_name, text, options)[0].functions[fn]) + "\n"
