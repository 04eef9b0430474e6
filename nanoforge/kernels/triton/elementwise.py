"""Fused elementwise Triton kernels: embed, rms_norm (plain and per-group), add_rms_norm,
silu_mul, rope and qk_norm_rope.

Each wrapper has the signature of its op in `torch_ref` (positional inputs, then params and attrs
as keywords) and returns new tensors of the reference's dtype. Math is fp32 inside and follows
the reference's rounding points (the normed value is rounded to the input dtype before the weight
multiplies it; silu is rounded before `* up`; cos/sin are rounded to the activation dtype).

Layout: every kernel sees its operand as rows of a 2D tensor whose last dim is contiguous; the row
stride is an argument, so column slices of a fused projection (q/k out of qkv, gate/up out of
gate_up) are read in place. Per-group norms and rope treat each (token, head) as one "virtual row"
of width head_dim; a program owns BLOCK_R such rows (several narrow rows per program, one wide
row per program), with widths as constexprs so that masked loads stay 16-byte vectors.

CUDA graphs: no host sync, no data-dependent shape; launch parameters depend only on shapes. The
rope frequencies live on the device, cached per (rotary_dim, theta, scaling, device): the first
eager call (or `rope_cache`) fills the cache, so a captured call copies nothing host -> device.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ..rope_math import rope_frequencies
from .host_math import cdiv
from .host_math import pow2 as _pow2
from .pdl import pdl_args, pdl_enter

_TILE = 4096  # target elements per program (8 KiB of bf16 per operand)
_SAME_MIN = 4096  # rope: one-token programs (shared cos/sin) only if they hold this many elements


# ---------------------------------------------------------------------------------------------------
# host-side helpers (shape arithmetic only; nothing here touches device memory)

@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # interpreter: fewer, larger programs are faster
    return torch.cuda.get_device_properties(device).multi_processor_count


def _rows_per_program(n_rows: int, block_c: int, device: torch.device) -> int:
    """Rows per program: fill a ~_TILE-element tile, but keep >= 2 programs per SM when the
    batch is small (decode) so that every SM has work."""
    br = max(1, min(_TILE // block_c, _pow2(n_rows)))
    floor = 2 * _sm_count(device)
    while br > 1 and cdiv(n_rows, br) < floor:
        br //= 2
    return br


def _fast_trig(device: torch.device) -> bool:
    """PTX sin/cos.approx: NVIDIA GPUs only, never in the interpreter."""
    return device.type == "cuda" and torch.version.hip is None and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


def _num_warps(elems: int, elem_bytes: int) -> int:
    """About 32 bytes of each operand per thread (two 16-byte vectors), 1..16 warps."""
    return max(1, min(16, _pow2(elems * elem_bytes // (32 * 32))))


def _as_rows(x: torch.Tensor, width: int) -> tuple[torch.Tensor, int]:
    """x as [n, width] with unit column stride (a view when possible), and its row stride."""
    if x.dim() == 2 and x.shape[1] == width and (x.stride(1) == 1 or width == 1):
        return x, x.stride(0)
    x2 = x.reshape(-1, width)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2, x2.stride(0)


_INV_FREQ: dict[tuple, tuple[torch.Tensor, float]] = {}


def rope_cache(rotary_dim: int, theta: float, scaling: dict | None, device) -> tuple[torch.Tensor, float]:
    """(inv_freq f32[rotary_dim/2] on `device`, attention_factor), built once per key. Call it (or
    run any rope op eagerly once) before capturing a CUDA graph."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    skey = tuple(sorted((k, repr(v)) for k, v in (scaling or {}).items()))
    key = (int(rotary_dim), float(theta), skey, device)
    hit = _INV_FREQ.get(key)
    if hit is None:
        inv, factor = rope_frequencies(rotary_dim, theta, scaling)
        hit = _INV_FREQ[key] = (inv.to(device=device, dtype=torch.float32).contiguous(), float(factor))
    return hit


# ---------------------------------------------------------------------------------------------------
# kernels

@triton.jit(do_not_specialize=["n_tok"])
def _embed_kernel(tok_ptr, w_ptr, out_ptr, n_tok, stride_w,
                  H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < n_tok
    mask = rmask[:, None] & (cols < H)[None, :]
    ids = tl.load(tok_ptr + rows, mask=rmask, other=0).to(tl.int64)
    x = tl.load(w_ptr + ids[:, None] * stride_w + cols[None, :], mask=mask)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * H + cols[None, :], x.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows"])
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr, n_rows, stride_x, stride_r, eps,
                     NG: tl.constexpr, G: tl.constexpr, HAS_RES: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    # virtual row v = token * NG + group; each is G wide
    pdl_enter(PDL)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < n_rows
    cmask = cols < G
    mask = rmask[:, None] & cmask[None, :]
    tok = (rows // NG).to(tl.int64)
    col_off = ((rows % NG) * G)[:, None] + cols[None, :]
    out_off = rows.to(tl.int64)[:, None] * G + cols[None, :]
    x = tl.load(x_ptr + tok[:, None] * stride_x + col_off, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(r_ptr + tok[:, None] * stride_r + col_off, mask=mask, other=0.0)
        s = (x.to(tl.float32) + r.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + out_off, s, mask=mask)
        h = s.to(tl.float32)
        in_ty: tl.constexpr = sum_ptr.dtype.element_ty
    else:
        h = x.to(tl.float32)
        in_ty: tl.constexpr = x_ptr.dtype.element_ty
    rstd = tl.rsqrt(tl.sum(h * h, axis=1) / G + eps)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    y = (h * rstd[:, None]).to(in_ty).to(tl.float32) * w[None, :]
    tl.store(out_ptr + out_off, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows"])
def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, n_rows, stride_g, stride_u,
                     N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < n_rows)[:, None] & (cols < N)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    g = tl.load(g_ptr + r64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + r64 * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    a = (g / (1.0 + tl.exp(-g))).to(g_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + r64 * N + cols[None, :], (a * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cos_sin(angle, FAST: tl.constexpr):
    """cos and sin of fp32 angles of any size. Reduce to [-pi, pi] first (Cody-Waite, 2*pi split
    in three fp32 constants, the first with 8 significant bits so k * it is exact); then on NVIDIA
    GPUs use the SFU's cos/sin.approx.f32 (abs. error ~1e-6 on [-pi, pi]; libdevice's accurate
    cosf/sinf made qk_norm_rope compute-bound), elsewhere (interpreter) tl.cos / tl.sin."""
    k = tl.floor(angle * 0.15915494309189535 + 0.5)
    r = tl.fma(k, -6.28125, angle)
    r = tl.fma(k, -0.0019353071693331003, r)
    r = tl.fma(k, -1.0253131677018246e-11, r)
    if FAST:
        c = tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=f,f", [r], dtype=tl.float32, is_pure=True, pack=1)
        s = tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=f,f", [r], dtype=tl.float32, is_pure=True, pack=1)
    else:
        c = tl.cos(r)
        s = tl.sin(r)
    return c, s


@triton.jit
def _qk_section(x_ptr, o_ptr, w_ptr, pos_ptr, inv_ptr, cdt_ptr, pid, n_rows, stride_x, eps, attn,
                NH: tl.constexpr, D: tl.constexpr, ROT: tl.constexpr, BLOCK_R: tl.constexpr,
                SAME_TOKEN: tl.constexpr, BLOCK_KEEP: tl.constexpr, BLOCK_HALF: tl.constexpr,
                NORM: tl.constexpr, INTERLEAVED: tl.constexpr, FAST_TRIG: tl.constexpr,
                pool=None, STORE: tl.constexpr = False, BLOCK_DV: tl.constexpr = 1):
    """(optional per-head RMSNorm) + rope of the last ROT dims, for BLOCK_R (token, head) rows.
    STORE (k rows): each row also to its pool slot, and v's row of the same (token, head) beside it;
    `pool` = (slot_ptr, kc_ptr, vc_ptr, v_ptr, stride_v, K pool strides x4, V pool strides x4, BS)."""
    KEEP: tl.constexpr = D - ROT
    HALF: tl.constexpr = ROT // 2
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    tok = rows // NH
    in_base = tok.to(tl.int64)[:, None] * stride_x + ((rows % NH) * D)[:, None]
    out_base = rows.to(tl.int64)[:, None] * D
    if STORE:
        pool_k, smask = _pool_rows(pool, tok, rows % NH, rmask, D, BLOCK_DV)
    x_ty: tl.constexpr = x_ptr.dtype.element_ty
    o_ty: tl.constexpr = o_ptr.dtype.element_ty

    hc = tl.arange(0, BLOCK_HALF)
    hmask = rmask[:, None] & (hc < HALF)[None, :]
    if INTERLEAVED:  # pairs (2j, 2j+1) -> halves (j, j + HALF) in the output
        c1 = KEEP + 2 * hc
        c2 = c1 + 1
    else:
        c1 = KEEP + hc
        c2 = c1 + HALF
    x1 = tl.load(x_ptr + in_base + c1[None, :], mask=hmask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + in_base + c2[None, :], mask=hmask, other=0.0).to(tl.float32)
    if KEEP > 0:
        kc = tl.arange(0, BLOCK_KEEP)
        kmask = rmask[:, None] & (kc < KEEP)[None, :]
        xk = tl.load(x_ptr + in_base + kc[None, :], mask=kmask, other=0.0).to(tl.float32)

    if NORM:  # reference: (weight * (x * rstd).to(x.dtype)), rounded to the normed dtype
        ss = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)
        if KEEP > 0:
            ss += tl.sum(xk * xk, axis=1)
        rstd = tl.rsqrt(ss / D + eps)[:, None]
        hm = hc < HALF
        w1 = tl.load(w_ptr + c1, mask=hm, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + c2, mask=hm, other=0.0).to(tl.float32)[None, :]
        x1 = ((x1 * rstd).to(x_ty).to(tl.float32) * w1).to(o_ty).to(tl.float32)
        x2 = ((x2 * rstd).to(x_ty).to(tl.float32) * w2).to(o_ty).to(tl.float32)
        if KEEP > 0:
            wk = tl.load(w_ptr + kc, mask=kc < KEEP, other=0.0).to(tl.float32)[None, :]
            xk = (xk * rstd).to(x_ty).to(tl.float32) * wk

    if KEEP > 0:
        tl.store(o_ptr + out_base + kc[None, :], xk.to(o_ty), mask=kmask)
        if STORE:
            tl.store(pool_k + kc[None, :] * pool[8], xk.to(o_ty).to(pool[1].dtype.element_ty), mask=kmask & smask)

    # cos/sin(pos * inv_freq) * attention_factor, rounded to the activation dtype
    inv = tl.load(inv_ptr + hc, mask=hc < HALF, other=0.0)
    c_ty: tl.constexpr = cdt_ptr.dtype.element_ty
    if SAME_TOKEN:  # every row of this program is one token: one cos/sin vector for all heads
        p = tl.load(pos_ptr + (pid * BLOCK_R) // NH).to(tl.float32)
        cos, sin = _cos_sin(p * inv, FAST_TRIG)
        cos = (cos * attn).to(c_ty).to(tl.float32)[None, :]
        sin = (sin * attn).to(c_ty).to(tl.float32)[None, :]
    else:
        p = tl.load(pos_ptr + tok, mask=rmask, other=0).to(tl.float32)
        cos, sin = _cos_sin(p[:, None] * inv[None, :], FAST_TRIG)
        cos = (cos * attn).to(c_ty).to(tl.float32)
        sin = (sin * attn).to(c_ty).to(tl.float32)
    hcol = KEEP + hc[None, :]
    y1 = (x1 * cos - x2 * sin).to(o_ty)
    y2 = (x2 * cos + x1 * sin).to(o_ty)
    tl.store(o_ptr + out_base + hcol, y1, mask=hmask)
    tl.store(o_ptr + out_base + hcol + HALF, y2, mask=hmask)
    if STORE:  # the pool gets the output's values (rounded to o_ty first, as attention's store sees them)
        k_ty: tl.constexpr = pool[1].dtype.element_ty
        tl.store(pool_k + hcol * pool[8], y1.to(k_ty), mask=hmask & smask)
        tl.store(pool_k + (hcol + HALF) * pool[8], y2.to(k_ty), mask=hmask & smask)


@triton.jit
def _pool_rows(pool, tok, head, rmask, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """The K pool row addresses [BLOCK_R, 1] of (token, kv head) rows, with the rows whose slot is
    not -1 (CUDA-graph padding); copies those rows of v into the V pool on the way."""
    slot = tl.load(pool[0] + tok, mask=rmask, other=-1).to(tl.int64)
    blk = slot // pool[13]
    off = slot % pool[13]
    smask = (rmask & (slot >= 0))[:, None]
    h = head.to(tl.int64)
    pool_k = pool[1] + (blk * pool[5] + off * pool[6] + h * pool[7])[:, None]
    pool_v = pool[2] + (blk * pool[9] + off * pool[10] + h * pool[11])[:, None]
    dv = tl.arange(0, BLOCK_D)
    vmask = smask & (dv < D)[None, :]
    v = tl.load(pool[3] + tok.to(tl.int64)[:, None] * pool[4] + (h * D)[:, None] + dv[None, :], mask=vmask)
    tl.store(pool_v + dv[None, :] * pool[12], v.to(pool[2].dtype.element_ty), mask=vmask)
    return pool_k, smask


@triton.jit(do_not_specialize=["n_tok"])
def _qk_rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, qw_ptr, kw_ptr, pos_ptr, inv_ptr,
                    n_tok, stride_q, stride_k, eps, attn,
                    HQ: tl.constexpr, HK: tl.constexpr, DQ: tl.constexpr, DK: tl.constexpr,
                    ROT: tl.constexpr, BLOCK_HALF: tl.constexpr,
                    BR_Q: tl.constexpr, BR_K: tl.constexpr, SAME_Q: tl.constexpr, SAME_K: tl.constexpr,
                    BKEEP_Q: tl.constexpr, BKEEP_K: tl.constexpr,
                    NORM: tl.constexpr, INTERLEAVED: tl.constexpr, FAST_TRIG: tl.constexpr,
                    slot_ptr=None, kc_ptr=None, vc_ptr=None, v_ptr=None, stride_v=0,
                    s_kcb=0, s_kco=0, s_kch=0, s_kcd=0, s_vcb=0, s_vco=0, s_vch=0, s_vcd=0, BS=1,
                    STORE: tl.constexpr = False, BLOCK_DV: tl.constexpr = 1, PDL: tl.constexpr = False):
    """One launch for q and k: the first programs take q's (token, head) rows, the rest k's (STORE:
    and write k and v to the paged pool at slot_ptr's slots, as store_kv does)."""
    pdl_enter(PDL)
    pid = tl.program_id(0)
    nq = tl.cdiv(n_tok * HQ, BR_Q)
    if pid < nq:
        _qk_section(q_ptr, qo_ptr, qw_ptr, pos_ptr, inv_ptr, qo_ptr, pid, n_tok * HQ, stride_q, eps, attn,
                    HQ, DQ, ROT, BR_Q, SAME_Q, BKEEP_Q, BLOCK_HALF, NORM, INTERLEAVED, FAST_TRIG)
    elif STORE:
        pool = (slot_ptr, kc_ptr, vc_ptr, v_ptr, stride_v, s_kcb, s_kco, s_kch, s_kcd, s_vcb, s_vco, s_vch, s_vcd, BS)
        _qk_section(k_ptr, ko_ptr, kw_ptr, pos_ptr, inv_ptr, qo_ptr, pid - nq, n_tok * HK, stride_k, eps, attn,
                    HK, DK, ROT, BR_K, SAME_K, BKEEP_K, BLOCK_HALF, NORM, INTERLEAVED, FAST_TRIG, pool, True, BLOCK_DV)
    else:
        _qk_section(k_ptr, ko_ptr, kw_ptr, pos_ptr, inv_ptr, qo_ptr, pid - nq, n_tok * HK, stride_k, eps, attn,
                    HK, DK, ROT, BR_K, SAME_K, BKEEP_K, BLOCK_HALF, NORM, INTERLEAVED, FAST_TRIG)


# ---------------------------------------------------------------------------------------------------
# wrappers (reference signatures)

def embed(tokens, weight, vocab_parallel=None, ctx=None, **_):
    if vocab_parallel is not None:  # this rank's share of the vocab: other ids give zero rows
        from ..torch_ref import local_token_ids

        ids, keep = local_token_ids(tokens, weight.shape[0], ctx, vocab_parallel)
        return embed(ids, weight) * keep[..., None].to(weight.dtype)
    ids = tokens.reshape(-1)
    if ids.stride(0) != 1:
        ids = ids.contiguous()
    n, h = ids.shape[0], weight.shape[1]
    out = torch.empty(n, h, dtype=weight.dtype, device=weight.device)
    if n:
        w, sw = _as_rows(weight, h)
        block_c = min(_pow2(h), _TILE)
        br = _rows_per_program(n, block_c, weight.device)
        _embed_kernel[(cdiv(n, br), cdiv(h, block_c))](
            ids, w, out, n, sw, H=h, BLOCK_R=br, BLOCK_C=block_c, **pdl_args(out),
            num_warps=_num_warps(br * block_c, weight.element_size()))
    return out.reshape(*tokens.shape, h)


def _norm(x, residual, weight, eps, group):
    width = x.shape[-1]
    g = int(group) if group is not None else width
    if width % g:
        raise ValueError(f"rms_norm: width {width} is not a multiple of group {g}")
    xr, sx = _as_rows(x, width)
    n = xr.shape[0]
    if residual is not None:
        rr, sr = _as_rows(residual, width)
        sum_dtype = torch.promote_types(x.dtype, residual.dtype)
        s = torch.empty(n, width, dtype=sum_dtype, device=x.device)
    else:
        rr, sr, sum_dtype, s = xr, 0, x.dtype, None
    out = torch.empty(n, width, dtype=torch.promote_types(sum_dtype, weight.dtype), device=x.device)
    if n:
        ng = width // g
        block_c = _pow2(g)
        br = _rows_per_program(n * ng, block_c, x.device)
        _rms_norm_kernel[(cdiv(n * ng, br),)](
            xr, rr, weight, out, s if s is not None else out, n * ng, sx, sr, float(eps),
            NG=ng, G=g, HAS_RES=residual is not None, BLOCK_R=br, BLOCK_C=block_c, **pdl_args(out),
            num_warps=_num_warps(br * block_c, x.element_size()))
    shape = x.shape
    return out.reshape(shape), (s.reshape(shape) if s is not None else None)


def rms_norm(x, weight, eps, group=None, **_):
    return _norm(x, None, weight, eps, group)[0]


def add_rms_norm(x, residual, weight, eps, **_):
    """(rms_norm(x + residual), x + residual) in one pass over x and residual."""
    return _norm(x, residual, weight, eps, None)


def silu_mul(gate, up, **_):
    n_cols = gate.shape[-1]
    g, sg = _as_rows(gate, n_cols)
    u, su = _as_rows(up, n_cols)
    n = g.shape[0]
    out = torch.empty(n, n_cols, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    if n:
        block_c = min(_pow2(n_cols), _TILE)
        br = _rows_per_program(n * cdiv(n_cols, block_c), block_c, gate.device)
        br = min(br, _pow2(n))
        _silu_mul_kernel[(cdiv(n, br), cdiv(n_cols, block_c))](
            g, u, out, n, sg, su, N=n_cols, BLOCK_R=br, BLOCK_C=block_c, **pdl_args(out),
            num_warps=_num_warps(br * block_c, gate.element_size()))
    return out.reshape(gate.shape)


def _head_rows(nh: int, d: int, n_tok: int, device) -> tuple[int, bool]:
    """Rows (token, head) per program and whether they all belong to one token (then cos/sin
    are computed once per program and shared by its heads)."""
    target = max(1, _TILE // _pow2(d))
    div = nh & -nh  # largest power of two dividing nh
    same = min(target, div)
    if same == target or same * _pow2(d) >= _SAME_MIN:
        br = same
    else:  # few, narrow heads (MLA's single k_rope head): pack several tokens per program
        br = target
    br = max(1, min(br, _pow2(n_tok * nh)))
    floor = 2 * _sm_count(torch.device(device))
    while br > 1 and cdiv(n_tok * nh, br) < floor:
        br //= 2
    return br, nh % br == 0


def _qk(q, k, positions, q_norm, k_norm, eps, *, heads, kv_heads, q_head_dim, k_head_dim, rotary_dim,
        style, theta, scaling=None, store=None, **_):
    """`store` = (v, slot_mapping, k_cache, v_cache): k and v also go to the paged pools (k as returned)."""
    if style not in ("neox", "interleaved"):
        raise ValueError(f"rope: unknown style {style!r}")
    rot = int(rotary_dim)
    if rot % 2 or rot > q_head_dim or rot > k_head_dim:
        raise ValueError(f"rope: rotary_dim {rot} must be even and <= head dims ({q_head_dim}, {k_head_dim})")
    qr, sq = _as_rows(q, heads * q_head_dim)
    kr, sk = _as_rows(k, kv_heads * k_head_dim)
    n = qr.shape[0]
    norm = q_norm is not None
    q_dt = torch.promote_types(q.dtype, q_norm.dtype) if norm else q.dtype
    k_dt = torch.promote_types(k.dtype, k_norm.dtype) if norm else k.dtype
    qo = torch.empty(n, heads * q_head_dim, dtype=q_dt, device=q.device)
    ko = torch.empty(n, kv_heads * k_head_dim, dtype=torch.promote_types(k_dt, q_dt), device=q.device)
    if n:
        inv, attn = rope_cache(rot, theta, scaling, q.device)
        pos = positions.reshape(-1)
        if pos.stride(0) != 1:
            pos = pos.contiguous()
        br_q, same_q = _head_rows(heads, q_head_dim, n, q.device)
        br_k, same_k = _head_rows(kv_heads, k_head_dim, n, q.device)
        grid = (cdiv(n * heads, br_q) + cdiv(n * kv_heads, br_k),)
        elems = max(br_q * _pow2(q_head_dim), br_k * _pow2(k_head_dim))
        pool = {}
        if store is not None:
            v, slots, kc, vc = store
            vr, sv = _as_rows(v, kv_heads * k_head_dim)
            pool = dict(slot_ptr=slots, kc_ptr=kc, vc_ptr=vc, v_ptr=vr, stride_v=sv, s_kcb=kc.stride(0),
                        s_kco=kc.stride(1), s_kch=kc.stride(2), s_kcd=kc.stride(3), s_vcb=vc.stride(0),
                        s_vco=vc.stride(1), s_vch=vc.stride(2), s_vcd=vc.stride(3), BS=kc.shape[1], STORE=True,
                        BLOCK_DV=_pow2(k_head_dim))
        _qk_rope_kernel[grid](
            qr, kr, qo, ko, q_norm if norm else qr, k_norm if norm else kr, pos, inv,
            n, sq, sk, float(eps), attn,
            HQ=heads, HK=kv_heads, DQ=q_head_dim, DK=k_head_dim, ROT=rot, BLOCK_HALF=_pow2(rot // 2),
            BR_Q=br_q, BR_K=br_k, SAME_Q=same_q, SAME_K=same_k,
            BKEEP_Q=_pow2(q_head_dim - rot), BKEEP_K=_pow2(k_head_dim - rot),
            NORM=norm, INTERLEAVED=style == "interleaved", FAST_TRIG=_fast_trig(q.device),
            num_warps=_num_warps(elems, q.element_size()), **pool, **pdl_args(qo))
    return qo.reshape(q.shape), ko.reshape(k.shape)


def rope(q, k, positions, *, heads, kv_heads, q_head_dim, k_head_dim, rotary_dim, style, theta, scaling=None, **_):
    return _qk(q, k, positions, None, None, 0.0, heads=heads, kv_heads=kv_heads, q_head_dim=q_head_dim,
               k_head_dim=k_head_dim, rotary_dim=rotary_dim, style=style, theta=theta, scaling=scaling)


def qk_norm_rope(q, k, positions, q_norm, k_norm, eps, **attrs):
    """Per-head RMSNorm of q and k, then rope, in one launch."""
    return _qk(q, k, positions, q_norm, k_norm, eps, **attrs)


def qk_rope_store(q, k, v, positions, q_norm=None, k_norm=None, eps=0.0, *, layer, ctx, **attrs):
    """rope (after the per-head norms, when given) of q and k, with k and v written to the layer's
    paged pools in the same launch (torch_ref.qk_rope_store; unquantized pools: what
    passes/fuse_kv_store.py fuses)."""
    k_cache, v_cache, *scales = ctx.kv[layer]
    assert not scales, "qk_rope_store writes unquantized pools (FP8 KV keeps attention's store)"
    return _qk(q, k, positions, q_norm, k_norm, eps, store=(v, ctx.slot_mapping, k_cache, v_cache), **attrs)
