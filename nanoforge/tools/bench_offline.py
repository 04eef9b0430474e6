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
            "cpu_count": os.cpu_count(), "nanoforge": __version__}
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


def run_nanoforge(model, prompts: list[list[int]], outs: list[int], engine_opts: dict) -> tuple[dict, Any]:
    from ..llm import LLM
    from ..runtime.sampling_params import SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model, **engine_opts)
    startup = time.perf_counter() - t0
    llm.generate([prompts[0][:16]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in outs]
    start = time.perf_counter()
    results = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    generated = sum(len(r.token_ids) for r in results)
    assert generated == sum(outs), "ignore_eos run produced fewer tokens than asked"
    info = llm.engine.runner_info()
    out = {"time_s": elapsed, "output_tokens": generated, "output_tok_s": generated / elapsed,
           "total_tok_s": (generated + sum(map(len, prompts))) / elapsed, "startup_s": startup,
           "engine": llm.metrics(), "warmup_s": info["warmup_s"], "cuda_graphs": info["cuda_graphs"]}
    return out, llm


def run_hf(config: dict | str, prompts: list[list[int]], outs: list[int], batch_size: int, device: str,
           dtype: str) -> dict[str, Any]:
    """HF generate, greedy, KV cache on, left-padded batches of requests sorted by output length;
    a batch runs to its longest output, so throughput counts only the tokens the workload asked for.
    Random weights (from_config) for presets: the work does not depend on the values."""
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
    order = sorted(range(len(prompts)), key=lambda i: outs[i])
    start = time.perf_counter()
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
    elapsed = time.perf_counter() - start
    useful = sum(outs)
    return {"time_s": elapsed, "output_tokens": useful, "output_tok_s": useful / elapsed, "batch_size": batch_size,
            "num_prompts": len(prompts), "dtype": dtype}


def bench_offline(model: str, workload: OfflineWorkload, engine_opts: dict, hf_num_prompts: int, hf_batch_size: int,
                  results_dir: Path) -> dict[str, Any]:
    from ..compiler import resolve_dtype
    from ..models.checkpoint import open_checkpoint
    from ..models.presets import PRESETS
    from ..models.random_checkpoint import RandomCheckpoint
    from ..plan import read_plan
    from .roofline import measure_ceilings, simulate_ceiling

    device = engine_opts.get("device") or "cpu"
    dtype = engine_opts.get("dtype", "auto")
    if model in PRESETS:
        dtype = ("f32" if device == "cpu" else "bf16") if dtype == "auto" else dtype
        source: Any = RandomCheckpoint(PRESETS[model], model, dtype, device=device)
        config, hf_source = source.config, PRESETS[model]
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
    prompts, outs = workload.make(int(config["vocab_size"]))
    result: dict[str, Any] = {
        "benchmark": "offline", "model": model, "dtype": dtype, "workload": asdict(workload),
        "engine_options": engine_opts,
        "machine": machine_info(device), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "input_tokens": sum(map(len, prompts)), "requested_output_tokens": sum(outs),
    }
    ceilings = measure_ceilings(device)  # before the engine takes the card's memory
    result["nanoforge"], llm = run_nanoforge(source, prompts, outs, engine_opts)
    mem = llm.plan.memory
    result["ceilings"] = ceilings
    result["roofline"] = simulate_ceiling(
        [len(p) for p in prompts], outs, weight_bytes=mem.param_bytes, kv_bytes_per_token=mem.kv_bytes_per_token,
        flops_per_token=2 * mem.param_bytes / DTYPE_BYTES[llm.plan.dtype], bandwidth=ceilings["copy_bytes_per_s"],
        flops=ceilings["matmul_flop_per_s"], max_num_seqs=llm.engine.cfg.max_num_seqs)
    result["fraction_of_ceiling"] = result["nanoforge"]["output_tok_s"] / result["roofline"]["output_tok_s"]
    del llm, source
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    if hf_num_prompts:
        n = min(hf_num_prompts, len(prompts))
        result["hf"] = run_hf(hf_source, prompts[:n], outs[:n], hf_batch_size, device, dtype)
        result["ratio_nanoforge_over_hf"] = result["nanoforge"]["output_tok_s"] / result["hf"]["output_tok_s"]
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    label = model if model in PRESETS else Path(model).name
    path = results_dir / f"offline-{label}-{device}-{stamp}.json"
    path.write_text(json.dumps(result, indent=1))
    result["path"] = str(path)
    return result
