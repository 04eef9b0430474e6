"""DeepEP (module deep_ep from tokenspeed-deepep==1.2.1.post20251110) adapter: the expert-parallel ops
moe_dispatch -> grouped_experts -> moe_combine (passes/shard_ep.py) on DeepEP's NVLink all-to-all.

Two modes, chosen per step from the most tokens any rank of the EP group holds (all ranks must pick
the same one: both are collectives):
  normal       get_dispatch_layout + dispatch / combine: any batch size (prefill, mixed batches).
               The received rows keep the torch_ref contract (x, weights, GLOBAL expert ids, -1 for
               ids not on this rank); grouped_experts weights its outputs, combine is a plain sum.
  low latency  low_latency_dispatch / low_latency_combine, bf16: at most `low_latency_max_tokens`
               tokens per rank (the plan_deep_ep pass writes that attr on moe_dispatch; 0 = off).
               dispatch returns x [local experts, M, hidden] (DeepEP's [L, cap * ranks, hidden] cut to
               the rows this step can fill) and rows per expert [L] in place of ids; DeepEP sends no
               weights there, so combine applies them (it weights).
The exchange plan is an opaque `Exchange` that generated code passes from dispatch to combine.

One deep_ep.Buffer per process and EP group, made at the first dispatch (a collective: every rank
reaches it at the same layer) and kept on the comm object (`comm._deep_ep`); `release(comm)` frees it.
Routing is torch_ref._route, so every provider picks the same experts. The mode comes from the most
tokens any rank holds: the step header's (BatchContext.ep_tokens), else an all-gather. Low-latency
mode is CUDA-graph safe (a captured decode step has ep_tokens = its size <= the cap, and the switch
out of normal mode runs as a replay hook on the comm); normal mode syncs with the host.
"""
from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ...errors import NanoForgeError
from .. import torch_ref
from . import DEEP_EP, import_library, version_error

deep_ep = import_library(DEEP_EP)


def _installed_version() -> str | None:
    """deep_ep has no __version__: the wheel's metadata says which build this is."""
    try:
        return importlib.metadata.version(DEEP_EP.wheel)
    except importlib.metadata.PackageNotFoundError:
        return None


if (_err := version_error(DEEP_EP, getattr(deep_ep, "__version__", None) or _installed_version())) is not None:
    raise _err

__all__ = ["Exchange", "BufferState", "buffer", "release", "moe_dispatch", "grouped_experts", "moe_combine"]


@dataclass
class Exchange:
    """What moe_combine needs from its moe_dispatch."""
    mode: str  # "normal" | "low_latency"
    tokens: int  # this rank's tokens (an idle rank sends one padding row that selects no expert)
    handle: Any  # DeepEP's communication handle
    topk_idx: torch.Tensor | None = None  # low latency: combine weights the experts' outputs itself
    topk_weights: torch.Tensor | None = None
    rows: int = 0  # low latency: rows per expert of DeepEP's layout (cap * ranks)


@dataclass
class BufferState:
    buffer: Any  # deep_ep.Buffer
    nvl_bytes: int
    rdma_bytes: int
    qps: int  # queue pairs per rank = local experts in low-latency mode; 0 = normal mode only
    mode: str = ""  # the last mode run: entering low latency after normal mode cleans its buffer first
    hooked: bool = False  # the switch to low latency is on the comm's replay hooks (CUDA graphs)


def _sizes(ranks: int, hidden: int, num_experts: int, low_latency_tokens: int) -> tuple[int, int, int]:
    """(NVLink bytes, RDMA bytes, queue pairs) a buffer needs, from DeepEP's own size hints (bf16)."""
    B = deep_ep.Buffer
    nvl = max(cfg.get_nvl_buffer_size_hint(hidden * 2, ranks)
              for cfg in (B.get_dispatch_config(ranks), B.get_combine_config(ranks)))
    if not low_latency_tokens:
        return nvl, 0, 0
    return nvl, B.get_low_latency_rdma_size_hint(low_latency_tokens, hidden, ranks, num_experts), num_experts // ranks


def buffer(comm: Any, group: str, hidden: int, num_experts: int, low_latency_tokens: int = 0) -> BufferState:
    """This process's buffer for `group`, made on first use. Later calls must fit it: a live buffer is
    never resized (NVSHMEM does not re-initialise), and one model has one hidden size and expert count."""
    states: dict[str, BufferState] = comm.__dict__.setdefault("_deep_ep", {})
    ranks = comm.group_position(group)[1]
    nvl, rdma, qps = _sizes(ranks, hidden, num_experts, low_latency_tokens)
    st = states.get(group)
    if st is None:
        buf = deep_ep.Buffer(comm.groups[group], nvl, rdma, low_latency_mode=qps > 0, num_qps_per_rank=max(qps, 1),
                             allow_nvlink_for_low_latency_mode=True, explicitly_destroy=True)
        st = states[group] = BufferState(buf, nvl, rdma, qps)
    elif nvl > st.nvl_bytes or rdma > st.rdma_bytes or (qps and qps != st.qps):
        raise NanoForgeError(f"deep_ep: the {group!r} buffer ({st.nvl_bytes} NVLink B, {st.rdma_bytes} RDMA B, "
                             f"{st.qps} QPs) cannot serve hidden {hidden}, {num_experts} experts, "
                             f"low-latency cap {low_latency_tokens}; make it for the largest layer first")
    return st


def _enter_low_latency(st: BufferState, cap: int, hidden: int, num_experts: int) -> None:
    if st.mode != "low_latency":  # normal mode leaves the low-latency buffer dirty
        st.buffer.clean_low_latency_buffer(cap, hidden, num_experts)
    st.mode = "low_latency"


def release(comm: Any) -> None:
    """Destroy this process's DeepEP buffers (collective: every rank of each group calls it)."""
    for st in comm.__dict__.pop("_deep_ep", {}).values():
        st.buffer.destroy()


def moe_dispatch(x, router, score_bias=None, *, ctx=None, group="ep", low_latency_max_tokens=0, **attrs):
    """torch_ref.moe_dispatch's contract on DeepEP (see the module doc for the low-latency layout)."""
    index, ranks = torch_ref._ep_position(ctx, group)
    if ranks == 1 or not hasattr(ctx.comm, "groups"):  # one rank, or simulated ones (--verify-each-pass):
        return torch_ref.moe_dispatch(x, router, score_bias, ctx=ctx, group=group, **attrs)  # no process group
    weights, ids = torch_ref._route(x, router, score_bias, **attrs)
    tokens, hidden = x.shape
    num_experts, k = attrs["num_experts"], ids.shape[1]
    if tokens == 0:  # an idle rank still takes part, with one row that selects no expert
        x, weights, ids = x.new_zeros(1, hidden), weights.new_zeros(1, k), ids.new_full((1, k), -1)
    x, weights, ids = x.contiguous(), weights.float().contiguous(), ids.to(deep_ep.topk_idx_t).contiguous()
    cap = int(low_latency_max_tokens)
    st = buffer(ctx.comm, group, hidden, num_experts, cap)
    most = torch_ref.ep_step_tokens(ctx, group, tokens, x.device) if cap else 0
    if cap and most <= cap:
        _enter_low_latency(st, cap, hidden, num_experts)
        if not st.hooked and hasattr(ctx.comm, "replay_hooks"):  # a graph replay runs no Python: switch before it
            ctx.comm.replay_hooks.append(lambda: _enter_low_latency(st, cap, hidden, num_experts))
            st.hooked = True
        recv_x, counts, handle, _, _ = st.buffer.low_latency_dispatch(x, ids, cap, num_experts, use_fp8=False)
        # an expert receives at most `most` rows from each rank, packed from row 0: the experts skip the rest
        return (recv_x[:, :max(most, 1) * ranks], weights.new_empty(0, k), counts,
                Exchange("low_latency", tokens, handle, ids, weights, cap * ranks))
    st.mode = "normal"
    per_rank, per_rdma_rank, per_expert, in_rank, _ = st.buffer.get_dispatch_layout(ids, num_experts)
    recv_x, recv_ids, recv_w, _, handle, _ = st.buffer.dispatch(
        x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma_rank, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert, topk_idx=ids, topk_weights=weights)
    first = index * (num_experts // ranks)  # DeepEP hands back local expert ids; the contract has global ones
    ids_in = torch.where(recv_ids >= 0, recv_ids.long() + first, torch.full_like(recv_ids.long(), -1))
    return recv_x, recv_w, ids_in, Exchange("normal", tokens, handle)


def grouped_experts(x, weights, ids, w_gate, w_up, w_down, *, ctx=None, group="ep", **fp8_scales):
    """Rows of the normal layout: the weighted SwiGLU over this rank's experts (Triton on CUDA). The
    low-latency layout x [L, M, H]: one batched SwiGLU per local expert, unweighted (combine weights);
    rows past each expert's count hold garbage that low_latency_combine never reads."""
    w_gate, w_up, w_down = torch_ref.expert_weights(x, w_gate, w_up, w_down, fp8_scales)  # FP8: widened for now
    if x.dim() == 3:
        h = F.silu(torch.bmm(x, w_gate.transpose(1, 2))) * torch.bmm(x, w_up.transpose(1, 2))
        return torch.bmm(h, w_down.transpose(1, 2))
    if x.is_cuda:  # the normal layout is the public one (global ids, -1 for none): the fused Triton kernels
        from ..triton.moe import grouped_experts as fused

        return fused(x, weights, ids, w_gate, w_up, w_down, ctx=ctx, group=group)
    return torch_ref.grouped_experts(x, weights, ids, w_gate, w_up, w_down, ctx=ctx, group=group)


def moe_combine(y, plan, *, ctx=None, group="ep"):
    """Each token's expert outputs summed back on its own rank: [tokens, hidden]."""
    if not isinstance(plan, Exchange):  # torch_ref dispatched (see moe_dispatch)
        return torch_ref.moe_combine(y, plan, ctx=ctx, group=group)
    buf = ctx.comm._deep_ep[group].buffer
    if plan.mode == "low_latency":
        full = y.new_empty(y.shape[0], plan.rows, y.shape[2])  # DeepEP's layout; rows past y never read
        full[:, :y.shape[1]] = y
        out = buf.low_latency_combine(full, plan.topk_idx, plan.topk_weights, plan.handle)[0]
    else:
        out = buf.combine(y.contiguous(), plan.handle)[0]
    return out[:plan.tokens]
