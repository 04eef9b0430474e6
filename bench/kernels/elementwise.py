"""GPU benchmark of the fused elementwise Triton kernels (nanoforge/kernels/triton/elementwise.py):
bench_elementwise (bench/gpu_check.sh stage `elementwise`)."""
from __future__ import annotations

import torch

from nanoforge.kernels.triton import elementwise as E


def bench_elementwise(tokens: int = 4096, dtype=torch.bfloat16) -> dict:
    """Median time (triton.testing.do_bench) and effective bandwidth of add_rms_norm, silu_mul and
    qk_norm_rope at Qwen3-8B shapes (hidden 4096, intermediate 12288, 32/8 heads of 128), plus the
    torch reference and a plain device copy of the same bytes as yardsticks."""
    from triton.testing import do_bench

    from nanoforge.kernels import torch_ref

    dev = torch.device("cuda")
    t, hid, inter, hq, hk, d = tokens, 4096, 12288, 32, 8, 128
    es = torch.tensor([], dtype=dtype).element_size()
    gen = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=dev, dtype=torch.float32).to(dtype)

    x, res, w = rnd(t, hid), rnd(t, hid), rnd(hid)
    gate_up = rnd(t, 2 * inter)
    qkv = rnd(t, (hq + 2 * hk) * d)
    q, k = qkv[:, : hq * d], qkv[:, hq * d: (hq + hk) * d]
    qn, kn = rnd(d), rnd(d)
    pos = torch.randint(0, 32768, (t,), device=dev, generator=gen)
    attrs = dict(heads=hq, kv_heads=hk, q_head_dim=d, k_head_dim=d, rotary_dim=d, style="neox", theta=1e6)
    cases = {
        "add_rms_norm": (lambda m: m.add_rms_norm(x, res, w, 1e-6), 4 * t * hid * es),
        "silu_mul": (lambda m: m.silu_mul(gate_up[:, :inter], gate_up[:, inter:]), 3 * t * inter * es),
        "qk_norm_rope": (lambda m: m.qk_norm_rope(q, k, pos, qn, kn, 1e-6, **attrs), 2 * t * (hq + hk) * d * es),
    }
    out = {"tokens": t, "dtype": str(dtype).replace("torch.", ""), "device": torch.cuda.get_device_name(dev)}
    for name, (fn, nbytes) in cases.items():
        ms = do_bench(lambda: fn(E), warmup=25, rep=200, return_mode="median")
        ref_ms = do_bench(lambda: fn(torch_ref), warmup=25, rep=200, return_mode="median")
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        copy_ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
        out[name] = {"ms": ms, "GB/s": nbytes / ms / 1e6, "torch_ref_ms": ref_ms,
                     "copy_same_bytes_GB/s": nbytes / copy_ms / 1e6, "bytes": nbytes}
    return out
