"""The pass manager: runs a named pipeline over a module with instruments around each pass.

Instruments: wall time and change count per pass, a structural verify after each pass, an
IR dump `NN_<pass>.ir` plus `index.txt`/`index.json` when a dump dir is given, skipping by
name, and an `after_pass` hook that sees the module before and after each pass (the compiler
hangs the numeric check of `--verify-each-pass` there, so this package never imports it).
A pass's options are a dataclass of its own, whose field defaults are the pass's defaults.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import NanoForgeError
from ..ir.graph import Module
from ..ir.printer import format_module
from ..ir.verifier import VerifyError, verify_module


@dataclass(frozen=True)
class NoOptions:
    """The options of a pass that takes none."""


@dataclass(frozen=True)
class Pass:
    """A named rewrite: mutates the module in place and returns how many places it changed."""

    name: str
    run: Callable[[Module, Any], int]  # (module, an instance of `options`) -> changes
    doc: str
    options: type = NoOptions  # dataclass of the pass's options; its field defaults are the defaults


@dataclass
class PassRecord:
    name: str
    changes: int
    time_ms: float
    options: dict[str, Any]
    skipped: bool = False
    dump: str | None = None


# (pass name, a copy of the module before the pass, the module after it) -> a note for the log, or None
AfterPass = Callable[[str, Module, Module], Optional[str]]


@dataclass
class PassContext:
    options: dict[str, Any] = field(default_factory=dict)  # pass name -> its options (absent: the defaults)
    disabled: set[str] = field(default_factory=set)
    dump_dir: Path | None = None
    after_pass: AfterPass | None = None
    log: Callable[[str], None] = lambda msg: None


class PassManager:
    def __init__(self, passes: dict[str, Pass], pipeline: list[str], ctx: PassContext):
        unknown = [n for n in pipeline + sorted(ctx.disabled) + sorted(ctx.options) if n not in passes]
        if unknown:
            raise NanoForgeError(f"unknown pass {unknown[0]!r}; passes: {', '.join(passes)}")
        for name, opts in ctx.options.items():
            if not isinstance(opts, passes[name].options):
                raise TypeError(f"options of pass {name} must be {passes[name].options.__qualname__}, "
                                f"not {type(opts).__qualname__}")
        self.passes, self.pipeline, self.ctx = passes, pipeline, ctx
        self.records: list[PassRecord] = []

    def _dump(self, index: int, name: str, module: Module) -> str | None:
        if self.ctx.dump_dir is None:
            return None
        self.ctx.dump_dir.mkdir(parents=True, exist_ok=True)
        fname = f"{index:02d}_{name}.ir"
        (self.ctx.dump_dir / fname).write_text(format_module(module))
        return fname

    def run(self, module: Module) -> Module:
        self._dump(0, "input", module)
        for i, name in enumerate(self.pipeline, 1):
            p = self.passes[name]
            opts = self.ctx.options.get(name) or p.options()
            if name in self.ctx.disabled:
                self.records.append(PassRecord(name, 0, 0.0, asdict(opts), skipped=True))
                self.ctx.log(f"  {name:<18} skipped (--disable-pass)")
                continue
            before = module.clone() if self.ctx.after_pass is not None else None
            start = time.perf_counter()
            changes = p.run(module, opts)
            ms = (time.perf_counter() - start) * 1000
            try:
                verify_module(module)
            except VerifyError as e:
                raise NanoForgeError(f"pass {name} produced invalid IR: {e}") from None
            note = self.ctx.after_pass(name, before, module) if before is not None else None
            rec = PassRecord(name, changes, round(ms, 2), asdict(opts), dump=self._dump(i, name, module))
            self.records.append(rec)
            self.ctx.log(f"  {name:<18} {changes:>5} changes {ms:8.1f} ms" + (f"  {note}" if note else ""))
        self._write_index()
        return module

    def _write_index(self) -> None:
        if self.ctx.dump_dir is None:
            return
        lines = ["#   pass                changes   time_ms  dump", "00  (input)                   -         -  00_input.ir"]
        for i, r in enumerate(self.records, 1):
            lines.append(f"{i:02d}  {r.name:<18} {('skipped' if r.skipped else r.changes):>8} "
                         f"{r.time_ms:>9}  {r.dump or '-'}")
        (self.ctx.dump_dir / "index.txt").write_text("\n".join(lines) + "\n")
        (self.ctx.dump_dir / "index.json").write_text(json.dumps([asdict(r) for r in self.records], indent=1))
