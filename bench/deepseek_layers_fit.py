"""bench/deepseek_layers.py's figures: the sizes of a plan's parts, the layer fit, the parts timed
apart (the MoE op alone at real size, the head, kernel time by class) and the floors and FLOP rates
of the measured rows. The CLI, the runs and the JSON are bench/deepseek_layers.py's.

Layer counts (`fit_layers`): from a 2-layer plan's exact param bytes, the card's free memory, the
KV pool (batch 128 x (2k + decode steps), 576 values a token a layer), the activations of a
4k-token step, the load transient and the MoE op's own transient, measured by calling the
plan's MoE kernel once on one real-size layer (an op that widens its FP8 experts per call shows
up there: then fewer layers, and no CUDA graphs if their pool would hold a second copy).

Decode floor: bytes a step must read (every weight but the embedding table, the experts it
touches: 256 * (1 - (1 - 8/256)^batch) a layer, an estimate for uniform routing, which random
weights give nearly; and the KV of every sequence) over the copy bandwidth measured in this run.
Per layer: the final norm and lm_head are timed alone (their own kernels, the engine's weights)
and subtracted; the MoE layers' share of the rest is estimated by their share of the floor bytes.
Prefill: one 4k-token step; GEMM FLOPs = 2 x tokens x the weights each token multiplies (8 experts
+ shared); TFLOP/s over the step and over the GEMM kernels' time from torch.profiler.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from types import SimpleNamespace
from typing import Any, Callable

import torch

from nanoforge.codegen import pysource
from nanoforge.codegen.providers import kernel_namespace
from nanoforge.ir.graph import DTYPE_BYTES
from nanoforge.ir.ops import OPS
from nanoforge.kernels import fp8
from nanoforge.kernels.context import TORCH_DTYPES
from nanoforge.plan import Plan
from nanoforge.tools.roofline import _time

GiB = 1 << 30
LAYER = re.compile(r"model\.layers\.(\d+)\.")
ATTENTION_KERNEL = re.compile(r"attn|attention|flash|mla|fmha|sdpa", re.I)  # before GEMM: "splitkv" is attention
GEMM_KERNEL = re.compile(r"gemm|gemv|matmul|nvjet|xmma|cutlass|wgmma|_gate_up_kernel|_down_kernel|_skinny_kernel|"
                         r"splitk|^aten::(mm|addmm|bmm|_scaled_mm|linear)$", re.I)
REAL_MOE_LAYERS = 58  # DeepSeek-V3: 61 layers, the first 3 dense


# -- sizes: bytes and FLOPs from a plan's params ---------------------------------------------------
def param_parts(plan: Plan) -> dict[str, Any]:
    """Bytes (as stored) and GEMM weight elements of the embedding, the head (final norm, lm_head)
    and each layer, experts apart: what the floors and FLOP counts are made of."""
    parts: dict[str, Any] = {"embed": 0, "head": 0, "other": 0, "head_params": 0, "layers": {}}
    for name, p in plan.module.params.items():
        numel = math.prod(int(d) for d in p.type.shape)
        size = DTYPE_BYTES[p.type.dtype] * numel
        matrix = numel if len(p.type.shape) >= 2 and not (p.quant or "").startswith("scale") else 0
        if (m := LAYER.match(name)) is not None:
            d = parts["layers"].setdefault(int(m[1]), {"bytes": 0, "expert_bytes": 0, "gemm_params": 0,
                                                       "expert_params": 0})
            experts = ".mlp.experts." in name
            d["expert_bytes" if experts else "bytes"] += size
            d["expert_params" if experts else "gemm_params"] += matrix
        elif "embed_tokens" in name:
            parts["embed"] += size
        elif name.startswith(("lm_head", "model.norm")):
            parts["head"] += size
            parts["head_params"] += matrix
        else:
            parts["other"] += size
    return parts


def expected_experts(batch: int, top_k: int, num_experts: int) -> float:
    """Distinct experts batch * top_k uniform picks touch (exact for batch 1: top-k are distinct)."""
    return num_experts * (1 - (1 - top_k / num_experts) ** batch)


def layer_floor_bytes(layer: dict[str, int], touched: float, num_experts: int, kv: float) -> float:
    return layer["bytes"] + layer["expert_bytes"] * touched / num_experts + kv


# -- the layer fit ---------------------------------------------------------------------------------
def fit_layers(avail: int, fixed: int, per_moe: int, kv_per_layer: int, load_extra: int, run_extra: int,
               graph_extra: int, max_moe: int) -> tuple[int, bool]:
    """(MoE layers, CUDA graphs) for the most layers with weights + max(load transient, KV + step
    transients) <= avail; graphs keep their pool's transient besides the eager steps', so a model
    whose MoE op needs a large transient may fit more (or only) without them. (1, False) if none fits."""
    def need(n: int, graphs: bool) -> int:
        return fixed + n * per_moe + max(load_extra, (n + 1) * kv_per_layer + run_extra + graph_extra * graphs)
    for graphs in (True, False):
        n = max((k for k in range(1, max_moe + 1) if need(k, graphs) <= avail), default=0)
        if n:
            return n, graphs
    return 1, False


def memory_fit(plan2: Plan, probe: dict, avail: int, pool_tokens: int, max_b: int, prefill: int, tokens: int,
               quantize_at_load: bool) -> tuple[int, bool, dict]:
    """fit_layers' terms from a plan of one dense + one MoE layer and its MoE op probe: the weights,
    the KV pool a layer, the load transient (the loader holds a stacked param's parts beside the
    stack; quantizing at load, the fp8 parts beside the stack and one expert in f32), a step's transients (the runner's activation
    estimate for `tokens` a step and reserve, workspaces, the MoE op's own at `prefill` tokens) and
    the graph pool's (the MoE op's at `max_b`). A failed probe counts as all the memory (nothing
    fits), a skipped one as nothing."""
    p2 = param_parts(plan2)
    kv_layer = plan2.memory.kv_bytes_per_token // len(plan2.kv_contract.layers) * pool_tokens
    unknown = avail if "error" in probe else 0
    prefill_tr, decode_tr = (probe.get("tokens", {}).get(str(t), {}).get("transient_bytes", unknown)
                             for t in (prefill, max_b))
    act, vocab = plan2.memory.activation_bytes_per_token, plan2.model.vocab_size
    stack = max(DTYPE_BYTES[p.type.dtype] * math.prod(int(d) for d in p.type.shape) for p in plan2.module.params.values())
    terms = {"avail_bytes": avail, "kv_bytes_per_layer": kv_layer,
             "fixed_bytes": p2["embed"] + p2["head"] + p2["other"] + p2["layers"][0]["bytes"]
             + p2["layers"][0]["expert_bytes"],
             "moe_layer_bytes": p2["layers"][1]["bytes"] + p2["layers"][1]["expert_bytes"]
             + probe.get("prepare_extra_bytes", 0),  # a provider's load-time copies (e.g. fused experts)
             "load_extra_bytes": (2 * stack if quantize_at_load else stack) + GiB // 2,
             "step_extra_bytes": 2 * act * tokens + 8 * max_b * vocab + GiB + prefill_tr + 3 * GiB // 2,
             "graph_extra_bytes": decode_tr + max_b * (act + 4 * vocab)}
    n, graphs = fit_layers(terms["avail_bytes"], terms["fixed_bytes"], terms["moe_layer_bytes"], kv_layer,
                           terms["load_extra_bytes"], terms["step_extra_bytes"], terms["graph_extra_bytes"],
                           REAL_MOE_LAYERS)
    return n, graphs, {"how": "memory_fit", **terms, "cuda_graphs": graphs}


# -- the MoE op alone, at real size ------------------------------------------------------------------
def random_param(p, device: torch.device) -> torch.Tensor:
    """A stand-in for a param of the plan, made in place an expert at a time (no f32 copy of a
    stack, no kernel over 2^31 elements): fp8 from random bytes (finite, >= 0), small scales."""
    shape = tuple(int(d) for d in p.type.shape)
    if (p.quant or "").startswith("scale"):
        return torch.full(shape, 2e-4, dtype=TORCH_DTYPES[p.type.dtype], device=device)
    f8 = p.type.dtype == "fp8_e4m3"
    t = torch.empty(shape, dtype=torch.uint8 if f8 else TORCH_DTYPES[p.type.dtype], device=device)
    for part in (t if t.dim() >= 3 else [t]):
        part.random_(0, 0x70) if f8 else part.normal_(0, 0.02)
    return t.view(fp8.FP8) if f8 else t


def _run_op(fn: Callable, x: torch.Tensor, params: dict, attrs: dict) -> None:
    with torch.inference_mode():
        fn(x, **params, **attrs)


def moe_op_probe(plan: Plan, device: str, tokens: list[int], bw: float, reps: int = 5) -> dict[str, Any]:
    """The plan's MoE kernel on one layer of random weights: the memory one call allocates beyond
    its inputs (what the layer fit must leave free) and its time per token count, vs its floor.
    The caller frees the weights (free_memory) once this returns."""
    node = next((n for _, n in plan.module.nodes() if n.op == "moe"), None)
    if node is None or OPS[node.op].needs_ctx:
        return {"skipped": "no moe node a plain call can run"}
    prov, dev, cuda = node.provider or "torch", torch.device(device), device == "cuda"
    fn = getattr(kernel_namespace({prov}), prov).moe
    out: dict[str, Any] = {"provider": prov, "clock": "eager calls (launches included)", "tokens": {}}
    try:
        named = {name: random_param(plan.module.params[name], dev) for name in node.params.values()}
        if prepare := getattr(pysource, "prepare_params", None):  # the load-time layout its kernels read
            before = torch.cuda.memory_allocated() if cuda else 0
            prepare([SimpleNamespace(name="moe", nodes=[node])], named)
            out["prepare_extra_bytes"] = max(torch.cuda.memory_allocated() - before, 0) if cuda else 0
        params = {slot: named[name] for slot, name in node.params.items()}
        del named
        info, attrs = plan.model, node.attrs
        top_k, num = attrs["top_k"], attrs["num_experts"]
        experts = sum(t.numel() * t.element_size() for s, t in params.items() if s.startswith("w_"))
        router = sum(t.numel() * t.element_size() for s, t in params.items() if not s.startswith("w_"))
        expert_params = sum(params[s].numel() for s in ("w_gate", "w_up", "w_down"))
        for t in tokens:
            x = torch.randn(t, info.hidden_size, dtype=TORCH_DTYPES[info.dtype], device=dev)
            row: dict[str, Any] = {}
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                _run_op(fn, x, params, attrs)
                torch.cuda.synchronize()
                row["transient_bytes"] = torch.cuda.max_memory_allocated() - base
            row["op_s"] = _time(lambda x=x: _run_op(fn, x, params, attrs), dev, reps)
            floor = (router + experts * expected_experts(t, top_k, num) / num + 2 * x.numel() * x.element_size()) / bw
            row.update(floor_s=floor, fraction_of_floor=floor / row["op_s"],
                       gemm_tflops=2 * t * top_k * expert_params / num / row["op_s"] / 1e12)
            out["tokens"][str(t)] = row
    except Exception as e:  # an OOM (or a kernel that cannot run): the fit then assumes nothing fits
        out["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return out


# -- the head and the kernels, timed apart ---------------------------------------------------------
def head_time(plan: Plan, params: dict[str, torch.Tensor], batch: int, device: str, reps: int = 10) -> float:
    """Seconds of the nodes after the last layer (final norm, lm_head) on `batch` rows, run alone
    with the plan's kernels and the engine's weights; nodes that read the batch context are skipped."""
    dev = torch.device(device)
    nodes = [n for _, n in plan.module.nodes() if not (n.source or "").startswith("model.layers.")
             and not OPS[n.op].needs_ctx]
    spaces = kernel_namespace({n.provider or "torch" for n in nodes})
    calls = []
    for n in nodes:
        args = []
        for v in n.inputs:
            shape = [batch if isinstance(d, str) else int(d) for d in v.type.shape]
            if v.type.dtype in ("i64", "i32"):
                args.append(torch.arange(batch, device=dev) if v.type.shape == ("S",) else
                            torch.zeros(shape, dtype=torch.long, device=dev))
            else:
                args.append(torch.randn(shape, dtype=TORCH_DTYPES[v.type.dtype], device=dev))
        kw = {slot: params[name] for slot, name in n.params.items()}
        calls.append((getattr(getattr(spaces, n.provider or "torch"), n.op), args, {**kw, **n.attrs}))

    def run() -> None:
        with torch.inference_mode():
            for fn, args, kw in calls:
                fn(*args, **kw)
    return _time(run, dev, reps)


def profile_kernels(fn: Callable[[], Any], device: str) -> dict[str, Any]:
    """Kernel time of one call by class (GEMM, attention, other) from torch.profiler: device time
    of the CUDA kernels on a GPU, self CPU time of the aten ops on the CPU. Never raises."""
    try:
        from torch.profiler import ProfilerActivity, profile

        cuda = device == "cuda"
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            fn()
            if cuda:
                torch.cuda.synchronize()
        sums, top = Counter(), []
        for e in prof.key_averages():
            attrs = ("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)
            us = next((float(v) for v in (getattr(e, k, None) for k in attrs) if v is not None), 0.0)
            name = str(e.key)
            if us <= 0 or (not cuda and not name.startswith("aten::")) or (cuda and name.startswith("cuda")):
                continue
            kind = "attention" if ATTENTION_KERNEL.search(name) else "gemm" if GEMM_KERNEL.search(name) else "other"
            sums[kind] += us / 1e6
            top.append((us / 1e6, name[:100], kind))
        top.sort(reverse=True)
        return {"clock": "cuda kernels" if cuda else "cpu aten self time", "gemm_s": sums["gemm"],
                "attention_s": sums["attention"], "other_s": sums["other"], "kernel_s": sum(sums.values()),
                "top": [{"name": n, "ms": 1e3 * s, "class": k} for s, n, k in top[:15]]}
    except Exception as e:  # a profiler that names or counts differently must not cost the run
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}


# -- floors and FLOP rates of the measured rows ----------------------------------------------------
def decode_figures(row: dict, model: dict, cfg: dict, bw: float) -> dict:
    """A decode row's bytes, floors and fractions (whole step, graph replay, layers without the head)."""
    parts, b = model["parts"], row["batch"]
    num, k = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    touched = expected_experts(b, k, num)
    layers = [parts["layers"][i] for i in sorted(parts["layers"])]
    kv = b * row["context_mean"] * model["kv_bytes_per_token"]
    kv_layer = kv / len(layers)
    layer_bytes = [layer_floor_bytes(layer, touched, num, kv_layer) for layer in layers]
    total = sum(layer_bytes) + parts["head"] + parts["other"]
    gpu_s = row["graph_replay_s"] or row["step_s"]
    layers_s = gpu_s - row["head_s"]
    moe_bytes = sum(x for x, layer in zip(layer_bytes, layers) if layer["expert_bytes"])
    n_moe = sum(1 for layer in layers if layer["expert_bytes"])
    per_moe = layers_s * moe_bytes / sum(layer_bytes) / max(n_moe, 1) if layers_s > 0 else None
    floor = total / bw
    return {**row, "expected_distinct_experts_per_layer": touched, "bytes_read": total, "kv_bytes": kv,
            "weight_bytes": total - kv, "floor_s": floor, "fraction_of_floor_step": floor / row["step_s"],
            "fraction_of_floor_graph": floor / row["graph_replay_s"] if row["graph_replay_s"] else None,
            "layers_s": layers_s, "floor_layers_s": sum(layer_bytes) / bw,
            "fraction_of_floor_layers": sum(layer_bytes) / bw / layers_s if layers_s > 0 else None,
            "per_layer_mean_s": layers_s / len(layers), "per_moe_layer_s": per_moe,
            "floor_moe_layer_s": moe_bytes / max(n_moe, 1) / bw}


def prefill_figures(res: dict, model: dict, cfg: dict) -> dict:
    """GEMM FLOPs of a prefill (2 x tokens x weights each token multiplies; lm_head on one row) and
    attention FLOPs (causal QK^T and PV), over the step and over the profiled GEMM kernel time."""
    parts, t, k = model["parts"], res["tokens"], cfg["num_experts_per_tok"]
    layers = [parts["layers"][i] for i in sorted(parts["layers"])]
    per_layer = [2 * t * (x["gemm_params"] + x["expert_params"] * k / cfg["n_routed_experts"]) for x in layers]
    gemm = sum(per_layer) + 2 * parts["head_params"]
    heads, qk = cfg["num_attention_heads"], cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    attn = len(layers) * heads * t * (t + 1) / 2 * 2 * (qk + cfg["v_head_dim"])
    prof = res.get("profile", {})
    moe_share = sum(f for f, x in zip(per_layer, layers) if x["expert_params"]) / sum(per_layer)
    n_moe = sum(1 for x in layers if x["expert_params"])
    return {**res, "gemm_flops": gemm, "attention_flops": attn, "gemm_tflops_step": gemm / res["step_s"] / 1e12,
            "all_tflops_step": (gemm + attn) / res["step_s"] / 1e12,
            "gemm_tflops_kernels": gemm / prof["gemm_s"] / 1e12 if prof.get("gemm_s") else None,
            "per_moe_layer_s": res["step_s"] * moe_share / max(n_moe, 1)}
