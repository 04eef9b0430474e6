"""The plan artifact: a directory with `plan.json` (data only) and readable copies of the IR
and the generated source. Saving is atomic (no half-written plan dir is ever left behind);
loading checks every field's type and names the first one that is wrong, then checks the header
against this nanoforge, this machine and the checkpoint, and names every mismatch.

What the passes found out (KV contract, memory, CUDA-graph sizes, parallel layout, DeepEP modes)
travels inside the IR as typed facts (facts.py); `Plan` exposes each as a typed attribute."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import NanoForgeError
from .facts import (CudaGraphPlan, DeepEPPlan, MemoryPlan, ModelInfo, ParallelLayout, ProviderNotes, SpeculativePlan,
                    Target, layout_of, read, require)
from .ir.graph import Module
from .ir.parser import parse_module
from .ir.printer import format_function, format_module
from .ir.verifier import verify_module
from .kv_contract import KVContract
from .typed_json import from_json, to_json
from .version import __version__

FORMAT_VERSION = 2  # 2: facts are typed (meta "model" replaces the loose architecture/dtype/... keys)


@dataclass(frozen=True)
class CheckpointRef:
    path: str
    kind: str  # hf | gguf | random
    fingerprint: dict[str, Any] | None = None  # None: compiled with --config-only (not runnable)


@dataclass(frozen=True)
class _ModelField:
    architecture: str
    config: dict[str, Any]


@dataclass(frozen=True)
class _PlanFile:
    """plan.json as read: every field a loaded plan relies on, with its type."""

    format_version: int
    model: _ModelField
    checkpoint: CheckpointRef
    target: Target
    ir: str
    nanoforge_version: str = "?"
    options: dict[str, Any] = field(default_factory=dict)
    passes: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    module: Module
    checkpoint: CheckpointRef
    config: dict[str, Any]  # the HF config the model was traced from
    target: Target
    passes: list[dict[str, Any]] = field(default_factory=list)  # the pass manager's records
    options: dict[str, Any] = field(default_factory=dict)  # the CompileOptions it was made with
    stats: dict[str, Any] = field(default_factory=dict)
    nanoforge_version: str = __version__

    # -- the facts, typed ------------------------------------------------------------------------
    @property
    def model(self) -> ModelInfo:
        return require(self.module, ModelInfo)

    @property
    def dtype(self) -> str:
        return self.model.dtype

    @property
    def kv_contract(self) -> KVContract:
        return require(self.module, KVContract)

    @property
    def memory(self) -> MemoryPlan:
        return require(self.module, MemoryPlan)

    @property
    def cuda_graphs(self) -> CudaGraphPlan:
        return read(self.module, CudaGraphPlan) or CudaGraphPlan()

    @property
    def parallel(self) -> ParallelLayout:
        return layout_of(self.module)

    @property
    def speculative(self) -> SpeculativePlan | None:
        return read(self.module, SpeculativePlan)

    @property
    def deep_ep(self) -> DeepEPPlan | None:
        return read(self.module, DeepEPPlan)

    @property
    def provider_notes(self) -> dict[str, list[str]]:
        notes = read(self.module, ProviderNotes)
        return notes.notes if notes else {}

    def check_facts(self) -> None:
        """Read every fact once, so a malformed one fails at load, naming its field."""
        for name in ("model", "kv_contract", "memory", "cuda_graphs", "parallel", "deep_ep", "provider_notes", "speculative"):
            getattr(self, name)

    # -- files -----------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        par = read(self.module, ParallelLayout)
        return {
            "format_version": FORMAT_VERSION,
            "nanoforge_version": self.nanoforge_version,
            "model": {"architecture": self.model.architecture, "config": self.config},
            "checkpoint": to_json(self.checkpoint),
            "target": to_json(self.target),
            "options": self.options,
            "passes": self.passes,
            "stats": self.stats,
            "parallel": to_json(par) if par else None,  # absent: one rank
            "kv_contract": self.kv_contract.to_json(),
            "memory": to_json(self.memory),
            "cuda_graphs": to_json(self.cuda_graphs),
            "ir": format_module(self.module),
        }

    def save(self, out: Path) -> None:
        """Write to a temp dir beside `out`, then swap it in; an existing plan is replaced. The
        dir gets the permissions of any other new dir (mkdtemp alone would leave it 0700)."""
        from .codegen.pysource import module_source

        out = Path(out)
        if out.exists() and not (out / "plan.json").exists() and any(out.iterdir()):
            raise NanoForgeError(f"{out} exists and is not a nanoforge plan; refusing to overwrite it")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            tmp.chmod(0o777 & ~_umask())
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


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_plan(path: Path | str) -> Plan:
    """Parse a plan dir (data only), checking its format version and every field's type; no
    checkpoint needed."""
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
        pf = from_json(_PlanFile, data, "plan.json")
        module = parse_module(pf.ir)
        verify_module(module)
        plan = Plan(module, pf.checkpoint, pf.model.config, pf.target, pf.passes, pf.options, pf.stats,
                    pf.nanoforge_version)
        plan.check_facts()
        return plan
    except NanoForgeError as e:
        raise NanoForgeError(f"{f}: {e}") from None


def machine_mismatches(plan: Plan, device: str | None) -> list[str]:
    """What stops this machine from running the plan on `device` (None: the plan's own device)."""
    want = plan.target.device
    if device is not None and device != want:
        return [f"plan targets {want}, not {device} (recompile with --device {device})"]
    if want == "cpu":
        return []
    import torch

    if not torch.cuda.is_available():
        return [f"plan targets {want} but this machine has no CUDA device"]
    return []
