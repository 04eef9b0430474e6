"""verify: structural checks of the traced module (SSA, operand types, params); changes nothing."""
from __future__ import annotations

from ..ir.graph import Module
from ..ir.verifier import verify_module
from .manager import NoOptions, Pass


def verify(module: Module, opts: NoOptions) -> int:
    verify_module(module)
    return 0


PASS = Pass("verify", verify, "structural checks: SSA, types, params")
