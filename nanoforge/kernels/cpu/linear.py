"""f32 linears on oneDNN with weights packed once at load (the CPU target's GEMMs).

`F.linear` on the CPU is MKL's sgemm, which on AMD cores runs its AVX2 code; oneDNN's packed-weight
matmul (`mkldnn._linear_pointwise`) runs AVX-512 where the core has it and skips the per-call
weight reorder: 1.2-1.8x on a SmolLM2-135M decode step's linears, 2x on its 49k-row lm_head (one
thread, AMD EPYC). It is also batch invariant (a row's output does not depend on how many rows came
with it), which MKL's small-M kernels are not. It rounds differently from MKL (f32, ~1e-6 relative:
another summation order), as any other GEMM would.

oneDNN pays ~10 us a call more than MKL, which small weights do not win back at decode sizes (a
tiny model's 128 x 256 projection at 32 rows: 18 us on MKL, 25 on oneDNN), so only weights of
PACK_MIN elements or more are packed. `prepare_params` packs, once, every such f32 weight that only
this provider's linear / lm_head read and puts the packed tensor in its place (no second copy); a
weight another op also reads (a tied embedding) keeps its dense tensor, with the packed one attached
to it. A smaller weight stays dense for MKL, as torch_ref runs it (`torch.mm` on its transposed
view, kept once: the GEMM F.linear calls, bit for bit, without its wrapping aten calls), with a
packed twin for batches of PACK_ROWS rows or more (prefill: 1.1-1.4x at 2k rows, tiny Llama, 2
threads).
Anything else (FP8 blocks, W8A8, other dtypes, biases on small weights) runs torch_ref's code.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from .. import torch_ref

PACK_MIN = 1 << 18  # elements: SmolLM2-135M's smallest projection (576 x 576) is 332k, a tiny model's 16k-131k
PACKED = "_nanoforge_onednn"  # attribute of a dense weight that other ops also read: its packed twin
PACK_ROWS = 512  # rows from which a small weight's packed twin runs (MKL is as fast or faster below)
SMALL = "_nanoforge_small"  # attribute of a weight under PACK_MIN: (its transposed view, its packed twin)
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") \
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def pack(weight: torch.Tensor) -> torch.Tensor:
    """The weight [out, in] in oneDNN's blocked layout (an opaque mkldnn tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())


def _packed(weight: torch.Tensor) -> torch.Tensor | None:
    return weight if weight.is_mkldnn else weight.__dict__.get(PACKED)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, **a) -> torch.Tensor:
    if weight.is_mkldnn:
        w = weight
    else:
        w = weight.__dict__.get(PACKED)
        if w is None:
            small = weight.__dict__.get(SMALL)
            if small is None or bias is not None or x.dim() != 2:
                return torch_ref.linear(x, weight, bias, **a)
            if x.shape[0] < PACK_ROWS:
                return torch.mm(x, small[0])
            w = small[1]
    if x.shape[0] == 0:  # an idle rank's empty batch: oneDNN wants at least one row
        return x.new_zeros(0, w.shape[0])
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


def lm_head(x: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, **a) -> torch.Tensor:
    if _packed(weight) is None and SMALL not in weight.__dict__:
        return torch_ref.lm_head(x, rows, weight, **a)
    return linear(x.index_select(0, rows), weight)  # index_select: x[rows]'s rows, without advanced indexing


def prepare_params(fn, params: dict[str, torch.Tensor]) -> None:
    """Pack the f32 weights of this provider's linear and lm_head nodes (fn: the IR function)."""
    if not ONEDNN:
        return
    uses: dict[str, list[bool]] = defaultdict(list)  # param -> for each use, whether it can read a packed weight
    for node in fn.nodes:
        ours = node.provider == "cpu" and node.op in ("linear", "lm_head") and "weight_scale_inv" not in node.params \
            and not node.attrs.get("act_quant")
        for slot, name in node.params.items():
            uses[name].append(ours and slot == "weight")
    for name, readers in uses.items():
        w = params.get(name)
        if w is None or not any(readers) or w.dtype != torch.float32 or w.dim() != 2 or w.device.type != "cpu":
            continue
        if w.numel() < PACK_MIN:
            w.__dict__[SMALL] = (w.t(), pack(w))
        elif all(readers):
            params[name] = pack(w)
        else:
            w.__dict__[PACKED] = pack(w)
