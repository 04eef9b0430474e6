"""The pass manager: runs a named pipeline over a module with instruments around each pass.

Instruments: wall time and change count per pass, a structural verify after each pass, an
IR dump `NN_<pass>.ir` plus `index.txt`/`index.json` when a dump dir is given, skipping by
name, and (opt-in) a numeric check that the pass preserved what the function computes.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import NanoForgeError
from ..ir.graph import Module
from ..ir.printer import format_module
from ..ir.verifier import VerifyError, verify_module


@dataclass(frozen=True)
class Pass:
    """A named rewrite: mutates the module in place and returns how many places it changed."""

    name: str
    run: Callable[[Module, dict[str, Any]], int]
    doc: str
    defaults: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassRecord:
    name: str
    changes: int
    time_ms: float
    options: dict[str, Any]
    skipped: bool = False
    dump: str | None = None


@dataclass
class PassContext:
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # pass name -> options
    disabled: set[str] = field(default_factory=set)
    dump_dir: Path | None = None
    verify_each_pass: bool = False
    log: Callable[[str], None] = lambda msg: None


class PassManager:
    def __init__(self, passes: dict[str, Pass], pipeline: list[str], ctx: PassContext):
        unknown = [n for n in pipeline + sorted(ctx.disabled) + sorted(ctx.options) if n not in passes]
        if unknown:
            raise NanoForgeError(f"unknown pass {unknown[0]!r}; passes: {', '.join(passes)}")
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
        from .numeric_check import check_pass_preserves  # imports torch: only when asked for

        self._dump(0, "input", module)
        for i, name in enumerate(self.pipeline, 1):
            p = self.passes[name]
            opts = {**p.defaults, **self.ctx.options.get(name, {})}
            if name in self.ctx.disabled:
                self.records.append(PassRecord(name, 0, 0.0, opts, skipped=True))
                self.ctx.log(f"  {name:<18} skipped (--disable-pass)")
                continue
            before = module.clone() if self.ctx.verify_each_pass else None
            start = time.perf_counter()
            changes = p.run(module, opts)
            ms = (time.perf_counter() - start) * 1000
            try:
                verify_module(module)
            except VerifyError as e:
                raise NanoForgeError(f"pass {name} produced invalid IR: {e}") from None
            if before is not None:
                check_pass_preserves(name, before, module)
            rec = PassRecord(name, changes, round(ms, 2), opts, dump=self._dump(i, name, module))
            self.records.append(rec)
            self.ctx.log(f"  {name:<18} {changes:>5} changes {ms:8.1f} ms"
                         + ("  numerics ok" if before is not None else ""))
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
