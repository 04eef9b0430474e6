"""DeepSeek-V3 layers at real sizes on one GPU, FP8 against bf16 (issue 14): decode step time at
batch 1 / 64 / 128 (context 2k) and a 4k-token prefill, each against its floor.

The model is DeepSeek-V3's config (bench/moe_parallel.py's DEEPSEEK_V3: hidden 7168, MLA with 128
heads, 256 experts of 2048 top-8 + 1 shared, vocab 129280) cut to 1 dense layer + as many MoE
layers as the card holds, with random weights made on the GPU. FP8 weights are random bf16
block-quantized per tensor as DeepSeek ships them (e4m3 + one f32 scale per 128x128 block;
`--fp8-load quantize` instead quantizes a bf16 checkpoint at load, one expert at a time, the same
values). The FP8 model is freed before the
bf16 one is made; fewer bf16 layers fit, so the two are compared per layer.

How the layers are fitted to the card, the decode floor and the prefill FLOP counts:
bench/deepseek_layers_fit.py.

    python bench/deepseek_layers.py [--moe-layers FP8 [BF16]] [--batch 1 64 128] [--context 2048]
                                    [--prefill 4096] [--out bench/results/deepseek_layers]
    python bench/deepseek_layers.py --tiny --device cpu   # the same code paths, tiny, on the CPU
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, TypeVar

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the repo's bench and nanoforge packages
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# fit_layers, random_param: not used here, read as dl.* by tests/test_bench_deepseek_layers.py
from bench.deepseek_layers_fit import (GiB, decode_figures, fit_layers, head_time, memory_fit,  # noqa: E402, F401
                                       moe_op_probe, param_parts, prefill_figures, profile_kernels, random_param)
from bench.decode_step import graph_replay_time  # noqa: E402
from bench.moe_parallel import DEEPSEEK_V3  # noqa: E402
from nanoforge.compiler import CompileOptions  # noqa: E402
from nanoforge.facts import CudaGraphPlan, write  # noqa: E402
from nanoforge.kernels import fp8  # noqa: E402
from nanoforge.llm import open_model  # noqa: E402
from nanoforge.models.quant import FP8_BLOCK, scale_shape  # noqa: E402
from nanoforge.models.random_checkpoint import RandomCheckpoint  # noqa: E402
from nanoforge.models.tensor_info import TensorInfo  # noqa: E402
from nanoforge.plan import Plan  # noqa: E402
from nanoforge.runtime.engine import Engine, EngineConfig  # noqa: E402
from nanoforge.runtime.sampling_params import SamplingParams  # noqa: E402
from nanoforge.tools.bench_offline import machine_info  # noqa: E402
from nanoforge.tools.roofline import measure_ceilings  # noqa: E402
from nanoforge.version import __version__  # noqa: E402

TINY = {"hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128, "num_attention_heads": 2,
        "num_key_value_heads": 2, "q_lora_rank": 128, "kv_lora_rank": 128, "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 64, "v_head_dim": 64, "n_routed_experts": 16, "num_experts_per_tok": 4, "n_group": 4,
        "topk_group": 2, "vocab_size": 1024}  # DeepSeek-V3-shaped: FP8 dims in 128-blocks, kv_a_proj's 192 rows
# ending in a partial block as the real 576 do
DEFAULTS = {False: dict(batch=[1, 64, 128], context=2048, prefill=4096, steps=20, prefill_reps=3),
            True: dict(batch=[1, 4, 8], context=64, prefill=256, steps=4, prefill_reps=2)}
QUANT_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
FP8_SUFFIXES = tuple(f"{m}.weight" for m in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                                               "gate_proj", "up_proj", "down_proj"))  # DeepSeek-V3's FP8 tensors
GOALS = {"decode_b1_fraction_of_floor": 0.75, "prefill_gemm_tflops": 1000.0}


START = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - START:6.1f}s] {msg}", flush=True)


class RandomFP8Checkpoint(RandomCheckpoint):
    """DeepSeek-V3 as it ships: its linear weights block-FP8 (`<key>_scale_inv` f32 per 128x128
    block, quantization_config in the config). Each tensor is made in bf16 and quantized alone,
    on the device, so loading holds one tensor in f32 at a time, not a whole expert stack."""

    def __init__(self, config: dict[str, Any], name: str, seed: int = 0, device: str = "cpu"):
        super().__init__({**config, "quantization_config": QUANT_CONFIG}, name, "bf16", seed, device)
        self._scales: dict[str, torch.Tensor] = {}  # made with their weight, read after it
        for key, info in list(self.tensors.items()):
            if key.startswith("model.layers.") and key.endswith(FP8_SUFFIXES) and len(info.shape) == 2:
                self.tensors[key] = TensorInfo(key, info.shape, "F8_E4M3", "random")
                self.tensors[f"{key}_scale_inv"] = TensorInfo(f"{key}_scale_inv", scale_shape(info.shape, FP8_BLOCK),
                                                              "F32", "random")

    def _make(self, key: str, dtype: torch.dtype | None) -> torch.Tensor:
        base = key.removesuffix("_scale_inv")
        if self.tensors[base].dtype != "F8_E4M3":
            return super()._make(key, dtype)
        if key != base and base in self._scales:
            return self._scales.pop(base)
        q, s = fp8.quantize(super()._make(base, torch.bfloat16), FP8_BLOCK)
        if key == base:
            self._scales[base] = s
        return q if key == base else s


def free_memory(device: str) -> int | None:
    gc.collect()
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


# -- the engine -------------------------------------------------------------------------------------------
def make_checkpoint(kind: str, cfg: dict, device: str, fp8_load: str) -> tuple[Any, str]:
    """(checkpoint, compile quantize mode) of the FP8 or the bf16 model."""
    name = f"deepseek-v3-{cfg['num_hidden_layers']}l-{kind}"
    if kind == "fp8" and fp8_load == "shipped":
        return RandomFP8Checkpoint(cfg, name, device=device), "auto"
    return RandomCheckpoint(cfg, name, "bf16", device=device), "fp8" if kind == "fp8" else "none"


def compile_plan(ckpt: Any, quantize: str, device: str, max_seqs: int, max_tokens: int) -> Plan:
    opts = CompileOptions(quantize=quantize, device=device, max_num_seqs=max_seqs, max_num_batched_tokens=max_tokens)
    return open_model(ckpt, None, device, opts)[0]


def providers_of(plan: Plan) -> dict[str, Any]:
    """Which kernels ran: per op, the providers of its nodes, and why better-ranked ones were passed over."""
    ops = ("linear", "moe", "grouped_experts", "attention", "lm_head")
    used = {op: dict(Counter(n.provider or "torch" for _, n in plan.module.nodes() if n.op == op)) for op in ops}
    return {"by_op": {k: v for k, v in used.items() if v},
            "fallbacks": {op: why for op, why in plan.provider_notes.items() if op in ops}}


def run_decode(eng: Engine, plan: Plan, a: argparse.Namespace, device: str, sync: Callable[[], None],
               prompt: Callable[[int], list[int]], max_new: int, row_done: Callable[[dict], None]) -> None:
    """Grow one running batch through the sizes asked (1, then 63 more, ...): after each group's
    prefill, time engine steps (host included), graph replays (GPU only) and the head alone."""
    seqs = []
    params = eng.runner.params
    for b in sorted(set(a.batch)):
        while len(seqs) < b:
            seqs.append(eng.add_request(prompt(a.context), SamplingParams(temperature=0, max_tokens=max_new,
                                                                           ignore_eos=True)))
        while any(s.num_computed < s.num_prompt for s in seqs):
            eng.step()
        for _ in range(3):
            eng.step()
        sync()
        ctx0 = sum(s.num_tokens for s in seqs)
        start = time.perf_counter()
        for _ in range(a.steps):
            eng.step()
        sync()
        step_s = (time.perf_counter() - start) / a.steps
        ctx1 = sum(s.num_tokens for s in seqs)
        if any(s.finish_reason is not None for s in seqs):
            raise RuntimeError(f"a sequence finished during the batch-{b} timing: size the run's max_model_len")
        row = {"batch": b, "context_mean": (ctx0 + ctx1) / 2 / b, "step_s": step_s,
               "graph_replay_s": graph_replay_time(eng, b, a.steps) if device == "cuda" else None,
               "head_s": head_time(plan, params, b, device)}
        log(f"  batch {b:>3}: step {1e3 * step_s:.3f} ms, graph replay "
            f"{1e3 * (row['graph_replay_s'] or float('nan')):.3f} ms, head {1e3 * row['head_s']:.3f} ms")
        row_done(row)
    for s in seqs:
        eng.abort(s.seq_id)
    while eng.has_work():
        eng.step()


def run_prefill(eng: Engine, a: argparse.Namespace, device: str, sync: Callable[[], None],
                prompt: Callable[[int], list[int]]) -> dict[str, Any]:
    """Time fresh `a.prefill`-token prompts from admission to their first token (one step when
    max_num_batched_tokens and max_prefill_chunk allow), the first one a warm-up; then profile one."""
    def once() -> tuple[float, int]:
        seq = eng.add_request(prompt(a.prefill), SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        sync()
        start, steps = time.perf_counter(), 0
        while seq.num_output == 0:  # (a finished sequence's num_computed is reset)
            eng.step()
            steps += 1
        sync()
        t = time.perf_counter() - start
        while eng.has_work():
            eng.step()
        return t, steps
    runs = [once() for _ in range(a.prefill_reps + 1)][1:]
    times = sorted(t for t, _ in runs)
    res: dict[str, Any] = {"tokens": a.prefill, "steps_per_prompt": runs[0][1], "step_ms": [1e3 * t for t, _ in runs],
                           "step_s": times[len(times) // 2]}
    res["profile"] = profile_kernels(once, device)
    return res


def run_model(kind: str, a: argparse.Namespace, device: str, bw: float, deadline: float, result: dict,
              save: Callable[[], None]) -> None:
    """Fit, build, time and free one model (fp8 or bf16), filling `result` as it goes (saved after
    each phase: a run cut short keeps what it measured). A failure (an OOM, a kernel that cannot
    run) is recorded and ends this model only; its memory is freed and checked either way."""
    result.update(errors=[], moe_layers=None)
    free0 = free_memory(device)
    try:
        setup = fit_model(kind, a, device, bw, free0, result)
        save()
        measure_model(kind, a, device, bw, deadline, result, save, setup)
    except Exception as e:
        result["errors"].append(f"{type(e).__name__}: {str(e)[:500]}")
        log(f"{kind}: {result['errors'][-1]}")
    finally:
        free1 = free_memory(device)
        result["release"] = {"free_before_bytes": free0, "free_after_bytes": free1,
                             "released": None if free0 is None else free1 >= free0 - GiB}
        save()


def fit_model(kind: str, a: argparse.Namespace, device: str, bw: float, free0: int | None, result: dict) -> dict:
    """Layer count, KV pool and graph use of one model, from a plan of one dense + one MoE layer
    (exact bytes per part, the kernels the real plan picks) and its MoE op run alone."""
    cfg = {**DEEPSEEK_V3, **(TINY if a.tiny else {})}
    cuda, max_b, tokens = device == "cuda", max(a.batch), max(a.prefill, a.context)
    ckpt, quantize = make_checkpoint(kind, {**cfg, "num_hidden_layers": 2}, device, a.fp8_load)
    plan2 = compile_plan(ckpt, quantize, device, max_b, tokens)
    bs = plan2.kv_contract.block_size
    growth = len(a.batch) * (a.steps + 8) + -(-max_b * a.context // tokens) + 16  # tokens a sequence adds
    pool_tokens = bs * (max_b * (-(-(a.context + 2 * growth) // bs) + 1) + -(-a.prefill // bs) + 4)
    result["moe_op"] = moe_op_probe(plan2, device, sorted(set(a.batch) | {a.prefill}), bw)
    free_memory(device)  # the probe's layer of weights
    override = a.moe_layers[0 if kind == "fp8" or len(a.moe_layers) == 1 else 1] if a.moe_layers else None
    graphs = cuda and not a.eager
    if override is not None or not cuda or a.tiny:
        n_moe = override or 2
        result["fit"] = {"how": "--moe-layers" if override else "no fit (CPU or --tiny): 2 MoE layers"}
    else:
        n_moe, graphs_ok, result["fit"] = memory_fit(plan2, result["moe_op"], free0 - int(a.margin_gib * GiB),
                                                     pool_tokens, max_b, a.prefill, tokens, quantize == "fp8")
        graphs = graphs and graphs_ok
        if not graphs_ok:
            result["errors"].append("CUDA graphs off: with them not even one MoE layer fits (see moe_op transients)")
    result.update(moe_layers=n_moe, layers=n_moe + 1, kv_pool_tokens=pool_tokens, cuda_graphs=graphs,
                  max_model_len=max(a.context + 2 * growth, a.prefill + 16))
    log(f"{kind}: 1 dense + {n_moe} MoE layers ({result['fit']['how']}), CUDA graphs {graphs}")
    return {"cfg": {**cfg, "num_hidden_layers": n_moe + 1}, "tokens": tokens, "pool_tokens": pool_tokens,
            "graphs": graphs}


Built = TypeVar("Built")


def build_with_retry(build: Callable[[int], Built], n: int, device: str, errors: list[str]) -> tuple[Built, int]:
    """build(n); after an out-of-memory error (the fit is an estimate), once more with one MoE layer
    fewer, the failed attempt's memory freed first (outside the except block, whose traceback
    holds the half-built model's frames)."""
    for retry in (False, True):
        failed = None
        try:
            return build(n), n
        except torch.cuda.OutOfMemoryError as e:
            failed = f"out of memory with {n} MoE layers: {str(e)[:200]}"
        if retry or n <= 1:
            raise RuntimeError(failed)
        errors.append(failed + f"; retried with {n - 1}")
        log(errors[-1])
        free_memory(device)
        n -= 1
    raise AssertionError("unreachable")


def measure_model(kind: str, a: argparse.Namespace, device: str, bw: float, deadline: float, result: dict,
                  save: Callable[[], None], setup: dict) -> None:
    cuda, max_b, tokens, max_model_len = device == "cuda", max(a.batch), setup["tokens"], result["max_model_len"]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()

    def build(n_moe: int) -> tuple[Engine, Plan, list[int]]:
        ckpt, quantize = make_checkpoint(kind, {**setup["cfg"], "num_hidden_layers": n_moe + 1}, device, a.fp8_load)
        plan = compile_plan(ckpt, quantize, device, max_b, tokens)
        sizes = plan.cuda_graphs.sizes
        keep = sorted({next(s for s in sizes if s >= b) for b in a.batch if sizes and b <= sizes[-1]})
        if sizes:  # only the graphs the timed batches replay: each size costs kernel compiles at start-up
            write(plan.module, CudaGraphPlan(tuple(keep), None))
        return Engine(plan, ckpt, None, EngineConfig(
            device=device, kv_cache_memory=setup["pool_tokens"] * plan.memory.kv_bytes_per_token, max_num_seqs=max_b,
            max_num_batched_tokens=tokens, max_prefill_chunk=tokens, max_model_len=max_model_len,
            enforce_eager=not setup["graphs"]), progress=False), plan, keep
    (eng, plan, keep), n_moe = build_with_retry(build, result["moe_layers"], device, result["errors"])
    cfg = {**setup["cfg"], "num_hidden_layers": n_moe + 1}
    result.update(moe_layers=n_moe, layers=n_moe + 1)
    try:
        result.update(startup_s=time.perf_counter() - t0, runner=eng.runner_info(), providers=providers_of(plan),
                      graph_sizes_captured=keep if setup["graphs"] else [], param_bytes=plan.memory.param_bytes,
                      parts=param_parts(plan), kv_bytes_per_token=plan.memory.kv_bytes_per_token,
                      memory_after_start={"allocated": torch.cuda.memory_allocated(),
                                          "free": torch.cuda.mem_get_info()[0]} if cuda else None)
        log(f"{kind}: started in {result['startup_s']:.1f} s; providers {result['providers']['by_op']}")
        save()
        g = torch.Generator().manual_seed(0)
        prompt = lambda n: torch.randint(0, cfg["vocab_size"], (n,), generator=g).tolist()  # noqa: E731
        result["decode"] = []
        if time.monotonic() < deadline:
            def row_done(row: dict) -> None:
                result["decode"].append(decode_figures(row, result, cfg, bw))
                save()
            run_decode(eng, plan, a, device, sync, prompt, max_model_len - a.context - 1, row_done)
        else:
            result["errors"].append("decode skipped: past the wall budget")
        if time.monotonic() < deadline:
            log(f"{kind}: prefill {a.prefill} tokens")
            result["prefill"] = prefill_figures(run_prefill(eng, a, device, sync, prompt), result, cfg)
            log(f"  prefill {1e3 * result['prefill']['step_s']:.1f} ms, "
                f"{result['prefill']['gemm_tflops_step']:.1f} TFLOP/s (step)")
        else:
            result["errors"].append("prefill skipped: past the wall budget")
        result["engine_batches"] = dict(eng.metrics_summary()["batches"])
    finally:
        eng.close()


def ratios(models: dict) -> dict:
    """FP8 speed-up over bf16 per MoE layer (bf16 time / FP8 time; the bytes ratio is the ideal)."""
    f, h = models.get("fp8", {}), models.get("bf16", {})
    out: dict[str, Any] = {"decode_per_moe_layer": {}, "moe_op": {}}
    hrows = {r["batch"]: r for r in h.get("decode", [])}
    for r in f.get("decode", []):
        o = hrows.get(r["batch"])
        if o and r["per_moe_layer_s"] and o["per_moe_layer_s"]:
            out["decode_per_moe_layer"][str(r["batch"])] = {
                "fp8_speedup": o["per_moe_layer_s"] / r["per_moe_layer_s"],
                "bytes_ratio": o["floor_moe_layer_s"] / r["floor_moe_layer_s"]}
    for t, r in f.get("moe_op", {}).get("tokens", {}).items():
        o = h.get("moe_op", {}).get("tokens", {}).get(t)
        if o:
            out["moe_op"][t] = {"fp8_speedup": o["op_s"] / r["op_s"]}
    if f.get("prefill") and h.get("prefill"):
        out["prefill_per_moe_layer"] = {"fp8_speedup": h["prefill"]["per_moe_layer_s"] / f["prefill"]["per_moe_layer_s"]}
    return out


def goals_check(models: dict) -> dict:
    f = models.get("fp8", {})
    b1 = next((r for r in f.get("decode", []) if r["batch"] == 1), None)
    out: dict[str, Any] = {}
    if b1:
        x = b1["fraction_of_floor_graph"] or b1["fraction_of_floor_step"]
        out["decode_b1_fraction_of_floor"] = {"value": x, "goal": GOALS["decode_b1_fraction_of_floor"],
                                              "met": x >= GOALS["decode_b1_fraction_of_floor"],
                                              "clock": "graph replay" if b1["fraction_of_floor_graph"] else "engine step"}
    if f.get("prefill"):
        p = f["prefill"]
        x = p["gemm_tflops_kernels"] or p["gemm_tflops_step"]
        out["prefill_gemm_tflops"] = {"value": x, "goal": GOALS["prefill_gemm_tflops"],
                                      "met": x >= GOALS["prefill_gemm_tflops"],
                                      "clock": "GEMM kernels (profiler)" if p["gemm_tflops_kernels"] else "whole step"}
    return out


def notes_of(doc: dict) -> list[str]:
    notes = ["Random weights route near-uniformly: experts touched per decode step are the uniform-routing "
             "estimate 256 * (1 - (1 - 8/256)^batch) a layer; real routing is skewed and touches fewer.",
             "Per-MoE-layer times: step (graph replay where captured) minus the head (final norm + lm_head timed "
             "alone), split between layers by their share of the floor bytes (decode) or FLOPs (prefill): an "
             "estimate that assumes the dense and MoE layers run at the same fraction of their floor.",
             "Only the CUDA graphs of the timed batch sizes are captured (each size costs kernel compiles); "
             "the engine pads nothing for 1 / 64 / 128, which are planned sizes.",
             "Prefill GEMM FLOPs count the weights each token multiplies (attention projections incl. the "
             "non-absorbed kv_b_proj, dense MLP, router, shared expert, top-8 experts); attention's QK^T/PV "
             "FLOPs are reported apart."]
    if doc["config"]["fp8_load"] == "shipped":
        notes.append("FP8 weights are made as DeepSeek ships them (each tensor quantized alone, on the GPU); "
                     "quantize='fp8' on a bf16 checkpoint gives the same tensors (models/weights.py quantizes "
                     "each expert as it arrives; --fp8-load quantize).")
    for kind, m in doc["models"].items():
        if m.get("release", {}).get("released") is False:
            notes.append(f"{kind}: its memory did not all come back after it was freed (release: free bytes before "
                         "and after); the next model's fit used what was free.")
        probe = m.get("moe_op", {}).get("tokens", {})
        big = [t for t, r in probe.items() if r.get("transient_bytes", 0) > 2 * GiB and int(t) <= 256]
        if big:
            notes.append(f"{kind}: the MoE op allocates {probe[big[0]]['transient_bytes'] / GiB:.1f} GiB per call at "
                         f"{big[0]} tokens (experts widened per call?): it bounds the layers that fit and the "
                         "decode time.")
        notes += [f"{kind}: {e}" for e in m.get("errors", [])]
    return notes


def summary(doc: dict) -> None:
    print(f"\n{doc['card']}: copy bandwidth {doc['ceilings']['copy_bytes_per_s'] / 1e9:.0f} GB/s")
    print(f"{'model':6} {'layers':>7} {'batch':>5} {'step ms':>9} {'graph ms':>9} {'head ms':>8} {'MoE-layer ms':>12} "
          f"{'floor ms':>9} {'% floor':>8} {'% floor layers':>14}")
    pct = lambda x: f"{100 * x:.1f}" if x else "-"  # noqa: E731
    ms = lambda x: f"{1e3 * x:.3f}" if x else "-"  # noqa: E731
    for kind, m in doc["models"].items():
        for r in m.get("decode", []):
            print(f"{kind:6} {'1+' + str(m['moe_layers']):>7} {r['batch']:>5} {ms(r['step_s']):>9} "
                  f"{ms(r['graph_replay_s']):>9} {ms(r['head_s']):>8} {ms(r['per_moe_layer_s']):>12} "
                  f"{ms(r['floor_s']):>9} {pct(r['fraction_of_floor_graph'] or r['fraction_of_floor_step']):>8} "
                  f"{pct(r['fraction_of_floor_layers']):>14}")
        if p := m.get("prefill"):
            print(f"{kind:6} prefill {p['tokens']} tokens: {1e3 * p['step_s']:.1f} ms, GEMM {p['gemm_tflops_step']:.1f} "
                  f"TFLOP/s over the step, {p['gemm_tflops_kernels'] or float('nan'):.1f} over GEMM kernels "
                  f"(GEMM {1e3 * p['profile'].get('gemm_s', float('nan')):.1f} ms of "
                  f"{1e3 * p['profile'].get('kernel_s', float('nan')):.1f} ms kernel time)")
        if probe := m.get("moe_op", {}).get("tokens"):
            print(f"{kind:6} MoE op alone ({m['moe_op']['provider']}): " + ", ".join(
                f"{t} tok {1e3 * r['op_s']:.3f} ms ({100 * r['fraction_of_floor']:.0f}% of floor"
                + (f", {r['transient_bytes'] / GiB:.2f} GiB transient)" if "transient_bytes" in r else ")")
                for t, r in probe.items()))
        for e in m.get("errors", []):
            print(f"{kind:6} ! {e}")
    for b, r in doc["ratios"]["decode_per_moe_layer"].items():
        print(f"FP8 speed-up per MoE layer, decode batch {b}: x{r['fp8_speedup']:.2f} (bytes ratio x{r['bytes_ratio']:.2f})")
    if "prefill_per_moe_layer" in doc["ratios"]:
        print(f"FP8 speed-up per MoE layer, prefill: x{doc['ratios']['prefill_per_moe_layer']['fp8_speedup']:.2f}")
    for goal, g in doc["goals_check"].items():
        print(f"goal {goal}: {g['value']:.3g} vs {g['goal']:g} ({g['clock']}) -> {'met' if g['met'] else 'NOT met'}")


def versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"torch": torch.__version__, "cuda": torch.version.cuda, "nanoforge": __version__}
    for lib in ("triton", "deep_gemm", "flash_mla"):
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = None
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+")
    ap.add_argument("--context", type=int, help="prompt tokens of each decode sequence")
    ap.add_argument("--prefill", type=int, help="tokens of the timed prefill prompt")
    ap.add_argument("--steps", type=int, help="timed decode steps (and graph replays) per batch size")
    ap.add_argument("--prefill-reps", type=int)
    ap.add_argument("--moe-layers", type=int, nargs="+", metavar="N", help="MoE layers: FP8 [bf16] (default: fit)")
    ap.add_argument("--models", nargs="+", choices=["fp8", "bf16"], default=["fp8", "bf16"])
    ap.add_argument("--fp8-load", choices=["shipped", "quantize"], default="shipped",
                    help="shipped: an FP8 checkpoint as DeepSeek ships it; quantize: bf16 quantized at load")
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs")
    ap.add_argument("--margin-gib", type=float, default=2.0, help="free memory the layer fit leaves untouched")
    ap.add_argument("--budget-s", type=float, default=540, help="wall seconds after which phases are skipped")
    ap.add_argument("--tiny", action="store_true", help="a tiny DeepSeek-V3-shaped config (tests, the CPU)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "deepseek_layers"))
    a = ap.parse_args(argv)
    for k, v in DEFAULTS[a.tiny].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    start, device = time.monotonic(), a.device
    torch.manual_seed(0)
    cfg = {**DEEPSEEK_V3, **(TINY if a.tiny else {})}
    cfg.pop("num_hidden_layers", None)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"deepseek_layers-{time.strftime('%Y%m%d-%H%M%S')}.json"
    doc: dict[str, Any] = {
        "bench": "deepseek_layers", "card": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "device": device, "versions": versions(), "machine": machine_info(device),
        "config": {"model": cfg, "dense_layers": 1, "tiny": a.tiny, "batches": sorted(set(a.batch)),
                   "context": a.context, "prefill_tokens": a.prefill, "decode_steps": a.steps,
                   "prefill_reps": a.prefill_reps, "fp8_load": a.fp8_load,
                   "weights": "random N(0, 0.02) bf16; FP8 = those block-quantized (e4m3, 128x128 f32 scales)"},
        "goals": GOALS, "models": {}, "ratios": {}, "goals_check": {}, "notes": []}
    save = lambda: path.write_text(json.dumps(doc, indent=1, default=str))  # noqa: E731
    log(f"{doc['card']}: measuring copy bandwidth")
    doc["ceilings"] = measure_ceilings(device)
    bw = doc["ceilings"]["copy_bytes_per_s"]
    for kind in a.models:
        doc["models"][kind] = {"errors": []}
        if time.monotonic() > start + a.budget_s - 90:  # a model needs a minute or two to start and run
            doc["models"][kind]["errors"].append("skipped: past the wall budget")
            continue
        run_model(kind, a, device, bw, start + a.budget_s, doc["models"][kind], save)
    doc.update(ratios=ratios(doc["models"]), goals_check=goals_check(doc["models"]), wall_s=time.monotonic() - start)
    doc["notes"] = notes_of(doc)
    save()
    summary(doc)
    print("wrote", path, flush=True)
    return doc


if __name__ == "__main__":
    main()
