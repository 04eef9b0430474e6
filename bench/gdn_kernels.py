"""Gated DeltaNet kernels (issue 19) at Qwen3.5-MoE's real head sizes (transformers' Qwen3_5MoeTextConfig
defaults: 16 key heads, 32 value heads, head dims 128, conv kernel 4), bf16 activations, f32 state:

  * decode step (us) of one gdn layer's core for batch 1 / 64 / 256: the Triton step kernels (conv update +
    recurrent delta rule + the gated norm in torch) replayed from a CUDA graph, vs the torch reference
    (hybrid_ref.gdn: a Python loop over sequences, eager, as the torch provider runs it)
  * prefill throughput (tokens/s) of the torch reference's chunked rule over one fresh 4096-token prompt
    (the Triton chunked prefill kernel is not written yet; prefill rows run this reference today)

Timed by triton's do_bench (median). Inputs are random; state rows continue random states.

    python bench/gdn_kernels.py --out bench/results/gdn_kernels     # H100, < 1 min
    python bench/gdn_kernels.py --smoke --out /tmp/gdn              # CPU, Triton interpreter, tiny dims
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the smoke run: Triton's interpreter, set before any kernel module loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for bench.*

from bench.dsa_decode import timed_ms  # noqa: E402
from bench.kv_fp8_accuracy import write_result  # noqa: E402
from nanoforge.kernels.context import make_context  # noqa: E402
from nanoforge.tools.bench_offline import machine_info  # noqa: E402

SMOKE = dict(k_heads=2, v_heads=4, k_head_dim=16, v_head_dim=8, conv_kernel=4)
BIG_BLOCK = 1 << 20  # gdn reads no KV: one block holds any context


def real_sizes() -> tuple[dict, str]:
    """Qwen3.5-MoE's GDN head sizes from the pinned transformers' config defaults (fallback: the same
    numbers, written down, when transformers is absent), and where they came from."""
    try:
        import transformers as tf

        c = tf.Qwen3_5MoeTextConfig()
        return dict(k_heads=c.linear_num_key_heads, v_heads=c.linear_num_value_heads, k_head_dim=c.linear_key_head_dim,
                    v_head_dim=c.linear_value_head_dim, conv_kernel=c.linear_conv_kernel_dim), \
            f"transformers {tf.__version__} Qwen3_5MoeTextConfig defaults"
    except (ImportError, AttributeError):
        return dict(k_heads=16, v_heads=32, k_head_dim=128, v_head_dim=128, conv_kernel=4), "fallback constants"


def gdn_inputs(sizes: dict, rows: int, slots: int, device: torch.device, g: torch.Generator) -> tuple:
    """(params, (qkv, z, b, a) as views of one fused projection, state pool (window, delta state))."""
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    hk, hv, dk, dv, kern = (sizes[k] for k in ("k_heads", "v_heads", "k_head_dim", "v_head_dim", "conv_kernel"))
    c = 2 * hk * dk + hv * dv

    def rnd(*shape, std=1.0):
        return (std * torch.randn(*shape, generator=g)).to(device)

    params = dict(conv=rnd(c, 1, kern, std=0.5).to(dt), dt_bias=rnd(hv), A_log=rnd(hv, std=0.5),
                  norm=(1 + rnd(dv, std=0.1)).to(dt))
    fused = rnd(rows, c + hv * dv + 2 * hv).to(dt)
    inputs = torch.split(fused, [c, hv * dv, hv, hv], dim=-1)
    state = (rnd(slots, c, kern - 1).to(dt).float(), rnd(slots, hv, dk, dv, std=0.1))
    return params, inputs, state


def bench_decode(sizes: dict, batch: int, device: torch.device, reps: int) -> dict:
    from nanoforge.kernels import torch_ref
    from nanoforge.kernels.triton import gdn_decode

    g = torch.Generator().manual_seed(batch)
    attrs = dict(layer=0, eps=1e-6, **sizes)
    params, inputs, state = gdn_inputs(sizes, batch, batch, device, g)
    slots = torch.randperm(batch, generator=g).tolist()
    seqs = [(1, 100 + i, [0]) for i in range(batch)]
    tri_ctx = make_context([], BIG_BLOCK, seqs, device, state=([state], slots))
    ref_state = tuple(t.clone() for t in state)
    ref_ctx = make_context([], BIG_BLOCK, seqs, device, state=([ref_state], slots))
    want = torch_ref.gdn(*inputs, ctx=ref_ctx, **params, **attrs)
    got = gdn_decode.gdn(*inputs, ctx=tri_ctx, **params, **attrs)  # from the same state rows: comparable
    err = (got.float() - want.float()).abs().max().item() / max(want.float().abs().max().item(), 1e-6)
    row: dict = {"batch": batch, "max_rel_diff_vs_reference": err}
    for name, fn, graph in (("triton", lambda: gdn_decode.gdn(*inputs, ctx=tri_ctx, **params, **attrs), True),
                            ("torch_ref", lambda: torch_ref.gdn(*inputs, ctx=ref_ctx, **params, **attrs), False)):
        ms, note = timed_ms(fn, device, reps, graph=graph)
        row[f"{name}_us"] = ms * 1e3
        if note:
            row[f"{name}_note"] = note
    row["speedup_triton_over_ref"] = row["torch_ref_us"] / row["triton_us"]
    return row


def bench_prefill(sizes: dict, tokens: int, device: torch.device, reps: int) -> dict:
    from nanoforge.kernels import hybrid_ref

    g = torch.Generator().manual_seed(tokens)
    attrs = dict(layer=0, eps=1e-6, **sizes)
    params, inputs, state = gdn_inputs(sizes, tokens, 1, device, g)
    ctx = make_context([], BIG_BLOCK, [(tokens, tokens, [0])], device, state=([state], [0]))
    ms, note = timed_ms(lambda: hybrid_ref.gdn(*inputs, ctx=ctx, **params, **attrs), device, reps, graph=False)
    return {"tokens": tokens, "chunk": hybrid_ref.CHUNK, "torch_ref_ms": ms, "torch_ref_tokens_per_s": tokens / (ms * 1e-3),
            "note": note}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="default 1 64 256")
    ap.add_argument("--prefill-tokens", type=int, default=None, help="default 4096")
    ap.add_argument("--reps", type=int, default=None, help="do_bench ms per timing on a GPU (default 100)")
    ap.add_argument("--smoke", action="store_true", help="tiny head sizes, small batches, a couple of reps (CPU ok)")
    ap.add_argument("--out", default="bench/results/gdn_kernels")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not a.smoke:
        ap.error("needs a CUDA GPU (or --smoke for the tiny CPU run)")
    sizes, source = (SMOKE, "smoke sizes") if a.smoke else real_sizes()
    batches = a.batch or ([1, 4] if a.smoke else [1, 64, 256])
    tokens = a.prefill_tokens or (128 if a.smoke else 4096)
    reps = a.reps or (2 if a.smoke else 100)
    t0 = time.perf_counter()
    decode = []
    for b in batches:
        r = bench_decode(sizes, b, device, reps)
        decode.append(r)
        print(f"gdn decode batch {b:4d}: triton {r['triton_us']:9.1f} us | torch_ref {r['torch_ref_us']:10.1f} us | "
              f"{r['speedup_triton_over_ref']:.1f}x | max rel diff {r['max_rel_diff_vs_reference']:.2e}", flush=True)
    prefill = bench_prefill(sizes, tokens, device, reps)
    print(f"gdn prefill {tokens} tokens (torch reference, chunk {prefill['chunk']}): {prefill['torch_ref_ms']:.2f} ms, "
          f"{prefill['torch_ref_tokens_per_s']:.0f} tokens/s", flush=True)
    import triton

    result = {
        "bench": "gdn_kernels", "smoke": a.smoke, "card": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "triton": triton.__version__}, "machine": machine_info(device.type),
        "config": {**sizes, "sizes_from": source, "batches": batches, "prefill_tokens": tokens, "reps": reps,
                   "dtype": "bf16 activations, f32 state" if device.type == "cuda" else "f32",
                   "timing": "triton: CUDA graph replay; torch_ref: eager; do_bench median" if device.type == "cuda"
                   else "perf_counter mean"},
        "decode": decode, "prefill": prefill,
        "ratio": {f"triton_speedup_batch_{r['batch']}": r["speedup_triton_over_ref"] for r in decode},
        "wall_s": time.perf_counter() - t0,
    }
    write_result(a.out, "gdn_kernels" + ("-smoke" if a.smoke else ""), result)
    return result


if __name__ == "__main__":
    main()
