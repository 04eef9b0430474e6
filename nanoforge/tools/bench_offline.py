"""`nanoforge bench offline`: the reference offline workload (the one peer engines publish figures for).

N sequences with input and output lengths uniform in their ranges (seeded), random token ids,
ignore_eos; output tokens / wall time, warm-up outside the timed region. The baseline, HF
transformers `generate` (batched, KV cache on), runs on the same prompts in the same process, in
the same dtype. `--model` is a preset (random weights), a checkpoint or a plan dir (run with the
checkpoint it was compiled from); `--dtype auto` is f32 on CPU (bf16 matmuls are many times slower
there) and, on CUDA, bf16 for a preset and the checkpoint's own dtype otherwise; a plan runs in the
dtype it was compiled for.
"""
from __future__ import annotations

import datetime as dt
import gc
import importlib.util
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..version import __version__
from ..errors import NanoForgeError
from ..ir.graph import DTYPE_BYTES


@dataclass
class OfflineWorkload:
    num_prompts: int = 256
    min_input: int = 100
    max_input: int = 1024
    min_output: int = 100
    max_output: int = 1024
    seed: int = 0

    def make(self, vocab: int) -> tuple[list[list[int]], list[int]]:
        g = torch.Generator().manual_seed(self.seed)
        ins = torch.randint(self.min_input, self.max_input + 1, (self.num_prompts,), generator=g).tolist()
        outs = torch.randint(self.min_output, self.max_output + 1, (self.num_prompts,), generator=g).tolist()
        prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in ins]
        return prompts, outs


def machine_info(device: str) -> dict[str, Any]:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "nanoforge": __version__}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def _busy_cpu_s() -> float | None:
    """CPU seconds all processes have run (every core), from /proc/stat; None off Linux."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None


def timed(fn) -> dict[str, Any]:
    """Run fn once: wall time, the garbage collector's pauses in it, plus the cores other processes kept
    busy meanwhile (a shared machine's noise: figures from runs where others used a core are not
    comparable to quiet ones)."""
    busy, mine = _busy_cpu_s(), time.process_time()
    pauses: list[float] = []
    began: list[float] = []

    def on_gc(phase: str, info: dict) -> None:  # the collector's pauses: they stall eager steps' launches
        if phase == "start":
            began.append(time.perf_counter())
        elif began:
            pauses.append(time.perf_counter() - began.pop())

    gc.callbacks.append(on_gc)
    start = time.perf_counter()
    try:
        fn()
    finally:
        elapsed = time.perf_counter() - start
        gc.callbacks.remove(on_gc)
    out: dict[str, Any] = {"time_s": elapsed, "gc_pauses": len(pauses), "gc_s": sum(pauses),
                           "gc_max_ms": 1000 * max(pauses, default=0.0)}
    if busy is not None and (after := _busy_cpu_s()) is not None:
        out["others_cores"] = max(0.0, (after - busy) - (time.process_time() - mine)) / elapsed
    return out


def _median(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["time_s"])[len(runs) // 2]


def load_nanoforge(model, prompts: list[list[int]], engine_opts: dict) -> tuple[Any, float]:
    """The engine, warmed up on a short prompt; (llm, start-up seconds)."""
    from ..llm import LLM
    from ..runtime.sampling_params import SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model, **engine_opts)
    startup = time.perf_counter() - t0
    warm = prompts[0][:16]  # its reply fits max_model_len however short the workload's outputs are
    room = engine_opts.get("max_model_len", len(warm) + 4) - len(warm)
    llm.generate([warm], SamplingParams(temperature=0, max_tokens=max(1, min(4, room)), ignore_eos=True),
                 use_tqdm=False)
    return llm, startup


def time_nanoforge(llm, prompts: list[list[int]], outs: list[int], progress: bool = True) -> dict[str, Any]:
    from ..runtime.sampling_params import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in outs]
    llm.engine.reset_prefix_cache()  # a repeat recomputes its prompts, as HF does
    results: list = []
    run = timed(lambda: results.extend(llm.generate(prompts, params, use_tqdm=progress)))
    generated = sum(len(r.token_ids) for r in results)
    assert generated == sum(outs), "ignore_eos run produced fewer tokens than asked"
    return {**run, "output_tokens": generated, "output_tok_s": generated / run["time_s"],
            "total_tok_s": (generated + sum(map(len, prompts))) / run["time_s"]}


def load_hf(config: dict | str, device: str, dtype: str):
    """HF transformers' model: random weights (from_config) for presets, the work does not depend
    on the values; else the checkpoint (a GGUF through transformers' own loader, dequantized)."""
    import transformers as tf

    torch_dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dtype]
    if isinstance(config, dict):
        cfg = tf.AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype)
    else:
        where = {"pretrained_model_name_or_path": str(config)}
        if Path(config).is_file():  # a .gguf: transformers' own GGUF loader (dequantizes)
            where = {"pretrained_model_name_or_path": str(Path(config).parent), "gguf_file": Path(config).name}
        try:
            model = tf.AutoModelForCausalLM.from_pretrained(**where, dtype=torch_dtype)
        except (OSError, ValueError, ImportError) as e:
            raise NanoForgeError(f"HF baseline: transformers cannot load {config} ({e}); --hf-num-prompts 0 "
                                 "skips the baseline") from e
    model = model.to(device).eval()
    model.generation_config.eos_token_id = None
    return model


def time_hf(model, prompts: list[list[int]], outs: list[int], batch_size: int, device: str) -> dict[str, Any]:
    """HF generate, greedy, KV cache on, left-padded batches of requests sorted by output length;
    a batch runs to its longest output, so throughput counts only the tokens the workload asked for."""
    order = sorted(range(len(prompts)), key=lambda i: outs[i])

    def run() -> None:
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.tensor([[0] * (width - len(prompts[i])) + prompts[i] for i in idx], device=device)
            mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx], device=device)
            n = max(outs[i] for i in idx)
            with torch.inference_mode():
                model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()

    out = timed(run)
    useful = sum(outs)
    return {**out, "output_tokens": useful, "output_tok_s": useful / out["time_s"], "batch_size": batch_size,
            "num_prompts": len(prompts)}


def bench_offline(model: str, workload: OfflineWorkload, engine_opts: dict, hf_num_prompts: int, hf_batch_size: int,
                  results_dir: Path, *, repeats: int = 1, progress: bool = True, gc_freeze: bool = False
                  ) -> dict[str, Any]:
    """Time nanoforge and HF `repeats` times each on the same prompts and report the median runs
    (every run is in the JSON). On the CPU both models stay loaded and the runs alternate, so a
    neighbour's load shifting mid-benchmark hits both; on CUDA the engine's memory is freed first.
    gc_freeze: move what is alive after start-up out of the collector's scans (gc.freeze) for the timed
    runs, to see what its pauses cost (each run reports them either way)."""
    from ..compiler import resolve_dtype
    from ..models.checkpoint import open_checkpoint
    from ..models.presets import PRESETS
    from ..models.random_checkpoint import preset_checkpoint
    from ..plan import read_plan
    from .roofline import measure_ceilings, simulate_ceiling, step_breakdown

    device = engine_opts.get("device") or "cpu"
    dtype = engine_opts.get("dtype", "auto")
    if model in PRESETS:
        source: Any = preset_checkpoint(model, dtype, device, flag="--model")
        config, hf_source, dtype = source.config, PRESETS[model], source.dtype
    elif (Path(model) / "plan.json").is_file():  # run as LLM(plan_dir) does: with its checkpoint
        plan = read_plan(model)
        if dtype not in ("auto", plan.dtype):
            raise NanoForgeError(f"--dtype {dtype}: plan {model} was compiled for {plan.dtype}; leave --dtype out, "
                                 f"or recompile it with --dtype {dtype}")
        source, config, hf_source, dtype = model, plan.config, plan.checkpoint.path, plan.dtype
        device = engine_opts.get("device") or plan.target.device  # a plan runs on its own device
    elif Path(model).exists():
        source = model
        config = open_checkpoint(model, config_only=True).config
        hf_source = model
        dtype = ("f32" if device == "cpu" else resolve_dtype("auto", config)) if dtype == "auto" else dtype
    else:
        raise NanoForgeError(f"--model {model!r}: not a preset ({', '.join(PRESETS)}), checkpoint or plan dir")
    engine_opts = {**engine_opts, "dtype": dtype}
    if hf_num_prompts and str(hf_source).lower().endswith(".gguf") and importlib.util.find_spec("accelerate") is None:
        raise NanoForgeError(f"HF baseline: transformers loads a GGUF ({Path(hf_source).name}) only with `accelerate` "
                             "installed: pip install accelerate, or pass --hf-num-prompts 0 to skip the baseline")
    if repeats < 1:
        raise NanoForgeError(f"--repeats must be at least 1; got {repeats}")
    prompts, outs = workload.make(int(config["vocab_size"]))
    result: dict[str, Any] = {
        "benchmark": "offline", "model": model, "dtype": dtype, "workload": asdict(workload),
        "engine_options": engine_opts, "repeats": repeats,
        "machine": machine_info(device), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "input_tokens": sum(map(len, prompts)), "requested_output_tokens": sum(outs), "gc_freeze": gc_freeze,
    }
    if model in PRESETS:
        result["weights"] = "random (the preset's config; the work does not depend on the values)"
    ceilings = measure_ceilings(device)  # before the engine takes the card's memory
    n_hf = min(hf_num_prompts, len(prompts))
    llm, startup = load_nanoforge(source, prompts, engine_opts)
    hf_model = load_hf(hf_source, device, dtype) if n_hf and device == "cpu" else None
    nf_runs, hf_runs = [], []
    first_step = len(llm.engine.metrics.step_times)  # the warm-up's steps stay out of the breakdown
    if gc_freeze:
        gc.collect()
        gc.freeze()
    for _ in range(repeats):
        nf_runs.append(time_nanoforge(llm, prompts, outs, progress))
        if hf_model is not None:
            hf_runs.append(time_hf(hf_model, prompts[:n_hf], outs[:n_hf], hf_batch_size, device))
    if gc_freeze:
        gc.unfreeze()
    info = llm.engine.runner_info()
    cfg = llm.engine.cfg  # the step the engine ran, whether asked for or its device's default
    result["step_tokens"] = {"max_num_batched_tokens": cfg.max_num_batched_tokens,
                             "max_prefill_chunk": cfg.max_prefill_chunk}
    result["nanoforge"] = {**_median(nf_runs), "startup_s": startup, "engine": llm.metrics(),
                           "warmup_s": info["warmup_s"], "cuda_graphs": info["cuda_graphs"], "runs": nf_runs}
    mem = llm.plan.memory
    result["ceilings"] = ceilings
    costs = dict(weight_bytes=mem.param_bytes, kv_bytes_per_token=mem.kv_bytes_per_token,
                 flops_per_token=2 * mem.param_bytes / DTYPE_BYTES[llm.plan.dtype],
                 bandwidth=ceilings["copy_bytes_per_s"], flops=ceilings["matmul_flop_per_s"])
    result["roofline"] = simulate_ceiling([len(p) for p in prompts], outs, max_num_seqs=llm.engine.cfg.max_num_seqs,
                                          **costs)
    result["step_breakdown"] = step_breakdown(llm.engine.metrics, since=first_step, **costs)
    result["fraction_of_ceiling"] = result["nanoforge"]["output_tok_s"] / result["roofline"]["output_tok_s"]
    del llm, source
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    if n_hf and hf_model is None:
        hf_model = load_hf(hf_source, device, dtype)
        hf_runs = [time_hf(hf_model, prompts[:n_hf], outs[:n_hf], hf_batch_size, device) for _ in range(repeats)]
    if hf_runs:
        result["hf"] = {**_median(hf_runs), "dtype": dtype, "runs": hf_runs}
        result["ratio_nanoforge_over_hf"] = result["nanoforge"]["output_tok_s"] / result["hf"]["output_tok_s"]
        result["ratio_per_repeat"] = [  # back to back on the CPU, so a quiet repeat compares like with like
            {"ratio": (h["time_s"] / h["output_tokens"]) / (n["time_s"] / n["output_tokens"]),
             "others_cores": max(n.get("others_cores", 0.0), h.get("others_cores", 0.0))}
            for n, h in zip(nf_runs, hf_runs)]
    del hf_model
    gc.collect()
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    label = model if model in PRESETS else Path(model).name
    path = results_dir / f"offline-{label}-{device}-{stamp}.json"
    path.write_text(json.dumps(result, indent=1))
    result["path"] = str(path)
    return result


# issue 15 point 4: the CPU path against HF generate, f32, same run. (name, preset, workload, HF batch)
CPU_SUITE: list[tuple[str, str, OfflineWorkload, int]] = [
    ("uniform-llama-tiny", "llama-tiny", OfflineWorkload(32, 64, 64, 64, 64), 32),  # a step is host overhead
    ("uniform-smollm2-135m", "smollm2-135m", OfflineWorkload(32, 64, 64, 64, 64), 32),
    ("ragged-smollm2-135m", "smollm2-135m", OfflineWorkload(32, 16, 256, 64, 64), 16),  # HF: padded batches
]


QUIET_CORES = 0.25  # a repeat during which other processes kept more than this busy is noisy


def bench_cpu_suite(results_dir: Path, repeats: int = 3, max_num_batched_tokens: int = 4096,
                    log=print) -> dict[str, Any]:
    """The three CPU workloads of CPU_SUITE, each written as its own offline JSON, plus a summary
    (offline-cpu-suite-*.json). Each ratio is the median over the quiet repeats (others kept under
    QUIET_CORES busy: two OpenMP threads slow down many-fold when a neighbour takes a core, and not
    equally for both engines), or over all repeats, flagged noisy, when none was quiet."""
    rows = {}
    for name, preset, w, hf_batch in CPU_SUITE:
        opts = {"device": "cpu", "dtype": "f32", "max_num_batched_tokens": max_num_batched_tokens,
                "max_prefill_chunk": max_num_batched_tokens, "max_model_len": w.max_input + w.max_output + 1,
                "progress": False}
        r = bench_offline(preset, w, opts, w.num_prompts, hf_batch, results_dir, repeats=repeats, progress=False)
        quiet = [x["ratio"] for x in r["ratio_per_repeat"] if x["others_cores"] < QUIET_CORES]
        ratios = sorted(quiet or [x["ratio"] for x in r["ratio_per_repeat"]])
        rows[name] = {"model": preset, "workload": asdict(w), "hf_batch_size": hf_batch,
                      "nanoforge_output_tok_s": r["nanoforge"]["output_tok_s"],
                      "hf_output_tok_s": r["hf"]["output_tok_s"], "ratio": ratios[len(ratios) // 2],
                      "quiet_repeats": len(quiet), "ratio_per_repeat": r["ratio_per_repeat"],
                      "result": Path(r["path"]).name}
        log(f"{name:<22} nanoforge {rows[name]['nanoforge_output_tok_s']:9.1f}  HF {rows[name]['hf_output_tok_s']:9.1f}"
            f" output tok/s (medians)  ratio {rows[name]['ratio']:5.2f} over {len(quiet) or len(ratios)} "
            f"{'quiet' if quiet else 'NOISY'} repeats")
    summary = {"benchmark": "offline-cpu-suite", "target_ratio": 3.0, "repeats": repeats,
               "machine": machine_info("cpu"), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "weights": "random, with each preset's config (smollm2-135m: SmolLM2-135M's)", "workloads": rows}
    path = results_dir / f"offline-cpu-suite-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(summary, indent=1))
    summary["path"] = str(path)
    return summary
