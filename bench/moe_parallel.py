"""Decode throughput of MoE models of real layer sizes on one GPU vs several (issues 6 and 7),
random bf16 weights: tp=1 (with and without CUDA graphs), tp=N, and attention_dp=N x ffn_ep=N
with each EP exchange: all-gather (epN, the default), all-to-all (epN-a2a), DeepEP (epN-deepep;
its low-latency mode holds 128 tokens a rank, so --batch <= 128 x N there; a batch is split over
the N attention-DP replicas).

--model qwen3-30b-a3b (hidden 2048, 32 q / 4 kv heads of 128, 128 experts of 768, top-8, vocab
151936) or deepseek-v3 (hidden 7168, MLA, 256 experts of 2048 + 1 shared, top-8 of 8 groups,
first layer dense), cut to --layers layers so one card holds the 1-GPU reference (deepseek-v3:
--layers 3 is ~51 GB). Each layout runs in a fresh process (one torch.distributed world per
process). Decode tok/s = B * (M - 1) / (t(M) - t(1)): B prompts generated to M tokens and B
others of the same length to 1 token, so prefill cancels out (fresh prompts each time: no
prefix-cache hits). Every layout must produce the greedy tokens of tp=1 for its first prompts
(a check, not a timing). --profile prints rank 0's top CUDA and CPU ops over a few decode steps.

    python bench/moe_parallel.py [--model qwen3-30b-a3b] [--layers 8] [--layouts tp1 tp2 ep2]
                                 [--batch 64 256] [--out bench/results]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QWEN3_30B_A3B = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
                 "intermediate_size": 6144, "moe_intermediate_size": 768, "num_attention_heads": 32,
                 "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
                 "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 151936,
                 "rms_norm_eps": 1e-6, "rope_theta": 1000000, "max_position_embeddings": 40960,
                 "tie_word_embeddings": False, "attention_bias": False, "torch_dtype": "bfloat16",
                 "bos_token_id": None, "eos_token_id": None}
DEEPSEEK_V3 = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 7168,
               "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_attention_heads": 128,
               "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5,
               "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
               "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
               "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": True,
               "scoring_func": "sigmoid", "vocab_size": 129280, "rms_norm_eps": 1e-6, "rope_theta": 10000,
               "max_position_embeddings": 163840, "tie_word_embeddings": False, "attention_bias": False,
               "hidden_act": "silu", "torch_dtype": "bfloat16", "bos_token_id": None, "eos_token_id": None}
MODELS = {"qwen3-30b-a3b": QWEN3_30B_A3B, "deepseek-v3": DEEPSEEK_V3}  # real layer sizes; --layers cuts depth
EXCHANGES = {"": {}, "-a2a": {"moe_dispatch": "torch", "moe_combine": "torch"},  # all-gather (default), all-to-all
             "-deepep": dict.fromkeys(("moe_dispatch", "grouped_experts", "moe_combine"), "deep_ep")}  # batch <= 128


def layout_options(name: str) -> dict:
    """tpN, tp1-eager, epN (attention_dp=N x ffn_ep=N, all-gather exchange), epN-a2a, epN-deepep."""
    if name == "tp1-eager":
        return {"enforce_eager": True}
    n, dash, exchange = name[2:].partition("-")
    kind, suffix = name[:2], dash + exchange
    if kind == "tp" and n.isdigit() and not suffix:
        return {"tp": int(n)} if int(n) > 1 else {}
    if kind == "ep" and n.isdigit() and suffix in EXCHANGES:
        return {"attention_dp": int(n), "ffn_ep": int(n), "providers": EXCHANGES[suffix]}
    raise SystemExit(f"unknown layout {name!r}: tpN, tp1-eager, epN, epN-a2a or epN-deepep")


def gpus_of(name: str) -> int:
    opts = layout_options(name)
    return opts.get("tp", 1) * opts.get("attention_dp", 1)


CHECK_PROMPTS, CHECK_TOKENS = 4, 16
SMOKE = {  # --smoke: the same architectures, tiny, on the CPU
    "qwen3-30b-a3b": {"hidden_size": 64, "moe_intermediate_size": 32, "num_attention_heads": 4,
                      "num_key_value_heads": 2, "head_dim": 16, "num_experts": 8, "num_experts_per_tok": 2,
                      "vocab_size": 512},
    "deepseek-v3": {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_attention_heads": 4,
                    "num_key_value_heads": 4, "n_routed_experts": 8, "n_group": 2, "topk_group": 1,
                    "num_experts_per_tok": 2, "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8,
                    "qk_nope_head_dim": 8, "v_head_dim": 8, "vocab_size": 512}}


def child(model: str, layout: str, layers: int, batches: list[int], prompt_len: int, out_len: int, smoke: bool,
          profile: bool = False) -> dict:
    import torch

    from nanoforge import LLM, SamplingParams
    from nanoforge.models.random_checkpoint import RandomCheckpoint

    cfg = {**MODELS[model], "num_hidden_layers": layers, **(SMOKE[model] if smoke else {})}
    device = "cpu" if smoke else "cuda"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    ckpt = RandomCheckpoint(cfg, f"{model}-{layers}l", "f32" if smoke else "bf16", device=device)
    g = torch.Generator().manual_seed(0)
    fresh = lambda n: [torch.randint(0, cfg["vocab_size"], (prompt_len,), generator=g).tolist()  # noqa: E731
                       for _ in range(n)]
    prompts = fresh(CHECK_PROMPTS)
    start = time.perf_counter()
    opts = layout_options(layout)
    per_replica = -(-max(batches) // opts.get("attention_dp", 1))  # max_num_seqs is each DP replica's
    llm = LLM(ckpt, device=device, progress=False, max_num_seqs=per_replica, max_model_len=prompt_len + out_len + 16,
              **opts)
    res = {"layout": layout, "start_s": time.perf_counter() - start, "parallel": dataclasses.asdict(llm.plan.parallel),
           "providers": sorted({f"{n.op}={n.provider}" for _, n in llm.plan.module.nodes()
                                if n.op in ("moe", "grouped_experts", "moe_dispatch", "attention", "linear")})}
    greedy = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)  # noqa: E731
    res["check_tokens"] = [o.token_ids for o in llm.generate(prompts[:CHECK_PROMPTS], greedy(CHECK_TOKENS))]
    res["runs"] = []
    for b in batches:
        llm.generate(fresh(b), greedy(out_len))  # warm-up: the same run, so no kernel compiles inside the timed one
        times = {}
        for n in (1, out_len):
            sync()
            t0 = time.perf_counter()
            llm.generate(fresh(b), greedy(n))
            sync()
            times[n] = time.perf_counter() - t0
        tok_s = b * (out_len - 1) / (times[out_len] - times[1])
        res["runs"].append({"batch": b, "prefill_s": times[1], "total_s": times[out_len],
                            "decode_tok_s": tok_s, "decode_tok_s_per_gpu": tok_s / llm.plan.parallel.world,
                            "ms_per_step": 1e3 * (times[out_len] - times[1]) / (out_len - 1)})
        print(json.dumps(res["runs"][-1]), file=sys.stderr, flush=True)
    res["batches"] = dict(llm.metrics()["batches"])
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            llm.generate(fresh(max(batches)), greedy(8))
        for key in ("cuda_time_total", "cpu_time_total"):
            print(prof.key_averages().table(sort_by=key, row_limit=15), file=sys.stderr, flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--out-len", type=int, default=128)
    ap.add_argument("--model", choices=list(MODELS), default="qwen3-30b-a3b")
    ap.add_argument("--layouts", nargs="+", default=["tp1", "tp1-eager", "tp2", "ep2"],
                    help="tpN, tp1-eager, epN (attention-DP x FFN-EP, all-gather), epN-a2a, epN-deepep")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--timeout", type=float, default=400, help="seconds a layout's process may take")
    ap.add_argument("--profile", action="store_true", help="print rank 0's top ops (torch.profiler)")
    ap.add_argument("--smoke", action="store_true", help="a tiny config on the CPU: checks the script, times nothing")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        res = child(a.model, a.child, a.layers, a.batch, a.prompt_len, a.out_len, a.smoke, a.profile)
        print("RESULT " + json.dumps(res), flush=True)  # before the ranks stop: a hang there loses nothing
        return
    import torch

    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "NVSHMEM_DISABLE_NVLS": "1", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    results = {}
    for layout in a.layouts:
        if not a.smoke and torch.cuda.device_count() < gpus_of(layout):
            results[layout] = {"skipped": f"needs {gpus_of(layout)} GPUs"}
            continue
        argv = [sys.executable, __file__, "--child", layout, "--model", a.model, "--layers", str(a.layers), "--prompt-len",
                str(a.prompt_len), "--out-len", str(a.out_len), "--batch", *map(str, a.batch)] + ["--smoke"] * a.smoke + ["--profile"] * a.profile
        print(f"== {layout}", flush=True)
        p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
        try:
            out, _ = p.communicate(timeout=a.timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        results[layout] = json.loads(line[-1][7:]) if line else {"error": f"exit {p.returncode}"}
        if p.returncode != 0:
            results[layout]["exit"] = p.returncode  # e.g. killed after --timeout while stopping its ranks
    ref_name = next((n for n in ("tp1-eager", "tp1") if "check_tokens" in results.get(n, {})), None)
    ref = results[ref_name]["check_tokens"] if ref_name else None
    for r in results.values():
        if "check_tokens" in r:
            r[f"same_greedy_tokens_as_{ref_name}"] = r["check_tokens"] == ref
    base = {x["batch"]: x["decode_tok_s"] for x in results.get("tp1", {}).get("runs", [])}
    for r in results.values():
        for x in r.get("runs", []):
            if x["batch"] in base:
                x["ratio_to_tp1"] = x["decode_tok_s"] / base[x["batch"]]
    import triton

    doc = {"bench": "moe_parallel", "card": "cpu (smoke)" if a.smoke else torch.cuda.get_device_name(),
           "gpus": torch.cuda.device_count(),
           "versions": {"torch": torch.__version__, "triton": triton.__version__},
           "model": a.model, "config": {**MODELS[a.model], "num_hidden_layers": a.layers,
                                        **(SMOKE[a.model] if a.smoke else {}), "prompt_len": a.prompt_len,
                                        "out_len": a.out_len, "batches": a.batch, "weights": "random bf16"},
           "baseline": "tp1 (one GPU, CUDA graphs)", "results": results}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"moe_parallel-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(doc, indent=1))
    for name, r in results.items():
        for x in r.get("runs", []):
            print(f"{name:10s} batch {x['batch']:4d}: {x['decode_tok_s']:9.0f} tok/s "
                  f"({x['decode_tok_s_per_gpu']:8.0f}/GPU, {x['ms_per_step']:.2f} ms/step) "
                  f"x{x.get('ratio_to_tp1', float('nan')):.2f} of tp1")
        if "runs" not in r:
            print(name, r)
    print("wrote", path)


if __name__ == "__main__":
    main()
