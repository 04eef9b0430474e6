"""Torch reference of the hybrid linear-attention ops (ir/ops.py: offset_rms_norm, gated_qk_norm_rope,
sigmoid_mul, gdn), re-exported by torch_ref. Numerics follow transformers' Qwen3.5-MoE
(modeling_qwen3_5_moe.py): f32 norms, the gated delta rule in f32 (its chunked form for several
tokens of a sequence, the recurrent step for one), the conv in the activations' dtype.

A gdn layer's state per sequence is two rows of ctx.state[layer]: the last conv_kernel - 1 inputs
of the causal conv (f32 copies of activations, so exact) and the delta rule's f32 matrix per value
head [k_head_dim, v_head_dim]. A sequence whose rows start at position 0 starts from zeros, so a
preempted or reused slot never leaks; one that continues reads its slot, and without a state pool
that is an error, never a silent restart. A speculative verify sequence (ctx.state_history[i] >= 0: its
token and d drafts) runs one recurrent step a row, as decode steps would, and leaves the state after each
of its first d rows in the pool rows state_history[i] + 0 .. d - 1 and the state after its last row in
its slot; the runtime copies the accepted row's state into the slot once it knows which one that is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import NanoForgeError
from .rope_math import rope_frequencies_on

CHUNK = 64  # transformers' torch_chunk_gated_delta_rule default: the same sums in the same order


def offset_rms_norm(x, weight, eps, group=None, **_):
    shape = x.shape
    if group is not None:
        x = x.reshape(*shape[:-1], shape[-1] // group, group)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + weight.float())).to(x.dtype).reshape(shape)


def _rotate_first(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Neox rotation of the first rotary_dim (= cos width) dims of each head; the rest pass through."""
    t = x.reshape(x.shape[0], heads, head_dim)
    r, keep = t[..., :cos.shape[-1]], t[..., cos.shape[-1]:]
    half = r.shape[-1] // 2
    rotated = torch.cat([-r[..., half:], r[..., :half]], dim=-1)
    r = r * cos[:, None, :] + rotated * sin[:, None, :]
    return torch.cat([r, keep], dim=-1).reshape(x.shape)


def gated_qk_norm_rope(q_gate, k, positions, q_norm, k_norm, eps, *, heads, kv_heads, q_head_dim, k_head_dim,
                       rotary_dim, theta, scaling=None, **_):
    t, d = q_gate.shape[0], q_head_dim
    halves = q_gate.reshape(t, heads, 2 * d)
    q, gate = halves[..., :d].reshape(t, heads * d), halves[..., d:].reshape(t, heads * d)
    q = offset_rms_norm(q, q_norm, eps, group=d)
    k = offset_rms_norm(k, k_norm, eps, group=k_head_dim)
    inv_freq, attn_factor = rope_frequencies_on(rotary_dim, theta, scaling, q.device)  # no copy per call: graphs
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = (emb.cos() * attn_factor).to(q.dtype), (emb.sin() * attn_factor).to(q.dtype)
    return _rotate_first(q, cos, sin, heads, d), _rotate_first(k, cos, sin, kv_heads, k_head_dim), gate


def sigmoid_mul(x, gate, **_):
    return x * torch.sigmoid(gate)


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + 1e-6)


def _prepare(q, k, v, g, beta):
    """[n, H, *] -> f32 [H, n, *], q and k L2-normalised, q scaled by k_head_dim^-0.5."""
    q, k, v, g, beta = (t.transpose(0, 1).float().contiguous() for t in (q, k, v, g, beta))
    return _l2norm(q) * q.shape[-1] ** -0.5, _l2norm(k), v, g, beta


def chunk_gated_delta_rule(q, k, v, g, beta, state: torch.Tensor | None, chunk: int = CHUNK):
    """Outputs f32 [n, H, Dv] and the final state f32 [H, Dk, Dv] of one sequence (q, k [n, H, Dk],
    v [n, H, Dv], g (log decay) and beta [n, H]), chunk by chunk with the UT transform."""
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    h, n, dk = k.shape
    pad = (chunk - n % chunk) % chunk
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    beta, g = (F.pad(x, (0, pad)) for x in (beta, g))
    v_beta, k_beta = v * beta[..., None], k * beta[..., None]
    q, k, k_beta, v_beta = (x.reshape(h, -1, chunk, x.shape[-1]) for x in (q, k, k_beta, v_beta))
    cum = g.reshape(h, -1, chunk).cumsum(dim=-1)
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(upper, float("-inf")).exp()
    ut = (k_beta @ k.transpose(-1, -2)) * decay
    intra = (q @ k.transpose(-1, -2)) * decay
    new_values = torch.linalg.solve_triangular(ut, v_beta, upper=False, unitriangular=True)
    k_cumdecay = torch.linalg.solve_triangular(ut, k_beta * cum.exp()[..., None], upper=False, unitriangular=True)
    s = torch.zeros(h, dk, v.shape[-1], device=q.device) if state is None else state.float()
    out = torch.zeros_like(new_values)
    q = q * cum.exp()[..., None]
    k = k * (cum[..., -1:] - cum).exp()[..., None]
    chunk_decay = cum[..., -1].exp()[..., None, None]
    for i in range(q.shape[1]):
        v_new = new_values[:, i] - k_cumdecay[:, i] @ s
        out[:, i] = q[:, i] @ s + intra[:, i] @ v_new
        s = s * chunk_decay[:, i] + k[:, i].transpose(-1, -2) @ v_new
    return out.reshape(h, -1, v.shape[-1])[:, :n].transpose(0, 1), s


def recurrent_gated_delta_rule(q, k, v, g, beta, state: torch.Tensor | None):
    """chunk_gated_delta_rule one token at a time (transformers' decode step)."""
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    h, n, dk = k.shape
    s = torch.zeros(h, dk, v.shape[-1], device=q.device) if state is None else state.float()
    out = torch.zeros_like(v)
    for t in range(n):
        s = s * g[:, t].exp()[:, None, None]
        delta = (v[:, t] - (s * k[:, t, :, None]).sum(dim=-2)) * beta[:, t, None]
        s = s + k[:, t, :, None] * delta[:, None, :]
        out[:, t] = (s * q[:, t, :, None]).sum(dim=-2)
    return out.transpose(0, 1), s


def causal_conv(x: torch.Tensor, window: torch.Tensor | None,
                weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """silu(depthwise causal conv) of one sequence's rows x [n, C] after its previous inputs `window`
    [C, K-1] (None: zeros); returns the output [n, C] and the new window."""
    c, kern = weight.shape
    prev = x.new_zeros(c, kern - 1) if window is None else window.to(x.dtype)
    full = torch.cat([prev, x.t()], dim=1)
    y = F.conv1d(full[None].to(weight.dtype), weight[:, None, :], groups=c)[0]
    return F.silu(y).t().to(x.dtype), full[:, full.shape[1] - (kern - 1):]


def gated_norm(core: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = core.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return ((weight * h.to(core.dtype)) * F.silu(z.float())).to(core.dtype)


def gdn_sequence(qkv, z, b, a, params: dict, attrs: dict, state: tuple | None):
    """One sequence's rows through the Gated DeltaNet core; returns (output [n, Hv*Dv], new conv window,
    new recurrent state). `state`: (window, recurrent state) to continue from, or None."""
    hk, hv, dk, dv = (attrs[n] for n in ("k_heads", "v_heads", "k_head_dim", "v_head_dim"))
    n = qkv.shape[0]
    x, window = causal_conv(qkv, None if state is None else state[0], params["conv"][:, 0, :])
    q, k, v = torch.split(x, [hk * dk, hk * dk, hv * dv], dim=-1)
    q, k, v = q.reshape(n, hk, dk), k.reshape(n, hk, dk), v.reshape(n, hv, dv)
    beta = b.sigmoid()
    g = -params["A_log"].float().exp() * F.softplus(a.float() + params["dt_bias"])
    if hv > hk:
        q, k = q.repeat_interleave(hv // hk, dim=1), k.repeat_interleave(hv // hk, dim=1)
    rule = chunk_gated_delta_rule if n > 1 else recurrent_gated_delta_rule
    core, s = rule(q, k, v, g, beta, None if state is None else state[1])
    out = gated_norm(core.to(qkv.dtype).reshape(-1, dv), z.reshape(-1, dv), params["norm"], attrs["eps"])
    return out.reshape(n, hv * dv), window, s


def run_sequences(inputs: tuple, params: dict, attrs: dict, ctx, layer: int, which: list[int],
                  out: torch.Tensor) -> None:
    """The rows of sequences `which` of the flat batch through gdn_sequence into `out`, each sequence
    from its state row (zeros at position 0) and back to it."""
    pool = ctx.state[layer] if ctx.state else None
    seqs, history = ctx.seqs, ctx.state_history
    for i in which:
        s = seqs[i]
        rows = slice(s.q_start, s.q_start + s.q_len)
        if history and history[i] >= 0:
            out[rows] = verify_rows(tuple(t[rows] for t in inputs), params, attrs, pool, ctx.state_slot_list[i],
                                    history[i])
            continue
        fresh = s.ctx_len == s.q_len
        if pool is None and not fresh:
            raise NanoForgeError(f"gdn layer {layer}: a sequence continues at position {s.ctx_len - s.q_len} but "
                                 "the batch context has no per-sequence state pool")
        slot = ctx.state_slot_list[i] if pool is not None else -1
        prev = None if fresh else (pool[0][slot], pool[1][slot])
        y, window, rec = gdn_sequence(*(t[rows] for t in inputs), params, attrs, prev)
        if pool is not None:
            pool[0][slot] = window.to(pool[0].dtype)
            pool[1][slot] = rec.to(pool[1].dtype)
        out[rows] = y


def gdn(qkv, z, b, a, *, conv, dt_bias, A_log, norm, ctx, layer, **attrs):
    """Every sequence of the flat batch in turn: load its state (or zeros at position 0), run, store."""
    params = {"conv": conv, "dt_bias": dt_bias, "A_log": A_log, "norm": norm}
    out = qkv.new_empty(qkv.shape[0], attrs["v_heads"] * attrs["v_head_dim"])
    run_sequences((qkv, z, b, a), params, attrs, ctx, layer, list(range(len(ctx.seqs))), out)
    return out


def verify_rows(inputs: tuple, params: dict, attrs: dict, pool: tuple, slot: int, first: int) -> torch.Tensor:
    """A verify step's rows of one sequence (never fresh), a recurrent step each from its slot's state:
    the state after row j < n - 1 goes to pool row first + j, after the last row to the slot."""
    n, out, src = inputs[0].shape[0], [], slot
    for j in range(n):
        y, window, rec = gdn_sequence(*(t[j:j + 1] for t in inputs), params, attrs, (pool[0][src], pool[1][src]))
        dst = first + j if j < n - 1 else slot
        pool[0][dst] = window.to(pool[0].dtype)
        pool[1][dst] = rec.to(pool[1].dtype)
        out.append(y)
        src = dst
    return torch.cat(out)
