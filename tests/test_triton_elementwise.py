"""Fused elementwise Triton kernels against the torch reference.

CPU CI runs the unmarked tests in Triton's interpreter (fp32/fp16, tiny shapes); the `gpu` tests
take bf16 at real model shapes, and CUDA-graph capture/replay.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA and not os.environ.get("TRITON_INTERPRET"):
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 for the Triton kernels", allow_module_level=True)
pytest.importorskip("triton")

from nanoforge.kernels import torch_ref as R  # noqa: E402
from nanoforge.kernels.triton import elementwise as E  # noqa: E402

DEV = torch.device("cuda" if HAS_CUDA else "cpu")
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "mscale": 1.0,
        "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1}


def rnd(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEV, dtype=torch.float32).to(dtype)


def check(out, ref, tol):
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    assert torch.isfinite(out).all()
    err = (out.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= tol * scale, f"max|out-ref| = {err:.3g} > {tol} * max|ref| ({scale:.3g})"


# ---- interpreter-sized (CPU CI), fp32 --------------------------------------------------------------

@pytest.mark.parametrize("t,width", [(3, 48), (7, 80), (5, 96), (3, 576)])
def test_rms_norm(t, width):
    x, w = rnd(t, width), rnd(width)
    check(E.rms_norm(x, w, 1e-6, extra="ignored"), R.rms_norm(x, w, 1e-6), 1e-5)


@pytest.mark.parametrize("t,heads,group", [(3, 4, 16), (5, 3, 80), (4, 2, 24)])
def test_rms_norm_group(t, heads, group):
    x, w = rnd(t, heads * group), rnd(group)
    check(E.rms_norm(x, w, 1e-5, group=group), R.rms_norm(x, w, 1e-5, group=group), 1e-5)


@pytest.mark.parametrize("t,width", [(3, 48), (6, 80), (5, 96)])
def test_add_rms_norm(t, width):
    x, r, w = rnd(t, width), rnd(t, width), rnd(width)
    out, s = E.add_rms_norm(x, r, w, 1e-6)
    ref_out, ref_s = R.add_rms_norm(x, r, w, 1e-6)
    check(s, ref_s, 1e-6)
    check(out, ref_out, 1e-5)


def test_add_rms_norm_fp16():
    x, r, w = rnd(5, 80, dtype=torch.float16), rnd(5, 80, dtype=torch.float16), rnd(80, dtype=torch.float16)
    out, s = E.add_rms_norm(x, r, w, 1e-6)
    ref_out, ref_s = R.add_rms_norm(x, r, w, 1e-6)
    check(s, ref_s, 1e-3)
    check(out, ref_out, 2e-3)


@pytest.mark.parametrize("t,width", [(3, 48), (7, 80)])
def test_silu_mul(t, width):
    gu = rnd(t, 2 * width)  # gate and up as column slices of a fused projection (row stride 2*width)
    gate, up = gu[:, :width], gu[:, width:]
    check(E.silu_mul(gate, up), R.silu_mul(gate, up), 1e-5)
    g2, u2 = rnd(t, width), rnd(t, width)
    check(E.silu_mul(g2, u2), R.silu_mul(g2, u2), 1e-5)


def test_embed():
    w = rnd(50, 80)
    tok = torch.randint(0, 50, (7,), device=DEV)
    check(E.embed(tok, w), R.embed(tok, w), 0.0)


def _rope_inputs(t, heads, kv_heads, dq, dk, dtype=torch.float32, max_pos=1000):
    qkv = rnd(t, heads * dq + 2 * kv_heads * dk, dtype=dtype)  # q, k as slices: row stride != width
    q, k = qkv[:, : heads * dq], qkv[:, heads * dq: heads * dq + kv_heads * dk]
    pos = torch.randint(0, max_pos, (t,), device=DEV)
    return q, k, pos


ROPE_CASES = [  # heads, kv_heads, q_head_dim, k_head_dim, rotary_dim
    (4, 2, 16, 16, 16),
    (2, 2, 80, 80, 80),    # non-power-of-two head
    (3, 1, 48, 16, 16),    # MLA-like: q head (32 nope + 16 rope) != k head, one kv head
    (4, 2, 32, 32, 16),    # partial rotary on both
]


@pytest.mark.parametrize("style", ["neox", "interleaved"])
@pytest.mark.parametrize("heads,kv_heads,dq,dk,rot", ROPE_CASES)
def test_rope(style, heads, kv_heads, dq, dk, rot):
    q, k, pos = _rope_inputs(5, heads, kv_heads, dq, dk)
    attrs = dict(heads=heads, kv_heads=kv_heads, q_head_dim=dq, k_head_dim=dk, rotary_dim=rot, style=style,
                 theta=10000.0)
    (qo, ko), (qr, kr) = E.rope(q, k, pos, **attrs), R.rope(q, k, pos, **attrs)
    check(qo, qr, 1e-5)
    check(ko, kr, 1e-5)


@pytest.mark.parametrize("style", ["neox", "interleaved"])
def test_rope_yarn(style):
    q, k, pos = _rope_inputs(6, 3, 1, 48, 16, max_pos=512)
    attrs = dict(heads=3, kv_heads=1, q_head_dim=48, k_head_dim=16, rotary_dim=16, style=style, theta=10000.0,
                 scaling=dict(YARN))
    (qo, ko), (qr, kr) = E.rope(q, k, pos, **attrs), R.rope(q, k, pos, **attrs)
    check(qo, qr, 1e-5)
    check(ko, kr, 1e-5)


@pytest.mark.parametrize("style", ["neox", "interleaved"])
@pytest.mark.parametrize("heads,kv_heads,dq,dk,rot", ROPE_CASES[:2] + ROPE_CASES[3:])
def test_qk_norm_rope(style, heads, kv_heads, dq, dk, rot):
    q, k, pos = _rope_inputs(5, heads, kv_heads, dq, dk)
    qn, kn = rnd(dq), rnd(dk)
    attrs = dict(heads=heads, kv_heads=kv_heads, q_head_dim=dq, k_head_dim=dk, rotary_dim=rot, style=style,
                 theta=1e6, layer=3)
    (qo, ko), (qr, kr) = E.qk_norm_rope(q, k, pos, qn, kn, 1e-6, **attrs), R.qk_norm_rope(q, k, pos, qn, kn, 1e-6,
                                                                                              **attrs)
    check(qo, qr, 1e-5)
    check(ko, kr, 1e-5)


def test_qk_norm_rope_is_one_launch(monkeypatch):
    launches = []
    kernel = E._qk_rope_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(E, "_qk_rope_kernel", Counting())
    q, k, pos = _rope_inputs(3, 4, 2, 16, 16)
    E.qk_norm_rope(q, k, pos, rnd(16), rnd(16), 1e-6, heads=4, kv_heads=2, q_head_dim=16, k_head_dim=16,
                   rotary_dim=16, style="neox", theta=1e6, scaling=dict(YARN))
    assert len(launches) == 1


def _store_case(t, heads, kv_heads, d, dtype, pool_dtype, blocks=6, bs=4):
    """q / k / v as column slices of one qkv row, a random pool (never zeros) and a slot per token, two
    of them -1 (CUDA-graph padding: nothing written)."""
    qkv = rnd(t, (heads + 2 * kv_heads) * d, dtype=dtype)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=1)
    pos = torch.randint(0, 1000, (t,), device=DEV)
    slots = torch.randperm(blocks * bs, device=DEV)[:t]
    slots[1::3] = -1
    pools = [rnd(blocks, bs, kv_heads, d, dtype=pool_dtype) for _ in range(2)]
    return q, k, v, pos, slots, pools


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("heads,kv_heads,d,rot,dtype", [(4, 2, 16, 16, torch.float32), (6, 3, 32, 16, torch.float32),
                                                        (4, 2, 80, 80, torch.float32), (2, 1, 16, 16, torch.float16)])
def test_qk_rope_store(norm, heads, kv_heads, d, rot, dtype):
    """One launch gives the reference's q and k and leaves the K / V pools as attention's own store
    would: each slotted token's roped k and its v, other rows untouched."""
    from types import SimpleNamespace

    q, k, v, pos, slots, pools = _store_case(7, heads, kv_heads, d, dtype, dtype)
    norms = dict(q_norm=rnd(d, dtype=dtype), k_norm=rnd(d, dtype=dtype), eps=1e-6) if norm else {}
    attrs = dict(heads=heads, kv_heads=kv_heads, q_head_dim=d, k_head_dim=d, rotary_dim=rot, style="neox",
                 theta=1e6, layer=0, **norms)
    ref_ctx = SimpleNamespace(kv=[tuple(p.clone() for p in pools)], slot_mapping=slots)
    ctx = SimpleNamespace(kv=[tuple(pools)], slot_mapping=slots)
    (qo, ko), (qr, kr) = E.qk_rope_store(q, k, v, pos, ctx=ctx, **attrs), R.qk_rope_store(q, k, v, pos, ctx=ref_ctx,
                                                                                         **attrs)
    check(qo, qr, 1e-3)
    check(ko, kr, 1e-3)
    for got, want in zip(ctx.kv[0], ref_ctx.kv[0]):
        check(got, want, 1e-3)
    written = pools[0].view(-1, kv_heads * d)[slots[slots >= 0]]
    assert torch.equal(written, ko[slots >= 0].to(written.dtype))  # the pool holds exactly the returned k


def test_inv_freq_cached_on_device():
    a, fa = E.rope_cache(16, 10000.0, dict(YARN), DEV)
    b, fb = E.rope_cache(16, 10000.0, dict(YARN), DEV)
    assert a is b and fa == fb and a.device.type == DEV.type and a.dtype == torch.float32
    c, _ = E.rope_cache(16, 10000.0, None, DEV)
    assert c is not a


def test_empty_batch():
    x, w = rnd(0, 48), rnd(48)
    assert E.rms_norm(x, w, 1e-6).shape == (0, 48)
    out, s = E.add_rms_norm(x, x, w, 1e-6)
    assert out.shape == s.shape == (0, 48)
    assert E.silu_mul(x, x).shape == (0, 48)
    q, k = E.rope(rnd(0, 32), rnd(0, 16), torch.zeros(0, dtype=torch.long, device=DEV), heads=2, kv_heads=1,
                  q_head_dim=16, k_head_dim=16, rotary_dim=16, style="neox", theta=1e4)
    assert q.shape == (0, 32) and k.shape == (0, 16)


# ---- GPU: bf16 at real shapes, CUDA graphs ---------------------------------------------------------

BF16_TOL = 1e-2
TOKENS = [1, 7, 256, 4096]
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

QK_MODELS = {  # name: (heads, kv_heads, q_head_dim, k_head_dim, rotary_dim, style, theta, scaling)
    "qwen3-0.6b": (16, 8, 128, 128, 128, "neox", 1e6, None),
    "qwen3-8b": (32, 8, 128, 128, 128, "neox", 1e6, None),
    "smollm2": (9, 3, 64, 64, 64, "neox", 1e5, None),
}
MLA_SCALING = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0,
               "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}


@gpu
@needs_cuda
@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("hidden", [576, 1024, 4096])
def test_gpu_norms_bf16(t, hidden):
    bf = torch.bfloat16
    x, r, w = rnd(t, hidden, dtype=bf), rnd(t, hidden, dtype=bf), rnd(hidden, dtype=bf)
    check(E.rms_norm(x, w, 1e-6), R.rms_norm(x, w, 1e-6), BF16_TOL)
    out, s = E.add_rms_norm(x, r, w, 1e-6)
    ref_out, ref_s = R.add_rms_norm(x, r, w, 1e-6)
    check(s, ref_s, BF16_TOL)
    check(out, ref_out, BF16_TOL)
    wg = rnd(128 if hidden % 128 == 0 else 64, dtype=bf)
    check(E.rms_norm(x, wg, 1e-6, group=wg.shape[0]), R.rms_norm(x, wg, 1e-6, group=wg.shape[0]), BF16_TOL)


@gpu
@needs_cuda
@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("inter", [1536, 3072, 12288])
def test_gpu_silu_mul_bf16(t, inter):
    gu = rnd(t, 2 * inter, dtype=torch.bfloat16)
    check(E.silu_mul(gu[:, :inter], gu[:, inter:]), R.silu_mul(gu[:, :inter], gu[:, inter:]), BF16_TOL)


@gpu
@needs_cuda
@pytest.mark.parametrize("t", TOKENS)
def test_gpu_embed_bf16(t):
    w = rnd(151936, 1024, dtype=torch.bfloat16)
    tok = torch.randint(0, w.shape[0], (t,), device=DEV)
    check(E.embed(tok, w), R.embed(tok, w), 0.0)


@gpu
@needs_cuda
@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("model", list(QK_MODELS))
def test_gpu_qk_norm_rope_bf16(t, model):
    h, kvh, dq, dk, rot, style, theta, scaling = QK_MODELS[model]
    q, k, pos = _rope_inputs(t, h, kvh, dq, dk, dtype=torch.bfloat16, max_pos=32768)
    qn, kn = rnd(dq, dtype=torch.bfloat16), rnd(dk, dtype=torch.bfloat16)
    attrs = dict(heads=h, kv_heads=kvh, q_head_dim=dq, k_head_dim=dk, rotary_dim=rot, style=style, theta=theta,
                 scaling=scaling)
    for (qo, ko), (qr, kr) in [(E.qk_norm_rope(q, k, pos, qn, kn, 1e-6, **attrs),
                                R.qk_norm_rope(q, k, pos, qn, kn, 1e-6, **attrs)),
                               (E.rope(q, k, pos, **attrs), R.rope(q, k, pos, **attrs))]:
        check(qo, qr, BF16_TOL)
        check(ko, kr, BF16_TOL)


@gpu
@needs_cuda
@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("model", ["qwen3-0.6b", "smollm2"])
def test_gpu_qk_rope_store_bf16(t, model):
    """The fused rope + KV store at real shapes into a bf16 pool of 16-token blocks: q / k as the
    reference's, and the pools bit-equal to the reference's store of the kernel's own k and v."""
    from types import SimpleNamespace

    h, kvh, d, _, rot, style, theta, scaling = QK_MODELS[model]
    q, k, v, pos, slots, pools = _store_case(t, h, kvh, d, torch.bfloat16, torch.bfloat16, blocks=t // 16 + 8, bs=16)
    attrs = dict(heads=h, kv_heads=kvh, q_head_dim=d, k_head_dim=d, rotary_dim=rot, style=style, theta=theta,
                 scaling=scaling)
    qn, kn = rnd(d, dtype=torch.bfloat16), rnd(d, dtype=torch.bfloat16)
    ref_pools = tuple(p.clone() for p in pools)
    qo, ko = E.qk_rope_store(q, k, v, pos, qn, kn, 1e-6, layer=0,
                             ctx=SimpleNamespace(kv=[tuple(pools)], slot_mapping=slots), **attrs)
    qr, kr = R.qk_norm_rope(q, k, pos, qn, kn, 1e-6, **attrs)
    check(qo, qr, BF16_TOL)
    check(ko, kr, BF16_TOL)
    keep = slots >= 0
    for pool, ref, x in zip(pools, ref_pools, (ko, v)):
        ref.view(-1, kvh, d)[slots[keep]] = x[keep].reshape(-1, kvh, d)
        assert torch.equal(pool, ref)


@gpu
@needs_cuda
@pytest.mark.parametrize("t", TOKENS)
def test_gpu_mla_rope_bf16(t):
    """DeepSeek-V3: q 128 heads x (128 nope + 64 rope), interleaved YaRN rope; k_rope is the last 64
    columns of kv_a_proj's output (row stride 576), one kv head."""
    bf = torch.bfloat16
    q = rnd(t, 128 * 192, dtype=bf)
    k_rope = rnd(t, 512 + 64, dtype=bf)[:, 512:]
    pos = torch.randint(0, 160000, (t,), device=DEV)
    attrs = dict(heads=128, kv_heads=1, q_head_dim=192, k_head_dim=64, rotary_dim=64, style="interleaved",
                 theta=10000.0, scaling=dict(MLA_SCALING))
    (qo, ko), (qr, kr) = E.rope(q, k_rope, pos, **attrs), R.rope(q, k_rope, pos, **attrs)
    check(qo, qr, BF16_TOL)
    check(ko, kr, BF16_TOL)


@gpu
@needs_cuda
@pytest.mark.parametrize("t", [1, 8, 64])
def test_gpu_cuda_graph_replay(t):
    bf = torch.bfloat16
    h, kvh, d = 32, 8, 128
    attrs = dict(heads=h, kv_heads=kvh, q_head_dim=d, k_head_dim=d, rotary_dim=d, style="neox", theta=1e6,
                 scaling=None)
    q, k, pos = _rope_inputs(t, h, kvh, d, d, dtype=bf, max_pos=32768)
    qn, kn = rnd(d, dtype=bf), rnd(d, dtype=bf)
    x, r, w = rnd(t, 4096, dtype=bf), rnd(t, 4096, dtype=bf), rnd(4096, dtype=bf)

    def step():
        return E.qk_norm_rope(q, k, pos, qn, kn, 1e-6, **attrs) + E.add_rms_norm(x, r, w, 1e-6)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # eager warm-up: compiles the kernels and fills the rope cache
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for _ in range(2):  # new contents in the captured input buffers, then replay
        q.copy_(rnd(*q.shape, dtype=bf))
        k.copy_(rnd(*k.shape, dtype=bf))
        pos.copy_(torch.randint(0, 32768, pos.shape, device=DEV))
        x.copy_(rnd(*x.shape, dtype=bf))
        r.copy_(rnd(*r.shape, dtype=bf))
        graph.replay()
        torch.cuda.synchronize()
        refs = R.qk_norm_rope(q, k, pos, qn, kn, 1e-6, **attrs) + R.add_rms_norm(x, r, w, 1e-6)
        for o, ref in zip(outs, refs):
            check(o, ref, BF16_TOL)
