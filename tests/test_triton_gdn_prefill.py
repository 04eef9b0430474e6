"""The Gated DeltaNet prefill kernels (kernels/triton/gdn_prefill.py) on fresh random inputs, against
transformers' own torch delta rule (torch_chunk_gated_delta_rule, Qwen3.5-MoE's reference path, with its
chunk of 64 whatever chunk the kernel uses) after a causal conv written here with F.conv1d: varlen batches
of sequences that are not multiples of the chunk, some continuing nonzero states. In Triton's interpreter
on CPU (f32 / f16, tiny heads) and on a GPU at Qwen3.5-MoE's real head sizes (bf16)."""
import inspect
import os

import pytest
import torch
import torch.nn.functional as F

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA and not os.environ.get("TRITON_INTERPRET"):
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 for the Triton kernels", allow_module_level=True)
pytest.importorskip("triton")
hf = pytest.importorskip("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe")

from nanoforge.kernels.context import make_context  # noqa: E402
from nanoforge.kernels.triton import gdn_prefill as P  # noqa: E402

DEV = torch.device("cuda" if HAS_CUDA else "cpu")
TINY = dict(k_heads=2, v_heads=4, k_head_dim=16, v_head_dim=8, conv_kernel=4)
REAL = dict(k_heads=16, v_heads=32, k_head_dim=128, v_head_dim=128, conv_kernel=4)  # bench/gdn_kernels.py real_sizes()


def dims(sizes: dict) -> tuple[int, int, int, int, int, int]:
    hk, hv, dk, dv, kern = (sizes[k] for k in ("k_heads", "v_heads", "k_head_dim", "v_head_dim", "conv_kernel"))
    return hk, hv, dk, dv, kern, 2 * hk * dk + hv * dv


def make_inputs(sizes: dict, lens: list[int], slots: int, g: torch.Generator, dtype: torch.dtype):
    """Params, (qkv, z, b, a) as strided views of one fused projection, and a random state pool."""
    _, hv, dk, dv, kern, c = dims(sizes)

    def rnd(*shape, std=1.0):
        return (std * torch.randn(*shape, generator=g)).to(DEV)

    params = dict(conv=rnd(c, 1, kern, std=0.5).to(dtype), dt_bias=rnd(hv), A_log=rnd(hv, std=0.5),
                  norm=(1 + rnd(dv, std=0.1)).to(dtype))
    fused = rnd(sum(lens), c + hv * dv + 2 * hv).to(dtype)
    inputs = torch.split(fused, [c, hv * dv, hv, hv], dim=-1)
    pool = (rnd(slots, c, kern - 1).to(dtype).float(), rnd(slots, hv, dk, dv, std=0.25))
    return params, inputs, pool


def reference(x, b, a, params: dict, sizes: dict, window, state):
    """One sequence: silu(F.conv1d) over [window | x] (f32, rounded to x's dtype as a kernel output is),
    then transformers' chunked rule (f32) from `state`; returns (core [n, Hv, Dv], new window, new state)."""
    hk, hv, dk, dv, kern, c = dims(sizes)
    n = x.shape[0]
    full = torch.cat([window if window is not None else x.new_zeros(c, kern - 1, dtype=torch.float32),
                      x.float().t()], dim=1)
    y = F.silu(F.conv1d(full[None], params["conv"].float(), groups=c)[0]).t().to(x.dtype).float()
    q, k, v = torch.split(y, [hk * dk, hk * dk, hv * dv], dim=-1)
    q, k = (t.reshape(n, hk, dk).repeat_interleave(hv // hk, dim=1) for t in (q, k))
    g = -params["A_log"].float().exp() * F.softplus(a.float() + params["dt_bias"])
    rule = inspect.unwrap(hf.torch_chunk_gated_delta_rule)  # the torch code, not a hub kernel
    core, s = rule(q[None], k[None], v.reshape(1, n, hv, dv), g[None], b.float().sigmoid()[None],
                   initial_state=None if state is None else state[None].clone(), output_final_state=True,
                   use_qk_l2norm_in_kernel=True)
    return core[0], full[:, full.shape[1] - (kern - 1):], s[0]


def report(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    err = (got.float() - want.float()).abs().max().item()
    scale = max(want.float().abs().max().item(), 1.0)
    print(f"{name}: max abs err {err:.3e}, max |ref| {scale:.3e}, tol {tol * scale:.3e}")
    assert err <= tol * scale, f"{name}: max abs err {err:.3e} > {tol * scale:.3e}"


def check_prefill(sizes: dict, lens: list[int], fresh: list[bool], slots: list[int], *, pool_rows: int, chunk: int,
                  dtype: torch.dtype, tol: float, seed: int) -> None:
    """gdn_prefill_core over a varlen batch vs reference() per sequence: core rows, conv windows and delta
    states of the sequences' slots; the other slots untouched."""
    g = torch.Generator().manual_seed(seed)
    hv, dv = sizes["v_heads"], sizes["v_head_dim"]
    params, (qkv, _, b, a), pool = make_inputs(sizes, lens, pool_rows, g, dtype)
    before = tuple(t.clone() for t in pool)
    starts = [sum(lens[:i]) for i in range(len(lens))]
    tables = P.prefill_tables(list(zip(starts, lens, slots, fresh)), chunk, DEV)
    core = P.gdn_prefill_core(qkv, b, a, params, sizes, pool=pool, tables=tables).reshape(-1, hv, dv)
    for start, n, slot, new in zip(starts, lens, slots, fresh):
        rows = slice(start, start + n)
        want, window, state = reference(qkv[rows], b[rows], a[rows], params, sizes,
                                        None if new else before[0][slot], None if new else before[1][slot])
        report(f"{n} rows from {'zeros' if new else 'slot'} {slot}: core", core[rows], want, tol)
        report(f"{n} rows: conv window", pool[0][slot], window, tol)
        report(f"{n} rows: delta state", pool[1][slot], state, tol)
    for other in sorted(set(range(pool_rows)) - set(slots)):
        assert torch.equal(pool[0][other], before[0][other]) and torch.equal(pool[1][other], before[1][other])


@pytest.mark.parametrize("dtype,chunk", [(torch.float32, 16), (torch.float32, 64), (torch.float16, 32)])
def test_prefill_kernels_match_transformers_rule(dtype, chunk):
    tol = {torch.float32: 2e-5, torch.float16: 2e-3}[dtype]
    check_prefill(TINY, [1, 37, 64, 130], [True, False, True, False], [3, 0, 5, 2], pool_rows=6, chunk=chunk,
                  dtype=dtype, tol=tol, seed=chunk)


def test_gdn_op_runs_prefill_sequences_beside_decode_rows():
    """Two mixed steps of two gdn layers through the triton provider's gdn op (decode rows, a fresh
    70-token prompt then its next 45-token chunk, a 37-token chunk continuing a random state; the second
    layer reuses the rows the first one made for the step) vs the torch provider's op, from the same state
    rows: outputs and every state row agree."""
    from nanoforge.kernels import torch_ref
    from nanoforge.kernels.triton import gdn_decode

    g = torch.Generator().manual_seed(5)
    layers = [make_inputs(TINY, [1], 6, g, torch.float32) for _ in range(2)]  # (params, _, state pool) each
    ours = [pool for _, _, pool in layers]
    ref = [tuple(t.clone() for t in pool) for pool in ours]
    steps = [([(1, 9, [0]), (70, 70, [0]), (37, 80, [0]), (1, 30, [0])], [2, 0, 5, 3]),  # q_len, ctx_len, blocks
             ([(1, 10, [0]), (45, 115, [0]), (1, 81, [0]), (1, 31, [0])], [2, 0, 5, 3])]
    for seqs, slots in steps:
        ctx = make_context([], 4096, seqs, DEV, state=(ours, slots))
        ref_ctx = make_context([], 4096, seqs, DEV, state=(ref, slots))
        for layer, (params, _, _) in enumerate(layers):
            _, inputs, _ = make_inputs(TINY, [sum(q for q, _, _ in seqs)], 1, g, torch.float32)
            attrs = dict(layer=layer, eps=1e-6, **TINY)
            got = gdn_decode.gdn(*inputs, ctx=ctx, **params, **attrs)
            want = torch_ref.gdn(*inputs, ctx=ref_ctx, **params, **attrs)
            report(f"gdn op layer {layer} output", got, want, 2e-5)
        assert "gdn_rows" in ctx.scratch
        for pool, pool_ref in zip(ours, ref):
            for x, y in zip(pool, pool_ref):
                report("gdn op state rows", x, y, 2e-5)


def test_prefill_tables_chunk_the_sequences_and_refuse_bad_input():
    t = P.prefill_tables([(0, 1, 4, True), (1, 37, 0, False)], 16, torch.device("cpu"))
    assert t.seq.tolist() == [[0, 1, 4, 1], [1, 37, 0, 0]]
    assert t.chunks.tolist() == [[0, 0], [1, 0], [1, 16], [1, 32]]
    with pytest.raises(ValueError, match="chunk 48"):
        P.prefill_tables([(0, 5, 0, True)], 48, torch.device("cpu"))
    with pytest.raises(ValueError, match="state slot"):
        P.prefill_tables([(0, 5, -1, True)], 64, torch.device("cpu"))


AOT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from nanoforge.kernels.triton import gdn_prefill as P

ACT, F32, I32 = "*bf16", "*fp32", "*i32"
gates = dict(a_ptr=ACT, b_ptr=ACT, ab_stride="i32", alog_ptr=F32, dtb_ptr=F32, seq_ptr=I32)
heads = dict(REP=2, DK=128, DV=128, BK=128, BT=64, DOT="tf32")
kernels = [
    (P._conv_varlen_kernel, dict(x_ptr=ACT, x_stride="i32", win_ptr=F32, w_ptr=ACT, seq_ptr=I32, chunk_ptr=I32,
                                 out_ptr=ACT, C="i32"), dict(K=4, BT=64, SUB=16, BLOCK_C=64), 4),
    (P._conv_window_kernel, dict(x_ptr=ACT, x_stride="i32", win_ptr=F32, seq_ptr=I32, C="i32"),
     dict(K=4, KP=4, BLOCK_C=256), 4),
    (P._wy_kernel, dict(k_ptr=ACT, v_ptr=ACT, row_stride="i32", **gates, chunk_ptr=I32, w_ptr=F32, u_ptr=F32,
                        HV="i32"), dict(heads, BVF=128), 4),
    (P._chunk_state_kernel, dict(q_ptr=ACT, k_ptr=ACT, row_stride="i32", **gates, w_ptr=F32, u_ptr=F32,
                                 state_ptr=F32, out_ptr=ACT, HV="i32", scale="fp32"), dict(heads, BV=P.BLOCK_V), 4),
]
out = {}
for fn, sig, consts, warps in kernels:
    # as the launcher specialises them: pointers and strides of the real sizes are multiples of 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, (n, t) in enumerate(sig.items()) if t.startswith("*") or n != "C"
             and t == "i32"}
    src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}}, constexprs=consts, attrs=attrs)
    cc = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    out[fn.__name__] = cc.metadata.shared
print(json.dumps(out))
"""


def test_kernels_compile_for_sm90_within_shared_memory():
    """The interpreter runs no compiler: build the kernels for an H100 (sm_90, Triton's own ptxas, no GPU
    needed) at Qwen3.5-MoE's head sizes and the default chunk, and check each fits the 227 KiB of shared
    memory a block may have there."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton wheel carries no ptxas to compile for sm_90 with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", AOT], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shared = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(shared) == {"_conv_varlen_kernel", "_conv_window_kernel", "_wy_kernel", "_chunk_state_kernel"}
    assert max(shared.values()) <= 227 * 1024, shared


# ---- on the GPU (`pytest -m gpu`, bench/gpu_check.sh): Qwen3.5-MoE's real GDN head sizes, bf16 --------------
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("chunk", [32, 64])
def test_gpu_prefill_at_real_sizes(chunk):
    """Five sequences (37 to 2100 rows, two continuing random states, shuffled slots) at real head sizes:
    bf16 activations, tf32 products, f32 state; vs the f32 reference with bf16 tolerances."""
    check_prefill(REAL, [37, 64, 130, 1000, 2100], [True, False, True, False, True], [7, 2, 0, 5, 3], pool_rows=9,
                  chunk=chunk, dtype=torch.bfloat16, tol=3e-2, seed=100 + chunk)
