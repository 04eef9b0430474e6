"""DeepSeek sparse attention decode (issue 20): one DeepSeek-V3.2-shaped layer's attention at real dims
(128 heads, latent 512 + rope 64, indexer 64 heads x 128, top-k 2048; random weights and a random pool),
a decode step of `batch` sequences at each context: sparse (the Triton indexer + torch.topk, then the
Triton sparse MLA over the 2048 picked tokens) vs dense MLA (the Triton paged MLA decode over every
token), and the indexer + top-k alone; and sparse_fp8_index, the same Triton kernels over the pool of a
--index-kv-dtype fp8 plan (model-dtype entries, FP8 indexer keys with a scale per token). Each step runs
inside a CUDA graph, as the engine's decode does
(a capture that fails is recorded and the step timed eagerly), timed by triton's do_bench (median).
Goal in the issue: sparse >= 4x faster than dense at 64k.

With the GPU libraries importable on an SM90 card, the same run adds (each in a CUDA graph as above):
  * dense_flash_mla: FlashMLA's dense decode (libs/flash_mla_decode.py) over the same pool, the fastest
    dense baseline there is;
  * sparse_flash_mla: the Triton indexer + FlashMLA's SM90 sparse kernel (libs/flash_mla_sparse.py),
    what a bf16 plan runs where flash_mla imports;
  * over an FP8 copy of the layer's pool (--kv-dtype fp8: e4m3 entries and keys, an f32 scale per token):
    indexer_deep_gemm (DeepGEMM's fp8_paged_mqa_logits + torch.topk, libs/deep_gemm_indexer.py) beside
    indexer_triton_fp8 (the Triton indexer on the same keys), and sparse_fp8 = DeepGEMM's indexer + the
    Triton sparse MLA over FP8 entries, what an FP8-KV plan runs;
  * sparse_flash_mla_fp8_index: DeepGEMM's indexer + FlashMLA's sparse kernel through their providers'
    functions over a --index-kv-dtype fp8 pool (bf16 entries, FP8 keys fused with their scales), what a
    bf16 plan compiled with --index-kv-dtype fp8 runs on SM90; est_deep_gemm_plus_flash_mla (indexer_deep_gemm
    + sparse_flash_mla - indexer_topk, the estimate made before such plans existed) stays beside it.
A library that does not import (or another GPU) is recorded in `libs` with the reason.

Memory: the pool holds batch x context tokens of one layer, [latent | rope] bf16 (1152 B) plus the
indexer's bf16 key (256 B): 16 x 64k tokens = 1.5 GB; the FP8 copy 0.7 GB more, the FP8-keys copy 1.3 GB.

    python bench/dsa_decode.py --out bench/results/dsa_decode          # H100, ~1 min
    python bench/dsa_decode.py --smoke --out /tmp/dsa                  # CPU, Triton interpreter, tiny dims
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the smoke run: Triton's interpreter, set before any kernel module loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for bench.*

from bench.kv_fp8_accuracy import write_result  # noqa: E402
from nanoforge.kernels.context import TORCH_DTYPES, allocate_pool, make_context  # noqa: E402
from nanoforge.kv_contract import KVContract, KVLayer  # noqa: E402
from nanoforge.tools.bench_offline import machine_info  # noqa: E402

REAL = dict(hidden=7168, heads=128, nope=128, rope=64, v=128, r=512, index_heads=64, index_dim=128, topk=2048,
            block=64)
SMOKE = dict(hidden=64, heads=4, nope=16, rope=8, v=16, r=32, index_heads=8, index_dim=32, topk=16, block=16)
CONTRACT_DTYPES = {t: name for name, t in TORCH_DTYPES.items()}


def timed_ms(fn, device: torch.device, reps: int, graph: bool = True) -> tuple[float, str | None]:
    """Median ms of fn: CUDA graph replays (graph=False: eager calls) through do_bench on a GPU, with a note
    (None, "eager", or the capture's error when it ran eagerly instead); perf_counter over `reps` calls on
    the CPU."""
    fn()  # compile, fill caches (rope frequencies) outside any capture
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps * 1e3, "cpu (no graph)"
    import triton

    torch.cuda.synchronize()
    if not graph:
        return triton.testing.do_bench(fn, warmup=10, rep=reps, return_mode="median"), "eager"
    err = None
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
    except Exception as exc:  # noqa: BLE001 - recorded: the kernel is not graph safe
        err = f"capture failed: {type(exc).__name__}: {exc}"[:300]
        print(f"  {err}", flush=True)
        torch.cuda.synchronize()
        run = fn
    return triton.testing.do_bench(run, warmup=10, rep=reps, return_mode="median"), err


def layer_inputs(d: dict, batch: int, device: torch.device, g: torch.Generator) -> dict:
    """Random activations of one decode step and the layer's random weights (bf16; f32 on the CPU)."""
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32

    def rnd(*shape, std=1.0):
        return (std * torch.randn(*shape, generator=g)).to(device, dt)

    h = d["heads"]
    return dict(
        x=rnd(batch, d["hidden"]), q_idx=rnd(batch, d["index_heads"] * d["index_dim"]), k_idx=rnd(batch, d["index_dim"]),
        weights_proj=rnd(d["index_heads"], d["hidden"], std=d["hidden"] ** -0.5),
        k_norm=1 + rnd(d["index_dim"], std=0.1), k_norm_bias=rnd(d["index_dim"], std=0.1),
        q=rnd(batch, h * (d["nope"] + d["rope"])), latent=rnd(batch, d["r"]), k_rope=rnd(batch, d["rope"]),
        kv_b_proj=rnd(h * (d["nope"] + d["v"]), d["r"], std=d["r"] ** -0.5))


LIBS = ("flash_mla_decode", "flash_mla_sparse", "deep_gemm_indexer")


def load_libs(device: torch.device) -> tuple[dict, dict]:
    """The library adapters that run here ({name: module}) and why the others do not ({name: reason})."""
    mods, why = {}, {}
    for name in LIBS:
        if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
            why[name] = "needs an SM90 GPU"
            continue
        try:
            mods[name] = importlib.import_module(f"nanoforge.kernels.libs.{name}")
        except ImportError as exc:
            why[name] = str(exc)[:300]
    return mods, why


def random_fp8_keys(keys: torch.Tensor, key_scale: torch.Tensor, device: torch.device, g: torch.Generator) -> None:
    keys.copy_(torch.randn(keys.shape, generator=g).to(torch.bfloat16) if device.type != "cuda"
               else torch.randn(keys.shape, device=device, dtype=torch.bfloat16))  # a GB of keys: made on the card
    key_scale.uniform_(0.5, 1.5)


def fp8_copy(d: dict, pages: int, batch: int, device: torch.device, g: torch.Generator):
    """An FP8 DSA pool as --kv-dtype fp8 plans hold it (e4m3 entries and keys, f32 scales; keys fused with
    their scales per block, context.allocate_pool) with random contents."""
    contract = KVContract(d["block"], "fp8_e4m3", (KVLayer(0, "dsa", ((d["r"] + d["rope"],), (d["index_dim"],)), "",
                                                          ((1,), (1,))),), "f32")
    pool = allocate_pool(contract, batch * pages + 1, device)
    entry, keys, entry_scale, key_scale = pool[0]
    entry.view(torch.uint8).random_(0, 0x70)  # finite e4m3 codes of either magnitude up to 120
    random_fp8_keys(keys, key_scale, device, g)
    entry_scale.uniform_(0.004, 0.02)
    return pool


def fp8_index_copy(entries: torch.Tensor, d: dict, device: torch.device, g: torch.Generator):
    """A DSA pool as --index-kv-dtype fp8 plans hold it: `entries` (the model-dtype pool's, copied) beside
    e4m3 indexer keys fused with their f32 scales per block (context.allocate_pool), random."""
    layer = KVLayer(0, "dsa", ((d["r"] + d["rope"],), (d["index_dim"],)), "", ((1,),),
                    (CONTRACT_DTYPES[entries.dtype], "fp8_e4m3"))
    pool = allocate_pool(KVContract(d["block"], layer.dtypes[0], (layer,), "f32"), entries.shape[0], device)
    entry, keys, key_scale = pool[0]
    entry.copy_(entries)
    random_fp8_keys(keys, key_scale, device, g)
    return pool


def bench_context(d: dict, batch: int, context: int, device: torch.device, reps: int, seed: int = 0,
                  libs: dict | None = None) -> dict:
    from nanoforge.kernels.triton import dsa
    from nanoforge.kernels.triton.attention import attention as dense_attention

    g = torch.Generator().manual_seed(seed)
    dt = "bf16" if device.type == "cuda" else "f32"
    bs, pages = d["block"], -(-context // d["block"])
    contract = KVContract(bs, dt, (KVLayer(0, "dsa", ((d["r"] + d["rope"],), (d["index_dim"],))),))
    pool = allocate_pool(contract, batch * pages + 1, device)
    for t in pool[0]:  # a random cache: what earlier steps would have written
        t.normal_()
    order = (torch.randperm(batch * pages, generator=g) + 1).view(batch, pages).tolist()
    seqs = [(1, context, order[b]) for b in range(batch)]
    ctx = make_context(pool, bs, seqs, device)
    dense_ctx = make_context([(pool[0][0],)], bs, seqs, device)  # the same entries as a plain MLA pool
    w = layer_inputs(d, batch, device, g)
    idx = dict(heads=d["index_heads"], head_dim=d["index_dim"], rope_dim=d["rope"], style="interleaved",
               theta=10000.0, topk=d["topk"], scale=d["index_dim"] ** -0.5, eps=1e-6)
    mla = dict(heads=d["heads"], qk_nope_head_dim=d["nope"], qk_rope_head_dim=d["rope"], v_head_dim=d["v"],
               kv_lora_rank=d["r"], scale=(d["nope"] + d["rope"]) ** -0.5)
    pos = torch.full((batch,), context - 1, dtype=torch.long, device=device)

    def indexer():
        return dsa.indexer(w["x"], w["q_idx"], w["k_idx"], pos, w["weights_proj"], w["k_norm"], w["k_norm_bias"],
                           ctx=ctx, layer=0, **idx)

    def sparse():
        ids = indexer()
        return dsa.sparse_mla(w["q"], w["latent"], w["k_rope"], ids, w["kv_b_proj"], ctx=ctx, layer=0,
                              topk=d["topk"], **mla)

    def dense():
        return dense_attention(w["q"], w["latent"], w["k_rope"], ctx=dense_ctx, kind="mla", layer=0,
                           kv_b_proj=w["kv_b_proj"], **mla)

    index_ctx = make_context(fp8_index_copy(pool[0][0], d, device, g), bs, seqs, device)

    def sparse_fp8_index():  # the Triton kernels over a --index-kv-dtype fp8 pool
        ids = dsa.indexer(w["x"], w["q_idx"], w["k_idx"], pos, w["weights_proj"], w["k_norm"], w["k_norm_bias"],
                          ctx=index_ctx, layer=0, **idx)
        return dsa.sparse_mla(w["q"], w["latent"], w["k_rope"], ids, w["kv_b_proj"], ctx=index_ctx, layer=0,
                              topk=d["topk"], **mla)

    libs = libs or {}
    runs = [("dense_mla", dense), ("sparse", sparse), ("indexer_topk", indexer), ("sparse_fp8_index", sparse_fp8_index)]
    if "flash_mla_decode" in libs:
        runs.append(("dense_flash_mla", lambda: libs["flash_mla_decode"].attention(
            w["q"], w["latent"], w["k_rope"], ctx=dense_ctx, kind="mla", layer=0, kv_b_proj=w["kv_b_proj"], **mla)))
    if "flash_mla_sparse" in libs:
        def sparse_flash():
            return libs["flash_mla_sparse"].sparse_mla(w["q"], w["latent"], w["k_rope"], indexer(), w["kv_b_proj"],
                                                        ctx=ctx, layer=0, topk=d["topk"], **mla)
        runs.append(("sparse_flash_mla", sparse_flash))
    if "deep_gemm_indexer" in libs:
        fp8_ctx = make_context(fp8_copy(d, pages, batch, device, g), bs, seqs, device)

        def index_on(module, c):
            return lambda: module.indexer(w["x"], w["q_idx"], w["k_idx"], pos, w["weights_proj"], w["k_norm"],
                                          w["k_norm_bias"], ctx=c, layer=0, **idx)
        index_dg = index_on(libs["deep_gemm_indexer"], fp8_ctx)
        runs += [("indexer_deep_gemm", index_dg), ("indexer_triton_fp8", index_on(dsa, fp8_ctx)),
                 ("sparse_fp8", lambda: dsa.sparse_mla(w["q"], w["latent"], w["k_rope"], index_dg(), w["kv_b_proj"],
                                                       ctx=fp8_ctx, layer=0, topk=d["topk"], **mla))]
    if "deep_gemm_indexer" in libs and "flash_mla_sparse" in libs:
        def sparse_flash_fp8_index():  # what a bf16 plan with --index-kv-dtype fp8 runs on SM90: both providers
            ids = index_on(libs["deep_gemm_indexer"], index_ctx)()
            return libs["flash_mla_sparse"].sparse_mla(w["q"], w["latent"], w["k_rope"], ids, w["kv_b_proj"],
                                                        ctx=index_ctx, layer=0, topk=d["topk"], **mla)
        runs.append(("sparse_flash_mla_fp8_index", sparse_flash_fp8_index))
    row: dict = {"context": context, "batch": batch}
    if context <= d["topk"]:  # every token selected: sparse must equal dense (a correctness check)
        row["max_abs_diff_sparse_vs_dense"] = (sparse().float() - dense().float()).abs().max().item()
        if "flash_mla_sparse" in libs:
            diff = sparse_flash().float() - dense().float()
            row["max_abs_diff_sparse_flash_mla_vs_dense"] = diff.abs().max().item()
        # the FP8 keys pick every token too: the same entries, the same output
        diff = sparse_fp8_index().float() - dense().float()
        row["max_abs_diff_sparse_fp8_index_vs_dense"] = diff.abs().max().item()
        if "sparse_flash_mla_fp8_index" in dict(runs):
            diff = dict(runs)["sparse_flash_mla_fp8_index"]().float() - dense().float()
            row["max_abs_diff_sparse_flash_mla_fp8_index_vs_dense"] = diff.abs().max().item()
    for name, fn in runs:
        ms, note = timed_ms(fn, device, reps)
        row[f"{name}_ms"] = ms
        if note:
            row[f"{name}_note"] = note
    row["sparse_mla_ms"] = row["sparse_ms"] - row["indexer_topk_ms"]
    row["speedup_sparse_over_dense"] = row["dense_mla_ms"] / row["sparse_ms"]
    row["indexer_share_of_sparse"] = row["indexer_topk_ms"] / row["sparse_ms"]
    dense_ms, flash_ms = row["dense_mla_ms"], row.get("sparse_flash_mla_ms")
    row["speedup_sparse_fp8_index_over_dense"] = dense_ms / row["sparse_fp8_index_ms"]
    if (both_ms := row.get("sparse_flash_mla_fp8_index_ms")) is not None:
        row["speedup_sparse_flash_mla_fp8_index_over_dense"] = dense_ms / both_ms
        if "dense_flash_mla_ms" in row:
            row["speedup_sparse_flash_mla_fp8_index_over_dense_flash_mla"] = row["dense_flash_mla_ms"] / both_ms
    if flash_ms is not None:
        row["sparse_mla_flash_ms"] = flash_ms - row["indexer_topk_ms"]
        row["speedup_sparse_flash_mla_over_dense"] = dense_ms / flash_ms
        if "dense_flash_mla_ms" in row:
            row["speedup_sparse_flash_mla_over_dense_flash_mla"] = row["dense_flash_mla_ms"] / flash_ms
    if "indexer_deep_gemm_ms" in row:
        row["speedup_sparse_fp8_over_dense"] = dense_ms / row["sparse_fp8_ms"]
        if flash_ms is not None:
            est = row["est_deep_gemm_plus_flash_mla_ms"] = row["indexer_deep_gemm_ms"] + row["sparse_mla_flash_ms"]
            row["est_speedup_deep_gemm_plus_flash_mla_over_dense"] = dense_ms / est
    cache_bytes = sum(t.numel() * t.element_size() for t in pool[0])  # the model-dtype pool (the copies: docstring)
    row["pool_gib"] = cache_bytes / 2**30
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=None, help="default 8192 32768 65536")
    ap.add_argument("--batch", type=int, default=None, help="default 16")
    ap.add_argument("--reps", type=int, default=None, help="do_bench ms per timing on a GPU (default 100)")
    ap.add_argument("--smoke", action="store_true", help="tiny dims, two contexts, a couple of reps (CPU ok)")
    ap.add_argument("--out", default="bench/results/dsa_decode")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not a.smoke:
        ap.error("needs a CUDA GPU (or --smoke for the tiny CPU run)")
    d = SMOKE if a.smoke else REAL
    contexts = a.contexts or ([12, 40] if a.smoke else [2048, 8192, 32768, 65536])
    batch = a.batch or (2 if a.smoke else 16)
    reps = a.reps or (2 if a.smoke else 100)
    t0 = time.perf_counter()
    libs, libs_missing = load_libs(device)
    for name, why in libs_missing.items():
        print(f"dsa decode: {name} not timed ({why})", flush=True)
    rows = []
    for c in contexts:
        r = bench_context(d, batch, c, device, reps, libs=libs)
        rows.append(r)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # this context's pool, before the next one's
        check = f" | sparse vs dense max diff {r['max_abs_diff_sparse_vs_dense']:.3g}" \
            if "max_abs_diff_sparse_vs_dense" in r else ""
        print(f"dsa decode ctx {c:6d} batch {batch}: dense {r['dense_mla_ms'] * 1e3:8.1f} us | sparse "
              f"{r['sparse_ms'] * 1e3:8.1f} us (indexer+topk {r['indexer_topk_ms'] * 1e3:.1f} us, sparse mla "
              f"{r['sparse_mla_ms'] * 1e3:.1f} us) | speedup {r['speedup_sparse_over_dense']:.2f}x{check} | FP8 index "
              f"keys {r['sparse_fp8_index_ms'] * 1e3:.1f} us", flush=True)
        lib_parts = [f"{k[:-3]} {r[k] * 1e3:.1f} us" for k in ("dense_flash_mla_ms", "sparse_flash_mla_ms",
                                                               "indexer_deep_gemm_ms", "indexer_triton_fp8_ms",
                                                               "sparse_fp8_ms", "sparse_flash_mla_fp8_index_ms")
                     if k in r]
        if lib_parts:
            ratios = [f"{k[8:]} {r[k]:.2f}x" for k in r if k.startswith(("speedup_sparse_", "est_speedup"))
                      and k not in ("speedup_sparse_over_dense", "speedup_sparse_fp8_index_over_dense")]
            print(f"dsa decode ctx {c:6d} libs: {' | '.join(lib_parts)} | {' | '.join(ratios)}", flush=True)
    import triton

    longest = max(rows, key=lambda r: r["context"])
    result = {
        "bench": "dsa_decode", "smoke": a.smoke, "card": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "triton": triton.__version__}, "machine": machine_info(device.type),
        "config": {**d, "batch": batch, "contexts": contexts, "reps": reps, "dtype": "bf16" if device.type == "cuda" else "f32",
                   "timing": "CUDA graph replay, triton do_bench median" if device.type == "cuda" else "perf_counter mean"},
        "rows": rows,
        "ratio": {"speedup_at_longest_context": longest["speedup_sparse_over_dense"], "context": longest["context"],
                  "goal": ">= 4x at 65536", "goal_met": longest["context"] >= 65536
                  and longest["speedup_sparse_over_dense"] >= 4.0,
                  **{k: longest[k] for k in longest if k.startswith(("speedup_sparse_", "est_speedup_"))
                     and k != "speedup_sparse_over_dense"},
                  # the fastest plan there is: bf16 latents on FlashMLA's sparse kernel, FP8 keys on DeepGEMM's
                  **({"sparse_flash_mla_fp8_index_ms": longest["sparse_flash_mla_fp8_index_ms"],
                      "goal_met_sparse_flash_mla_fp8_index": longest["context"] >= 65536
                      and longest["speedup_sparse_flash_mla_fp8_index_over_dense"] >= 4.0}
                     if "sparse_flash_mla_fp8_index_ms" in longest else {})},
        "libs": {**{name: "timed" for name in libs}, **libs_missing},
        "wall_s": time.perf_counter() - t0,
    }
    print(f"dsa decode: speedup {longest['speedup_sparse_over_dense']:.2f}x at {longest['context']} "
          f"(goal >= 4x at 65536: {'met' if result['ratio']['goal_met'] else 'not met'}), {result['wall_s']:.0f} s")
    if "speedup_sparse_flash_mla_over_dense" in longest:
        vs_flash = longest.get("speedup_sparse_flash_mla_over_dense_flash_mla")
        print(f"dsa decode: with FlashMLA's sparse kernel {longest['speedup_sparse_flash_mla_over_dense']:.2f}x over the "
              f"Triton dense decode at {longest['context']}" + (f", {vs_flash:.2f}x over FlashMLA's dense decode"
                                                                if vs_flash else ""))
    if "speedup_sparse_flash_mla_fp8_index_over_dense" in longest:
        met = result["ratio"]["goal_met_sparse_flash_mla_fp8_index"]
        print(f"dsa decode: DeepGEMM's indexer on FP8 keys + FlashMLA's sparse kernel on bf16 latents "
              f"(--index-kv-dtype fp8) {longest['sparse_flash_mla_fp8_index_ms'] * 1e3:.1f} us, "
              f"{longest['speedup_sparse_flash_mla_fp8_index_over_dense']:.2f}x over the Triton dense decode at "
              f"{longest['context']} (goal: {'met' if met else 'not met'})")
    write_result(a.out, "dsa_decode" + ("-smoke" if a.smoke else ""), result)
    return result


if __name__ == "__main__":
    main()
