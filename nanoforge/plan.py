"""The plan artifact: a directory with `plan.json` (data only) and readable copies of the IR
and the generated source. Saving is atomic (no half-written plan dir is ever left behind);
loading checks the header against this nanoforge, this machine and the checkpoint, and names
every mismatch."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .errors import NanoForgeError
from .ir.graph import Module
from .ir.parser import parse_module
from .ir.printer import format_function, format_module
from .ir.verifier import verify_module

FORMAT_VERSION = 1


@dataclass
class Plan:
    module: Module
    checkpoint: dict[str, Any]  # path, kind, fingerprint
    config: dict[str, Any]  # the HF config the model was traced from
    target: dict[str, Any]
    passes: list[dict[str, Any]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    nanoforge_version: str = __version__

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "nanoforge_version": self.nanoforge_version,
            "model": {"architecture": self.module.meta.get("architecture"), "config": self.config},
            "checkpoint": self.checkpoint,
            "target": self.target,
            "options": self.options,
            "passes": self.passes,
            "stats": self.stats,
            "parallel": self.module.meta.get("parallel"),  # absent: one rank
            "kv_contract": self.module.meta.get("kv_contract"),
            "memory": self.module.meta.get("memory"),
            "ir": format_module(self.module),
        }

    def save(self, out: Path) -> None:
        """Write to a temp dir beside `out`, then swap it in; an existing plan is replaced."""
        from .codegen.pysource import module_source

        out = Path(out)
        if out.exists() and not (out / "plan.json").exists() and any(out.iterdir()):
            raise NanoForgeError(f"{out} exists and is not a nanoforge plan; refusing to overwrite it")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            (tmp / "plan.json").write_text(json.dumps(self.to_json(), indent=1))
            (tmp / "ir").mkdir()
            for fn in self.module.functions.values():
                (tmp / "ir" / f"{fn.name}.ir").write_text(format_function(fn) + "\n")
            (tmp / "generated").mkdir()
            (tmp / "generated" / "model.py").write_text(module_source(self.module))
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def read_plan(path: Path | str) -> Plan:
    """Parse a plan dir (data only) and check its format version; no checkpoint needed."""
    path = Path(path)
    f = path / "plan.json"
    if not f.is_file():
        raise NanoForgeError(f"{path} is not a nanoforge plan (no plan.json)")
    try:
        data = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NanoForgeError(f"{f}: not valid JSON ({e})") from None
    version = data.get("format_version") if isinstance(data, dict) else None
    if version != FORMAT_VERSION:
        raise NanoForgeError(f"{f}: plan format version {version!r} is not supported by nanoforge {__version__} "
                             f"(it reads version {FORMAT_VERSION}); recompile the checkpoint")
    try:
        module = parse_module(data["ir"])
        verify_module(module)
        return Plan(module, data["checkpoint"], data["model"]["config"], data["target"], data.get("passes", []),
                    data.get("options", {}), data.get("stats", {}), data.get("nanoforge_version", "?"))
    except (KeyError, TypeError) as e:
        raise NanoForgeError(f"{f}: missing or malformed field {e}") from None


def machine_mismatches(plan: Plan, device: str | None) -> list[str]:
    """What stops this machine from running the plan on `device` (None: the plan's own device)."""
    want = plan.target.get("device", "cpu")
    if device is not None and device != want:
        return [f"plan targets {want}, not {device} (recompile with --device {device})"]
    if want == "cpu":
        return []
    import torch

    if not torch.cuda.is_available():
        return [f"plan targets {want} but this machine has no CUDA device"]
    return []
