"""MLA prefill attention of one sequence on DeepSeek-V3's shapes (128 heads, q/k 128 + 64, v 128, latent
512 + rope 64, bf16, 64-token pages): the absorbed form on the Triton paged kernel (W_uk folded into q,
the kernel over the pool, W_uv after: what prefill ran before kernels/mla_prefill.py) against the
expanded form (kv_b_proj expansion + torch SDPA) as the engine runs it, with V as is (dv 128 != dk 192)
and zero-padded to 192 (mla_prefill.PAD_V_TO_QK), and SDPA alone on each fused backend. Eager (prefill
steps are not captured), do_bench median. Says which kernel SDPA picks by default (the profile's top
kernel) and how far each expanded result is from the absorbed one.

    python -m bench.kernels.mla_prefill --out bench/results/mla   # JSON: mla_prefill-<time>.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from nanoforge.kernels import mla_prefill
from nanoforge.kernels.triton.attention import paged_attention

NOPE, ROPE, VD, LATENT, PAGE = 128, 64, 128, 512, 64
CASES = [(4096, 4096), (1024, 4096), (2048, 8192), (64, 8192)]  # (query rows, context): fresh, after a prefix


def _ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def _top_kernel(fn) -> str:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    return max(kernels, key=lambda e: e.self_device_time_total).key[:120] if kernels else "?"


def bench_case(n: int, ctx_len: int, heads: int = 128, seed: int = 0) -> dict:
    """ms and TFLOP/s (causal QK^T over 192 + PV over 128 columns; the absorbed row counts its own
    576 / 512) of each way to attend n query rows at the end of a ctx_len-token context."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *shape, s=1.0: (torch.randn(*shape, generator=g) * s).to(dev, dt)  # noqa: E731
    q, entry = rnd(n, heads, NOPE + ROPE), rnd(ctx_len, LATENT + ROPE)
    w = rnd(heads, NOPE + VD, LATENT, s=LATENT ** -0.5)
    scale = (NOPE + ROPE) ** -0.5
    pairs = n * (ctx_len - n) + n * (n + 1) // 2  # (row, visible position) pairs
    flops = 2 * heads * pairs * (NOPE + ROPE + VD)
    pages = triton.cdiv(ctx_len, PAGE)
    cache = torch.zeros(pages + 1, PAGE, LATENT + ROPE, dtype=dt, device=dev)
    table = (torch.randperm(pages, generator=g) + 1).view(1, pages).to(torch.int32).to(dev)
    pos = torch.arange(ctx_len, device=dev)
    cache.view(-1, LATENT + ROPE)[table[0, pos // PAGE].long() * PAGE + pos % PAGE] = entry
    starts = torch.tensor([0, n], dtype=torch.int32, device=dev)
    lens = torch.tensor([ctx_len], dtype=torch.int32, device=dev)

    def absorbed():
        q_lat = torch.bmm(q[..., :NOPE].transpose(0, 1), w[:, :NOPE, :]).transpose(0, 1)
        o_lat = paged_attention(torch.cat([q_lat, q[..., NOPE:]], dim=-1), cache[:, :, None, :],
                                cache[:, :, None, :LATENT], starts, lens, table, scale=scale, max_query_len=n,
                                max_context_len=ctx_len)
        return torch.bmm(o_lat.transpose(0, 1), w[:, NOPE:, :].transpose(1, 2)).transpose(0, 1)

    ref = absorbed().float()
    absorbed_ms = _ms(absorbed)
    rows: dict = {"absorbed_triton": {"ms": absorbed_ms, "tflops_absorbed_dims": 2 * heads * pairs * (
        LATENT + ROPE + LATENT) / absorbed_ms / 1e9, "top_kernel": _top_kernel(absorbed),
        "max_abs_out": ref.abs().max().item()}}
    default = mla_prefill.PAD_V_TO_QK
    try:
        for pad in (False, True):
            mla_prefill.PAD_V_TO_QK = pad
            fn = lambda: mla_prefill.expanded_attention(q, entry, w, scale=scale, nope=NOPE)  # noqa: E731
            t = _ms(fn)
            rows["expanded" + ("_v_padded" if pad else "")] = {
                "ms": t, "tflops": flops / t / 1e9, "speedup_vs_absorbed": absorbed_ms / t,
                "max_abs_diff_vs_absorbed": (fn().float() - ref).abs().max().item(), "top_kernel": _top_kernel(fn)}
    finally:
        mla_prefill.PAD_V_TO_QK = default
    # SDPA alone, on the tensors expanded_attention hands it
    kv = F.linear(entry[:, :LATENT], w.reshape(-1, LATENT)).view(ctx_len, heads, NOPE + VD)
    k = torch.cat([kv[..., :NOPE], entry[:, None, LATENT:].expand(ctx_len, heads, ROPE)], dim=-1)
    v = kv[..., NOPE:].contiguous()
    as_bhsd = lambda x: x.view(1, x.shape[0], heads, x.shape[-1]).transpose(1, 2)  # noqa: E731
    bias = None if n == ctx_len else causal_lower_right(n, ctx_len)
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        for pad in (False, True):
            vv = F.pad(v, (0, NOPE + ROPE - VD)) if pad else v

            def sdpa(vv=vv, backend=backend):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(as_bhsd(q), as_bhsd(k), as_bhsd(vv), attn_mask=bias,
                                                          is_causal=bias is None, scale=scale)
            key = f"sdpa_{name}" + ("_v_padded" if pad else "")
            try:
                t = _ms(sdpa)
                rows[key] = {"ms": t, "tflops": flops / t / 1e9, "top_kernel": _top_kernel(sdpa)}
            except RuntimeError as e:  # the backend does not take these inputs
                rows[key] = {"error": str(e).splitlines()[0][:200]}
    return {"rows": n, "context": ctx_len, "heads": heads, "expanded_flops": flops, "kernels": rows}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="directory for mla_prefill-<time>.json")
    ap.add_argument("--heads", type=int, default=128)
    a = ap.parse_args(argv)
    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "cudnn": torch.backends.cudnn.version(), "cases": []}
    for n, c in CASES:
        case = bench_case(n, c, a.heads)
        doc["cases"].append(case)
        print(f"{n} rows / {c} context: " + ", ".join(f"{k} {v['ms']:.2f} ms" for k, v in case["kernels"].items()
                                                        if "ms" in v), flush=True)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        path = a.out / f"mla_prefill-{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps(doc, indent=1))
        print(f"wrote {path}")
    return doc


if __name__ == "__main__":
    main()
