"""Programmatic dependent launch (PDL, sm_90+) for the Triton kernels of a decode step.

A decode step is hundreds of short kernels in a row (Qwen3-8B at batch 1: ~10 a layer, 36 layers);
in a CUDA graph each one still waits for the previous one to drain before its CTAs start. Launched
with PDL, a kernel's CTAs may start while its predecessor runs, once every CTA of the predecessor
has called griddepcontrol.launch_dependents; they then block in griddepcontrol.wait until the
predecessor has finished and its writes are visible. The next kernel's launch and ramp-up hide
behind this one's tail.

The rule every PDL kernel here keeps: `pdl_enter` (wait, then let the next kernel launch) runs first
in every program, before any load of an activation and before any store or early return. A kernel
that returned without waiting could finish before its own predecessor, and the kernel after it,
waiting only on it, would read stale inputs. Kernels launched without PDL (cuBLAS, torch ops) wait
for their predecessor as usual, so a chain may mix both. A kernel may read weights before the wait
(nothing in a step writes them): skinny_matmul does.

ENABLED is a knob (off until a GPU timing says otherwise: bench/knob_ab.py pdl).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

ENABLED = False

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _has_pdl(device_index: int) -> bool:
    return torch.version.hip is None and torch.cuda.get_device_capability(device_index)[0] >= 9  # sm_90+


def use_pdl(t: torch.Tensor) -> bool:
    """Whether kernels working on `t`'s device launch with PDL: the knob is on, the device is an sm_90+
    CUDA one and Triton is not interpreting."""
    return ENABLED and t.is_cuda and not _INTERPRET and _has_pdl(t.device.index or 0)


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """First thing in a PDL kernel: wait for the previous kernel's writes, then let the next one launch."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def pdl_args(t: torch.Tensor) -> dict:
    """A kernel launch's PDL arguments: the constexpr its body branches on and, when on, Triton's
    launch option (left out when off, so the launch is the plain one)."""
    return {"PDL": True, "launch_pdl": True} if use_pdl(t) else {"PDL": False}
