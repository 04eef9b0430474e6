"""Adapters over third-party kernel libraries (FlashInfer, DeepGEMM, FlashMLA, DeepEP), one module each
(and one per further use of a library: flash_mla_sparse.py and deep_gemm_indexer.py for DeepSeek sparse
attention, probed through providers._lib_probe with their own adapter).

Each module imports its library at import time and raises ImportError naming the installed and
the required version when the build is not the one checked on the GPU machines
(docs/gpu.md): newer builds need newer torch/NCCL symbols and fail in odd places.

This package itself imports no library: `probe` only looks the library up and imports the adapter
on demand, so provider selection never crashes (and stays cheap) where a library is absent.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
from dataclasses import dataclass

from ...facts import Target


@dataclass(frozen=True)
class Lib:
    module: str  # import name of the library
    wheel: str  # the PyPI distribution that works (gpu.md)
    version: str  # its pinned version
    adapter: str  # our adapter module
    archs: tuple[int, ...] | None = None  # exact SM majors*10+minor it runs on; None = min_sm and up
    min_sm: int = 80


FLASHINFER = Lib("flashinfer", "flashinfer-python", "0.7.2.post1", "nanoforge.kernels.libs.flashinfer_attn")
DEEP_GEMM = Lib("deep_gemm", "tokenspeed-deepgemm", "2.5.0.post20260424",
                "nanoforge.kernels.libs.deep_gemm_ops", archs=(90, 100))
FLASH_MLA = Lib("flash_mla", "sgl-flash-mla", "1.0.0", "nanoforge.kernels.libs.flash_mla_decode", archs=(90,))
DEEP_EP = Lib("deep_ep", "tokenspeed-deepep", "1.2.1.post20251110", "nanoforge.kernels.libs.deep_ep_ops",
              archs=(90,))
LIBS = {lib.module: lib for lib in (FLASHINFER, DEEP_GEMM, FLASH_MLA, DEEP_EP)}


def version_error(lib: Lib, installed: str | None) -> ImportError | None:
    """The ImportError to raise when `installed` is not the pinned version, else None."""
    if installed == lib.version:
        return None
    return ImportError(f"{lib.module}: installed version {installed or 'unknown'}, NanoForge needs "
                       f"{lib.wheel}=={lib.version} (other builds are untested on the GPU machines)")


def import_library(lib: Lib):
    """Import the library, turning any failure into an ImportError that says which wheel to use."""
    try:
        return importlib.import_module(lib.module)
    except Exception as exc:  # noqa: BLE001 - e.g. deep_gemm asserts on a missing CUDA home
        raise ImportError(f"{lib.module} failed to import ({type(exc).__name__}: {exc}); "
                          f"NanoForge needs {lib.wheel}=={lib.version}") from exc


@functools.lru_cache(maxsize=None)
def import_error(adapter: str) -> str | None:
    """None if the adapter module imports, else why not (cached: probes run once per node)."""
    try:
        importlib.import_module(adapter)
    except Exception as exc:  # noqa: BLE001 - a probe must never crash
        return str(exc) if isinstance(exc, ImportError) else f"{adapter} failed to import: {type(exc).__name__}: {exc}"
    return None


def probe(lib: Lib, target: Target) -> str | None:
    """None if `lib` can run on `target`, else the reason: cheap checks first, the import last."""
    if target.device != "cuda":
        return f"{lib.module} needs a CUDA target (compile with --device cuda)"
    sm = target.sm or None
    want = "/".join(f"sm{a}" for a in lib.archs) if lib.archs else f"sm{lib.min_sm}+"
    if sm is None:
        return f"{lib.module} needs {want}; no GPU was visible at compile time to check the target"
    if (lib.archs is not None and sm not in lib.archs) or sm < lib.min_sm:
        return f"{lib.module} needs {want}; the target is sm{sm}"
    try:
        missing = importlib.util.find_spec(lib.module) is None
    except (ImportError, ValueError):
        missing = True
    if missing:
        return f"{lib.module} is not installed (pip install --no-deps {lib.wheel}=={lib.version})"
    return import_error(lib.adapter)
