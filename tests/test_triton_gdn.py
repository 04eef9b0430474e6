"""The Gated DeltaNet decode kernels (kernels/triton/gdn_decode.py) against the torch reference
(kernels/hybrid_ref.py) on fresh random inputs: in Triton's interpreter on CPU (fp32 / fp16)."""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA and not os.environ.get("TRITON_INTERPRET"):
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 for the Triton kernels", allow_module_level=True)
pytest.importorskip("triton")

from nanoforge.kernels import hybrid_ref as R  # noqa: E402
from nanoforge.kernels.context import make_context  # noqa: E402
from nanoforge.kernels.triton import gdn_decode as G  # noqa: E402

DEV = torch.device("cuda" if HAS_CUDA else "cpu")
ATTRS = dict(layer=0, k_heads=2, v_heads=4, k_head_dim=16, v_head_dim=8, conv_kernel=4, eps=1e-6)
HK, HV, DK, DV, K = 2, 4, 16, 8, 4
C = 2 * HK * DK + HV * DV
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def rnd(*shape, g, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(device=DEV, dtype=dtype)


def params(g):
    return dict(conv=rnd(C, 1, K, g=g) / 2, dt_bias=rnd(HV, g=g), A_log=rnd(HV, g=g) / 2,
                norm=1 + 0.1 * rnd(DV, g=g))


def pool(slots: int, g):
    return (rnd(slots, C, K - 1, g=g), rnd(slots, HV, DK, DV, g=g) / 4)


def close(out, ref, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol * max(ref.float().abs().max().item(), 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_causal_conv1d_update(dtype):
    g = torch.Generator().manual_seed(0)
    x, weight = rnd(3, C + 5, g=g, dtype=dtype)[:, 5:], rnd(C, K, g=g, dtype=dtype)  # strided rows, as out of a split
    window = rnd(6, C, K - 1, g=g)
    before = window.clone()
    slots, fresh = torch.tensor([4, 0, 2], device=DEV), torch.tensor([False, True, False], device=DEV)
    out = G.causal_conv1d_update(x, window, weight, slots, fresh)
    for i, (slot, new) in enumerate(zip(slots.tolist(), fresh.tolist())):
        y, win = R.causal_conv(x[i:i + 1], None if new else before[slot], weight)
        close(out[i:i + 1], y, dtype)
        close(window[slot], win.float(), dtype)
    for untouched in (1, 3, 5):
        assert torch.equal(window[untouched], before[untouched])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_recurrent_gated_delta(dtype):
    g = torch.Generator().manual_seed(1)
    p = params(g)
    x, a, b = rnd(3, C, g=g, dtype=dtype), rnd(3, HV, g=g, dtype=dtype), rnd(3, HV, g=g, dtype=dtype)
    state = pool(5, g)[1]
    before = state.clone()
    slots, fresh = torch.tensor([3, 1, 4], device=DEV), torch.tensor([False, False, True], device=DEV)
    out = G.recurrent_gated_delta(x, a, b, p, ATTRS, state=state, slots=slots, fresh=fresh)
    for i, (slot, new) in enumerate(zip(slots.tolist(), fresh.tolist())):
        q, k, v = torch.split(x[i:i + 1], [HK * DK, HK * DK, HV * DV], dim=-1)
        q, k = (t.reshape(1, HK, DK).repeat_interleave(HV // HK, dim=1) for t in (q, k))
        decay = -p["A_log"].float().exp() * torch.nn.functional.softplus(a[i:i + 1].float() + p["dt_bias"])
        ref, s = R.recurrent_gated_delta_rule(q, k, v.reshape(1, HV, DV), decay, b[i:i + 1].sigmoid(),
                                              None if new else before[slot])
        close(out[i], ref[0], dtype)
        close(state[slot], s, dtype)
    assert torch.equal(state[0], before[0]) and torch.equal(state[2], before[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gdn_op_matches_the_reference_on_mixed_and_decode_only_batches(dtype):
    """A mixed step (decode rows, a fresh one-token prompt, a prefill chunk continuing its state) and then
    a decode-only step, from the same random state rows: outputs and state rows equal the reference's."""
    from nanoforge.kernels import torch_ref

    g = torch.Generator().manual_seed(2)
    p = params(g)
    ours = pool(6, g)
    ref = tuple(t.clone() for t in ours)
    steps = [([(1, 9, [0]), (5, 12, [0]), (1, 1, [0]), (1, 30, [0])], [2, 0, 5, 3]),  # q_len, ctx_len, blocks
             ([(1, 10, [0]), (1, 13, [0]), (1, 2, [0]), (1, 31, [0])], [2, 0, 5, 3])]
    for seqs, slots in steps:
        n = sum(q for q, _, _ in seqs)
        qkv, z = rnd(n, C, g=g, dtype=dtype), rnd(n, HV * DV, g=g, dtype=dtype)
        b, a = rnd(n, HV, g=g, dtype=dtype), rnd(n, HV, g=g, dtype=dtype)
        got = G.gdn(qkv, z, b, a, ctx=make_context([], 64, seqs, DEV, state=([ours], slots)), **p, **ATTRS)
        want = torch_ref.gdn(qkv, z, b, a, ctx=make_context([], 64, seqs, DEV, state=([ref], slots)), **p, **ATTRS)
        close(got, want, dtype)
        for x, y in zip(ours, ref):
            close(x, y, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gdn_op_verify_rows_keep_each_rows_state_as_the_reference(dtype):
    """A speculative verify step (ctx.state_history): two sequences with 1 + 3 and 1 + 1 rows beside a decode
    row and a prefill chunk. The kernels' chain of decode steps (each reading the previous row's state,
    writing its own) gives the reference's outputs, slots (the state after the last row) and history rows
    (the states after the others); rows no sequence owns stay as they were."""
    from nanoforge.kernels import torch_ref

    g = torch.Generator().manual_seed(3)
    p = params(g)
    ours = pool(12, g)
    ref = tuple(t.clone() for t in ours)
    before = tuple(t.clone() for t in ours)
    seqs, slots = [(4, 20, [0]), (1, 9, [0]), (2, 7, [0]), (5, 30, [0])], [1, 3, 0, 2]
    history = [6, -1, 9, -1]  # rows 6..8 for the first sequence's 3 drafts, row 9 for the third's one
    n = sum(q for q, _, _ in seqs)
    qkv, z = rnd(n, C, g=g, dtype=dtype), rnd(n, HV * DV, g=g, dtype=dtype)
    b, a = rnd(n, HV, g=g, dtype=dtype), rnd(n, HV, g=g, dtype=dtype)
    outs = []
    for state in (ours, ref):
        ctx = make_context([], 64, seqs, DEV, state=([state], slots))
        ctx.state_history = history
        outs.append((G.gdn if state is ours else torch_ref.gdn)(qkv, z, b, a, ctx=ctx, **p, **ATTRS))
    close(outs[0], outs[1], dtype)
    for x, y, old in zip(ours, ref, before):
        close(x[:10], y[:10], dtype)
        assert torch.equal(x[4:6], old[4:6]) and torch.equal(x[10:], old[10:])


# ---- on the GPU (`pytest -m gpu`, bench/gpu_check.sh): Qwen3.5-MoE's real GDN head sizes, bf16 --------------
BIG = 4096  # a block size that holds every test context in block 0 (gdn reads no KV)
REAL = dict(layer=0, k_heads=16, v_heads=32, k_head_dim=128, v_head_dim=128, conv_kernel=4, eps=1e-6)  # its config


def real_inputs(n: int, slots: int, g: torch.Generator, dtype=torch.bfloat16):
    hk, hv, dk, dv, kern = (REAL[k] for k in ("k_heads", "v_heads", "k_head_dim", "v_head_dim", "conv_kernel"))
    c = 2 * hk * dk + hv * dv
    p = dict(conv=(rnd(c, 1, kern, g=g) / 2).to(dtype), dt_bias=rnd(hv, g=g), A_log=rnd(hv, g=g) / 2,
             norm=(1 + 0.1 * rnd(dv, g=g)).to(dtype))
    fused = rnd(n, c + hv * dv + 2 * hv, g=g, dtype=dtype)  # [qkv | z | b | a] as out of the fused in-projection
    qkv, z, b, a = torch.split(fused, [c, hv * dv, hv, hv], dim=-1)
    state = (rnd(slots, c, kern - 1, g=g).to(dtype).float(),  # a window holds activations (bf16-exact)
             rnd(slots, hv, dk, dv, g=g) / 8)
    return p, (qkv, z, b, a), state


def close_report(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    err = (got.float() - want.float()).abs().max().item()
    scale = max(want.float().abs().max().item(), 1.0)
    print(f"{name}: max abs err {err:.3e}, max |ref| {scale:.3e}, tol {tol * scale:.3e}")
    assert err <= tol * scale, f"{name}: max abs err {err:.3e} > {tol * scale:.3e}"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("batch", [1, 64, 256])
def test_gpu_decode_step_at_real_sizes(batch):
    """A decode-only step of `batch` sequences (a few fresh, the rest continuing random state rows in a
    shuffled pool) on CUDA, bf16 activations: output and state rows vs the reference's."""
    from nanoforge.kernels import torch_ref

    g = torch.Generator().manual_seed(10 + batch)
    slots_total = batch + 8
    p, inputs, ours = real_inputs(batch, slots_total, g)
    ref = tuple(t.clone() for t in ours)
    slots = torch.randperm(slots_total, generator=g)[:batch].tolist()
    seqs = [(1, 1 if i % 17 == 3 else 40 + i, [0]) for i in range(batch)]
    got = G.gdn(*inputs, ctx=make_context([], BIG, seqs, DEV, state=([ours], slots)), **p, **REAL)
    want = torch_ref.gdn(*inputs, ctx=make_context([], BIG, seqs, DEV, state=([ref], slots)), **p, **REAL)
    close_report(f"gdn decode batch {batch} output", got, want, 3e-2)
    close_report(f"gdn decode batch {batch} conv window", ours[0], ref[0], 1e-2)
    close_report(f"gdn decode batch {batch} delta state", ours[1], ref[1], 3e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_mixed_step_and_padding_rows_at_real_sizes():
    """A mixed step (decode rows beside a 100-token chunk continuing its state and a fresh 70-token prompt),
    then a decode-only step with CUDA-graph padding rows (state slot -1): they read a zero state, write no
    state row, and the real rows match the reference."""
    from nanoforge.kernels import torch_ref

    g = torch.Generator().manual_seed(7)
    p, _, ours = real_inputs(1, 12, g)
    ref = tuple(t.clone() for t in ours)
    seqs, slots = [(1, 50, [0]), (100, 300, [0]), (1, 9, [0]), (70, 70, [0])], [5, 0, 11, 3]
    _, inputs, _ = real_inputs(sum(q for q, _, _ in seqs), 1, g)
    got = G.gdn(*inputs, ctx=make_context([], BIG, seqs, DEV, state=([ours], slots)), **p, **REAL)
    want = torch_ref.gdn(*inputs, ctx=make_context([], BIG, seqs, DEV, state=([ref], slots)), **p, **REAL)
    close_report("gdn mixed output", got, want, 3e-2)
    close_report("gdn mixed delta state", ours[1], ref[1], 3e-2)
    before = tuple(t.clone() for t in ours)
    _, inputs, _ = real_inputs(6, 1, g)
    seqs = [(1, 51, [0]), (1, 301, [0]), (1, 10, [0]), (1, 71, [0]), (1, 1, [0]), (1, 1, [0])]  # last two: padding
    ctx = make_context([], BIG, seqs, DEV, state=([ours], [5, 0, 11, 3, 0, 0]))
    ctx.state_slots[4:] = -1
    got = G.gdn(*inputs, ctx=ctx, **p, **REAL)
    want = torch_ref.gdn(*(t[:4] for t in inputs), ctx=make_context([], BIG, seqs[:4], DEV, state=([ref], [5, 0, 11, 3])),
                         **p, **REAL)
    close_report("gdn decode output (real rows)", got[:4], want, 3e-2)
    close_report("gdn decode delta state", ours[1], ref[1], 3e-2)
    for untouched in (1, 2, 4, 6, 7, 8, 9, 10):  # rows no sequence owns, padding included
        assert torch.equal(ours[0][untouched], before[0][untouched]) and torch.equal(ours[1][untouched],
                                                                                     before[1][untouched])
    assert torch.isfinite(got[4:]).all()
