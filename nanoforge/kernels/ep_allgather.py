"""The `allgather` provider of the EP ops: moe_dispatch gathers every rank's tokens (with their
routing) to every rank of the EP group, each rank runs its own experts on all of them (slots naming
other ranks' experts are skipped), and moe_combine sums the partial outputs back with a
reduce-scatter. Same contract as torch_ref's all-to-all (rows, weights, global expert ids).

Why: the all-to-all needs per-pair row counts on the host every layer, so it syncs and cannot sit
in a CUDA graph. Here every shape is T_pad x ranks, with T_pad the most tokens any rank of the
step holds: the runtime knows it from the step header (BatchContext.ep_tokens; a decode graph is
captured with T_pad = its size), so nothing waits for the device. With top-k routing over few ranks
most tokens go to every rank anyway (top-8 over 2 ranks: almost all), so little traffic is added.
Without ep_tokens (warm-up, simulated ranks) the counts are gathered first, syncing once."""
from __future__ import annotations

import torch

from .torch_ref import _as_bytes, _ep_position, _from_bytes, _route, ep_step_tokens


def moe_dispatch(x, router, score_bias=None, *, ctx=None, group="ep", **attrs):
    weights, ids = _route(x, router, score_bias, **attrs)
    size = _ep_position(ctx, group)[1]
    if size == 1:
        return x, weights, ids, torch.tensor([x.shape[0], x.shape[0]])
    tokens, k = ids.shape
    pad = ep_step_tokens(ctx, group, tokens, x.device)
    rows = _as_bytes(x, weights, ids)
    if pad > tokens:  # padding rows: zeros, expert id -1 (nobody's)
        filler = _as_bytes(x.new_zeros(pad - tokens, x.shape[1]), weights.new_zeros(pad - tokens, k),
                           ids.new_full((pad - tokens, k), -1))
        rows = torch.cat([rows, filler])
    every = ctx.comm.all_gather(rows, group, 0)
    x_all, w_all, ids_all = _from_bytes(every, (x.dtype, x.shape[1]), (weights.dtype, k), (ids.dtype, k))
    return x_all, w_all, ids_all, torch.tensor([tokens, pad])


def moe_combine(y, plan, *, ctx=None, group="ep"):
    if _ep_position(ctx, group)[1] == 1:
        return y
    tokens, _ = plan.tolist()  # a host tensor: no sync
    return ctx.comm.reduce_scatter(y, group)[:tokens]
