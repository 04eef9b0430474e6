"""Decode step time of a real model shape (random bf16 weights) against its floor: the bytes a
step must read (weights + KV of every sequence) over the copy bandwidth measured in this run.

    python bench/decode_step.py --model qwen3-8b --batch 1 64 --context 1024 --out bench/results
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import time
from pathlib import Path

import torch

from nanoforge import LLM, SamplingParams
from nanoforge.models.presets import PRESETS
from nanoforge.tools.bench_offline import machine_info
from nanoforge.models.random_checkpoint import RandomCheckpoint
from nanoforge.tools.roofline import measure_ceilings


def graph_replay_time(eng, batch: int, steps: int) -> float | None:
    """GPU seconds of one replay of the decode graph a batch of this size runs in (no host work)."""
    graphs = getattr(eng.runner, "graphs", None)
    size = next((s for s in (graphs.sizes if graphs else []) if s >= batch), None)
    if size is None or size not in graphs.graphs:
        return None
    graph = graphs.graphs[size][0]
    graph.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(steps):
        graph.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1000 / steps


def decode_step(llm: LLM, batch: int, context: int, steps: int = 30, profile: bool = False,
                mixed_chunk: int = 0, skip_prefill: bool = False) -> dict:
    """Time decode steps of `batch` sequences at `context` tokens. skip_prefill: the sequences enter
    as PD-migrated ones whose KV is already in the pool (its contents are whatever the pool holds),
    so long contexts cost no prefill; the decode kernels read the same bytes either way."""
    eng = llm.engine
    g = torch.Generator().manual_seed(batch)
    vocab = llm.plan.model.vocab_size
    sp = SamplingParams(temperature=0, max_tokens=steps + 100, ignore_eos=True)
    prompts = [torch.randint(0, vocab, (context,), generator=g).tolist() for _ in range(batch)]
    if skip_prefill:
        seqs = []
        for p in prompts:
            seq, first = eng.add_migrated(p + [0], context, sp, context)
            assert first is not None, "the pool cannot hold the batch's KV"
            eng.resume_migrated(seq, context)
            seqs.append(seq)
    else:
        seqs = [eng.add_request(p, sp) for p in prompts]
    while any(s.num_computed < len(s.prompt_ids) for s in seqs):  # prefill everything first
        eng.step()
    for _ in range(3):
        eng.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        eng.step()
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - start) / steps
    replay_s = graph_replay_time(eng, batch, steps)
    graphs = eng.runner.graphs
    if profile:  # where the host time of a step goes
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(10):
            eng.step()
        torch.cuda.synchronize()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    if profile and graphs is not None and batch in graphs.graphs:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                graphs.graphs[batch][0].replay()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    mixed = mixed_step(eng, mixed_chunk, vocab, profile) if mixed_chunk else None
    for s in seqs:
        eng.abort(s.seq_id)
    return {"step_s": step_s, "graph_replay_s": replay_s, "context": context + 5, "mixed": mixed}


def mixed_step(eng, chunk: int, vocab: int, profile: bool, reps: int = 4) -> dict:
    """Time the eager steps that prefill a fresh `chunk`-token prompt next to the running decode
    rows (the offline workload's mixed steps), and with --profile list their kernels."""
    g = torch.Generator().manual_seed(chunk)
    times = []
    for i in range(reps + 1):
        seq = eng.add_request(torch.randint(0, vocab, (chunk,), generator=g).tolist(),
                              SamplingParams(temperature=0, max_tokens=1))
        torch.cuda.synchronize()
        if profile and i == reps:
            from torch.profiler import ProfilerActivity, profile as torch_profile

            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                eng.step()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=70))
        else:
            prof = cProfile.Profile() if profile and i == reps - 1 else None  # where the host's time goes
            start = time.perf_counter()
            if prof:
                prof.enable()
            eng.step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            if prof:
                prof.disable()
                pstats.Stats(prof).sort_stats("tottime").print_stats(20)
        while eng.seqs.get(seq.seq_id) is not None and seq.finish_reason is None:
            eng.step()
    times = times[1:]  # the first may compile
    return {"chunk": chunk, "step_ms": [1000 * t for t in times], "tokens_per_s": chunk / (sum(times) / len(times))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3-8b", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--profile", action="store_true", help="print the kernels of 5 graph replays per batch size")
    ap.add_argument("--kv-dtype", nargs="+", default=["auto"], help="KV cache dtypes to time in this run, one "
                    "engine after the other (auto fp8: bf16 vs FP8 KV)")
    ap.add_argument("--skip-prefill", action="store_true", help="enter the sequences with their KV in place (as PD "
                    "migrated ones) instead of prefilling them: long contexts at no prefill cost")
    ap.add_argument("--mixed-chunk", type=int, default=0, help="also time steps that prefill a prompt of this many "
                    "tokens next to the decode rows")
    a = ap.parse_args()
    ceilings = measure_ceilings("cuda")
    bw = ceilings["copy_bytes_per_s"]
    ckpt = RandomCheckpoint(PRESETS[a.model], a.model, "bf16", device="cuda")
    rows, graphs = [], {}
    for kv_dtype in a.kv_dtype:
        llm = LLM(ckpt, device="cuda", progress=False, max_num_seqs=max(a.batch) + (1 if a.mixed_chunk else 0),
                  max_model_len=max(a.context, a.mixed_chunk) + 256, kv_dtype=kv_dtype,
                  max_num_batched_tokens=8192, max_prefill_chunk=8192)
        rows += _rows(llm, a, bw, kv_dtype)
        graphs[kv_dtype] = llm.engine.runner_info()["cuda_graphs"]
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    for kv_dtype in a.kv_dtype[1:]:  # each batch's step time against the first dtype's, same run
        for r in rows:
            base = next((x for x in rows if x["kv_dtype"] == a.kv_dtype[0] and x["batch"] == r["batch"]), None)
            if r["kv_dtype"] == kv_dtype and base and "step_s" in base and "step_s" in r:
                r[f"speedup_vs_{a.kv_dtype[0]}"] = base["step_s"] / r["step_s"]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "decode_step", "model": a.model, "machine": machine_info("cuda"), "ceilings": ceilings,
              "context": a.context, "skip_prefill": a.skip_prefill, "cuda_graphs": graphs, "rows": rows}
    (out / f"decode_step-{a.model}-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(result, indent=1))


def _rows(llm: LLM, a: argparse.Namespace, bw: float, kv_dtype: str) -> list[dict]:
    info, mem = llm.plan.model, llm.plan.memory
    embed = 2 * info.vocab_size * info.hidden_size
    tied = PRESETS[a.model].get("tie_word_embeddings", False)
    weight_bytes = mem.param_bytes - (0 if tied else embed)  # the embedding table is not read
    rows = []
    for b in a.batch:
        if b * (a.context + 64) > llm.engine.kv_cache["tokens"]:
            print(f"{a.model} batch {b} at {a.context} tokens: does not fit {llm.engine.kv_cache['tokens']:,} "
                  f"KV tokens ({kv_dtype}); skipped")
            rows.append({"batch": b, "kv_dtype": kv_dtype, "skipped": "KV does not fit",
                         "kv_tokens": llm.engine.kv_cache["tokens"]})
            continue
        r = decode_step(llm, b, a.context, profile=a.profile, mixed_chunk=a.mixed_chunk, skip_prefill=a.skip_prefill)
        kv = b * r["context"] * mem.kv_bytes_per_token
        floor = (weight_bytes + kv) / bw
        r.update(batch=b, kv_dtype=kv_dtype, kv_cache=llm.engine.kv_cache, bytes_moved=weight_bytes + kv,
                 floor_s=floor, fraction_of_floor=floor / r["step_s"],
                 fraction_of_floor_graph_only=(floor / r["graph_replay_s"]) if r["graph_replay_s"] else None)
        rows.append(r)
        print(f"{a.model} kv {kv_dtype} batch {b:>3}: step {1000 * r['step_s']:.3f} ms (graph replay "
              f"{1000 * (r['graph_replay_s'] or float('nan')):.3f} ms), floor {1000 * floor:.3f} ms "
              f"-> {100 * r['fraction_of_floor']:.1f}% of bytes/bandwidth")
        if r["mixed"]:
            print(f"  + {r['mixed']['chunk']}-token prefill: step ms {[round(t, 2) for t in r['mixed']['step_ms']]} "
                  f"({r['mixed']['tokens_per_s']:.0f} prefill tok/s)")
    return rows


if __name__ == "__main__":
    main()
