"""Gated DeltaNet kernels (issue 19) at Qwen3.5-MoE's real head sizes (transformers' Qwen3_5MoeTextConfig
defaults: 16 key heads, 32 value heads, head dims 128, conv kernel 4), bf16 activations, f32 state:

  * decode step (us) of one gdn layer's core for batch 1 / 64 / 256: the Triton step kernels (conv update +
    recurrent delta rule + the gated norm in torch) replayed from a CUDA graph, vs the torch reference
    (hybrid_ref.gdn: a Python loop over sequences, eager, as the torch provider runs it)
  * prefill throughput (tokens/s) of one fresh prompt of 4096 / 16384 tokens through the gdn op's prefill
    path (kernels/triton/gdn_prefill.py: varlen conv, the chunked rule's two kernels, the gated norm in
    torch; eager; its host tables are made once a step for all gdn layers, so outside the timing) for
    chunks of 32 / 64 tokens (and, at the default chunk, 16 / 32 value dims per program of the
    sequential kernel), vs the torch reference's chunked rule; the fastest setting per prompt length is
    printed last (gdn_prefill.CHUNK / BLOCK_V should follow it)

Timed by triton's do_bench (median). Inputs are random; decode state rows continue random states.

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


def bench_prefill(sizes: dict, tokens: int, device: torch.device, reps: int,
                  settings: list[tuple[int, int]]) -> list[dict]:
    """One fresh `tokens`-token prompt: the torch reference, then the Triton path per (chunk, block_v),
    each checked against the reference's output first."""
    from nanoforge.kernels import hybrid_ref
    from nanoforge.kernels.triton import gdn_prefill

    g = torch.Generator().manual_seed(tokens)
    attrs = dict(layer=0, eps=1e-6, **sizes)
    params, inputs, state = gdn_inputs(sizes, tokens, 1, device, g)
    ctx = make_context([], BIG_BLOCK, [(tokens, tokens, [0])], device, state=([state], [0]))
    want = hybrid_ref.gdn(*inputs, ctx=ctx, **params, **attrs).float()
    ref_ms, note = timed_ms(lambda: hybrid_ref.gdn(*inputs, ctx=ctx, **params, **attrs), device, reps, graph=False)
    rows = [{"tokens": tokens, "kernel": "torch_ref", "chunk": hybrid_ref.CHUNK, "ms": ref_ms,
             "tokens_per_s": tokens / (ref_ms * 1e-3), "note": note}]
    for chunk, block_v in settings:
        tables = gdn_prefill.prefill_tables([(0, tokens, 0, True)], chunk, device)  # made once a step, as the op

        def run(tables=tables, block_v=block_v):
            return gdn_prefill.gdn_prefill(*inputs, params, attrs, pool=state, tables=tables, block_v=block_v)

        row = {"tokens": tokens, "kernel": "triton", "chunk": chunk, "block_v": block_v}
        try:
            got = run().float()
            row["max_rel_diff_vs_reference"] = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-6)
            ms, note = timed_ms(run, device, reps, graph=False)
        except Exception as exc:  # noqa: BLE001 - recorded (e.g. out of shared memory), the others still run
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            print(f"gdn prefill {tokens} tokens chunk {chunk} block_v {block_v}: {row['error']}", flush=True)
            rows.append(row)
            continue
        row.update(ms=ms, tokens_per_s=tokens / (ms * 1e-3), speedup_over_ref=ref_ms / ms, note=note)
        rows.append(row)
    return rows


def print_prefill(rows: list[dict]) -> None:
    ref = rows[0]
    print(f"gdn prefill {ref['tokens']} tokens torch_ref (chunk {ref['chunk']}): {ref['ms']:.2f} ms, "
          f"{ref['tokens_per_s']:.0f} tokens/s", flush=True)
    for r in rows[1:]:
        if "ms" in r:
            print(f"gdn prefill {r['tokens']} tokens triton chunk {r['chunk']:3d} block_v {r['block_v']:2d}: "
                  f"{r['ms']:.3f} ms, {r['tokens_per_s']:.0f} tokens/s, {r['speedup_over_ref']:.1f}x ref | "
                  f"max rel diff {r['max_rel_diff_vs_reference']:.2e}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="default 1 64 256")
    ap.add_argument("--prefill-tokens", type=int, nargs="+", default=None, help="default 4096 16384")
    ap.add_argument("--chunks", type=int, nargs="+", default=None, help="prefill chunk sizes (default 32 64)")
    ap.add_argument("--reps", type=int, default=None, help="do_bench ms per timing on a GPU (default 100)")
    ap.add_argument("--smoke", action="store_true", help="tiny head sizes, small batches, a couple of reps (CPU ok)")
    ap.add_argument("--out", default="bench/results/gdn_kernels")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not a.smoke:
        ap.error("needs a CUDA GPU (or --smoke for the tiny CPU run)")
    bad = [c for c in a.chunks or [] if c < 16 or c & (c - 1)]
    if bad:
        ap.error(f"--chunks {bad}: each must be a power of two >= 16")
    from nanoforge.kernels.triton import gdn_prefill

    sizes, source = (SMOKE, "smoke sizes") if a.smoke else real_sizes()
    batches = a.batch or ([1, 4] if a.smoke else [1, 64, 256])
    token_counts = a.prefill_tokens or ([48] if a.smoke else [4096, 16384])
    chunks = a.chunks or ([16, 32] if a.smoke else [32, 64])
    block_vs = [16] if a.smoke else [16, 32]
    settings = [(c, gdn_prefill.BLOCK_V) for c in chunks]
    settings += [(gdn_prefill.CHUNK, bv) for bv in block_vs if (gdn_prefill.CHUNK, bv) not in settings]
    reps = a.reps or (2 if a.smoke else 100)
    t0 = time.perf_counter()
    decode = []
    for b in batches:
        r = bench_decode(sizes, b, device, reps)
        decode.append(r)
        print(f"gdn decode batch {b:4d}: triton {r['triton_us']:9.1f} us | torch_ref {r['torch_ref_us']:10.1f} us | "
              f"{r['speedup_triton_over_ref']:.1f}x | max rel diff {r['max_rel_diff_vs_reference']:.2e}", flush=True)
    prefill, best = [], {}
    for tokens in token_counts:
        rows = bench_prefill(sizes, tokens, device, reps, settings)
        print_prefill(rows)
        prefill += rows
        timed = [r for r in rows[1:] if "ms" in r]
        if timed:
            best[tokens] = min(timed, key=lambda r: r["ms"])
    for tokens, r in best.items():
        print(f"gdn prefill {tokens} tokens fastest: chunk {r['chunk']} block_v {r['block_v']} "
              f"({r['tokens_per_s']:.0f} tokens/s, {r['speedup_over_ref']:.1f}x ref; defaults chunk "
              f"{gdn_prefill.CHUNK} block_v {gdn_prefill.BLOCK_V})", flush=True)
    import triton

    result = {
        "bench": "gdn_kernels", "smoke": a.smoke,
        "card": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "triton": triton.__version__}, "machine": machine_info(device.type),
        "config": {**sizes, "sizes_from": source, "batches": batches, "prefill_tokens": token_counts,
                   "prefill_settings": settings, "reps": reps,
                   "dtype": "bf16 activations, f32 state" if device.type == "cuda" else "f32",
                   "timing": "decode: triton CUDA graph replay, torch_ref eager; prefill: eager; do_bench median"
                   if device.type == "cuda" else "perf_counter mean"},
        "decode": decode, "prefill": prefill,
        "prefill_fastest": {str(t): {k: r[k] for k in ("chunk", "block_v", "tokens_per_s")} for t, r in best.items()},
        "ratio": {**{f"triton_speedup_batch_{r['batch']}": r["speedup_triton_over_ref"] for r in decode},
                  **{f"triton_prefill_speedup_{t}_tokens": r["speedup_over_ref"] for t, r in best.items()}},
        "wall_s": time.perf_counter() - t0,
    }
    write_result(a.out, "gdn_kernels" + ("-smoke" if a.smoke else ""), result)
    return result


if __name__ == "__main__":
    main()
