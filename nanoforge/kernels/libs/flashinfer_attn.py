"""FlashInfer (flashinfer-python==0.7.2.post1) adapters: RMSNorm for the provider table, and paged
GQA decode over our KV pool for tests and the Triton comparison (bench_flashinfer_decode in
bench/kernels/libs.py).

Why decode attention is not a provider op here: BatchDecodeWithPagedKVCacheWrapper.plan() copies
the page table to the host and schedules there (a host sync, meant once per step for all layers),
and the decode wrapper serves one query row per sequence. The op contract (torch_ref.attention) is
one call per layer over a mixed batch (prefill chunks + decode rows, GQA and MLA) that replays
inside CUDA graphs; that needs a per-step plan hook in the runtime first.

FlashInfer JIT-compiles every kernel on first use (rmsnorm ~46 s, decode ~14 s on H100; cached in
~/.cache/flashinfer): warm up before timing or capturing.
"""
from __future__ import annotations

import os

import torch

from .. import torch_ref
from . import FLASHINFER, import_library, version_error

if torch.cuda.is_available() and "FLASHINFER_CUDA_ARCH_LIST" not in os.environ:
    _maj, _min = torch.cuda.get_device_capability()  # JIT for this GPU only (sm90 needs the "a" suffix)
    os.environ["FLASHINFER_CUDA_ARCH_LIST"] = f"{_maj}.{_min}{'a' if _maj >= 9 else ''}"

flashinfer = import_library(FLASHINFER)
if (_err := version_error(FLASHINFER, getattr(flashinfer, "__version__", None))) is not None:
    raise _err
import flashinfer.norm  # noqa: E402

__all__ = ["rms_norm", "add_rms_norm", "add_rms_norm_", "PagedDecode", "paged_decode", "csr_pages"]

_NATIVE = (torch.bfloat16, torch.float16)


def _native(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in _NATIVE and x.numel() > 0


# ---------------------------------------------------------------------------------------------
# RMSNorm (provider ops rms_norm, add_rms_norm)
# ---------------------------------------------------------------------------------------------
def rms_norm(x, weight, eps, group=None, **_):
    """torch_ref.rms_norm via flashinfer.norm.rmsnorm (2-D rows, or 3-D [rows, groups, group] for
    per-head norms). fp32 or CPU inputs fall back to the torch reference (FlashInfer has bf16/fp16
    kernels only). Normalizes in fp32 and rounds once (the reference rounds before the weight)."""
    if not _native(x):
        return torch_ref.rms_norm(x, weight, eps, group)
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    w = weight if weight.dtype == x.dtype and weight.is_contiguous() else weight.to(x.dtype).contiguous()
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    if group is not None and group != n:
        src, dst = rows.view(rows.shape[0], n // group, group), out.view(rows.shape[0], n // group, group)
    else:
        src, dst = rows, out
    flashinfer.norm.rmsnorm(src, w, float(eps), out=dst)
    return out.view(x.shape)


def add_rms_norm(x, residual, weight, eps, **_):
    """(rms_norm(x + residual), x + residual). Not fused: fused_add_rmsnorm overwrites both inputs,
    and the op contract does not let a kernel clobber its inputs (see add_rms_norm_)."""
    s = x + residual
    return rms_norm(s, weight, eps), s


def add_rms_norm_(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """In-place fused variant for callers that own both buffers: residual += x, then
    x = rms_norm(residual); returns (x, residual). 2-D bf16/fp16 CUDA tensors only."""
    w = weight if weight.dtype == x.dtype else weight.to(x.dtype)
    flashinfer.norm.fused_add_rmsnorm(x, residual, w, float(eps))
    return x, residual


# ---------------------------------------------------------------------------------------------
# paged decode over our pool (k_cache / v_cache [num_blocks, block_size, kv_heads, head_dim], NHD)
# ---------------------------------------------------------------------------------------------
_WORKSPACE: dict[torch.device, torch.Tensor] = {}


def workspace(device: torch.device) -> torch.Tensor:
    """The 128 MiB split-K workspace FlashInfer recommends (zeroed before first use), one per device."""
    device = torch.device(device)
    if device not in _WORKSPACE:
        _WORKSPACE[device] = torch.zeros(128 << 20, dtype=torch.uint8, device=device)
    return _WORKSPACE[device]


def csr_pages(block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int):
    """Our padded block table -> FlashInfer's CSR page table (indptr, indices, last_page_len), all
    int32 on the table's device. Sequences need context_lens >= 1 (decode). Syncs (masked select)."""
    n = (context_lens.long() + block_size - 1) // block_size
    indptr = torch.zeros(n.numel() + 1, dtype=torch.int32, device=block_tables.device)
    indptr[1:] = torch.cumsum(n, 0)
    cols = torch.arange(block_tables.shape[1], device=block_tables.device)
    indices = block_tables[cols[None, :] < n[:, None]].to(torch.int32)
    last = (context_lens.long() - (n - 1) * block_size).to(torch.int32)
    return indptr, indices, last


class PagedDecode:
    """One BatchDecodeWithPagedKVCacheWrapper: plan once per step (host sync), run per layer.
    graph_batch=B pins the batch size and page buffers so `run` can be captured in a CUDA graph
    (re-plan outside the graph; the captured run reads the re-planned buffers)."""

    def __init__(self, device, *, use_tensor_cores: bool = False, graph_batch: int | None = None,
                 max_pages: int = 0):
        kw = {}
        if graph_batch is not None:
            i32 = dict(dtype=torch.int32, device=device)
            kw = dict(use_cuda_graph=True, paged_kv_indptr_buffer=torch.zeros(graph_batch + 1, **i32),
                      paged_kv_indices_buffer=torch.zeros(max(1, max_pages), **i32),
                      paged_kv_last_page_len_buffer=torch.ones(graph_batch, **i32))
        # backend "fa2" explicitly: "auto" may pick cudnn / cute-dsl, which need packages the GPU
        # machines do not have
        self.wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            workspace(device), "NHD", use_tensor_cores=use_tensor_cores, backend="fa2", **kw)

    def plan(self, block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int, *, heads: int,
             kv_heads: int, head_dim: int, q_dtype: torch.dtype, kv_dtype: torch.dtype, scale: float) -> None:
        indptr, indices, last = csr_pages(block_tables, context_lens, block_size)
        self.wrapper.plan(indptr, indices, last, heads, kv_heads, head_dim, block_size,
                          pos_encoding_mode="NONE", q_data_type=q_dtype, kv_data_type=kv_dtype,
                          sm_scale=float(scale))

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            out: torch.Tensor | None = None) -> torch.Tensor:
        """q [B, H, D] (one row per planned sequence) -> [B, H, D]."""
        return self.wrapper.run(q, (k_cache, v_cache), out=out)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float, *, use_tensor_cores: bool = False) -> torch.Tensor:
    """Decode attention, one query row per sequence: q [B, H, D] attends to positions
    0 .. context_lens[b]-1 of sequence b in the paged caches -> [B, H, D] (plan + run; syncs)."""
    B, H, D = q.shape
    assert context_lens.shape[0] == B and k_cache.shape[-1] == D == v_cache.shape[-1], "decode shapes"
    dec = PagedDecode(q.device, use_tensor_cores=use_tensor_cores)
    dec.plan(block_tables, context_lens, k_cache.shape[1], heads=H, kv_heads=k_cache.shape[2], head_dim=D,
             q_dtype=q.dtype, kv_dtype=k_cache.dtype, scale=scale)
    return dec.run(q, k_cache, v_cache)
