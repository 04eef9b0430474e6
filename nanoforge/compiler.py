"""checkpoint -> traced IR -> pass pipeline -> Plan. Reads config.json and tensor headers only."""
from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import defaults
from .errors import NanoForgeError
from .facts import Target
from .ir.graph import Module
from .models import DTYPES, check_draft_weights, trace_model
from .models.checkpoint import Checkpoint, open_checkpoint
from .models.quant import WeightQuant, weight_quant_of
from .models.weights import check_bindings
from .passes import (PASSES, PIPELINES, PassContext, PassManager, attach_mtp, fuse_elementwise, plan_cuda_graphs, plan_deep_ep,
                     plan_memory, quantize_kv, quantize_weights, select_kernels, shard_ep, shard_tp)
from .plan import CheckpointRef, Plan


@dataclass
class CompileOptions:
    dtype: str = "auto"  # f32 | bf16 | f16 | auto (the checkpoint's torch_dtype; bf16 if unknown)
    quantize: str = "auto"  # auto: as shipped (an explicit dtype widens FP8); none; fp8 (passes/quantize_weights)
    fp8_activations: str = "auto"  # FP8 linears' inputs: dynamic (per token x 128) | none | auto (dynamic on CUDA)
    kv_dtype: str = "auto"  # the paged KV cache: auto (the model's dtype) | fp8 (e4m3 + scales; passes/quantize_kv)
    index_kv_dtype: str = "auto"  # DSA indexer keys: auto (as kv_dtype) | fp8 (e4m3 + scales, latents as kv_dtype)
    device: str = "cpu"
    pipeline: str = "default"
    disable_passes: list[str] = field(default_factory=list)
    dump_dir: str | None = None
    verify_each_pass: bool = False
    config_only: bool = False
    block_size: int | None = None  # None: 64 where FlashMLA runs MLA decode, else defaults.BLOCK_SIZE
    max_num_batched_tokens: int | None = None  # the step the activation peak is reported for; None: what a
    # big card of the target device runs by default (defaults.step_tokens)
    max_num_seqs: int = defaults.MAX_NUM_SEQS  # largest decode batch a CUDA graph is planned for
    deep_ep_max_tokens: int = defaults.DEEP_EP_MAX_TOKENS  # DeepEP low-latency cap per rank (plan_deep_ep; 0 = off)
    cuda_graphs: bool = True
    providers: dict[str, str] = field(default_factory=dict)  # op -> forced provider
    tp: int = 1  # tensor-parallel ranks (passes/shard_tp.py)
    attention_dp: int = 1  # attention data-parallel x FFN expert-parallel ranks (passes/shard_ep.py)
    ffn_ep: int = 1
    speculative: str | None = None  # mtp: the checkpoint's MTP head as a draft function (passes/attach_mtp.py)
    num_speculative_tokens: int | None = None  # K drafts a step (default 3)


def resolve_dtype(requested: str, config: dict[str, Any]) -> str:
    if requested != "auto":
        return requested
    return DTYPES.get(str(config.get("torch_dtype") or config.get("dtype") or "bfloat16"), "bf16")


def target_of(device: str) -> Target:
    import torch

    if device not in ("cpu", "cuda"):
        raise NanoForgeError(f"--device {device!r}: choose cpu or cuda")
    capability = ""
    if device == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        capability = f"sm{major}{minor}"
    return Target(device, torch.__version__.split("+")[0], platform.machine(), capability)


def pass_options(opts: CompileOptions, target: Target, shipped: WeightQuant | None) -> dict[str, Any]:
    """Each pass's options from the compile options and the checkpoint's quantization (passes not
    named keep their defaults)."""
    mode = opts.quantize
    if shipped and mode == "auto" and opts.dtype != "auto":
        mode = "none"  # an explicit --dtype on an FP8 checkpoint: dequantize at load (GPUs without FP8)
    if opts.fp8_activations not in ("auto", "dynamic", "none"):
        raise NanoForgeError(f"--fp8-activations {opts.fp8_activations!r}: choose auto, dynamic or none")
    act = opts.fp8_activations == "dynamic" or (opts.fp8_activations == "auto" and target.device == "cuda")
    quant = quantize_weights.Options("fp8" if shipped else "none", mode, *((shipped.block, shipped.keep) if shipped
                                                                            else ()), act_quant=128 if act else 0)
    return {"attach_mtp": attach_mtp.Options(mtp_tokens(opts)), "quantize_weights": quant, "quantize_kv": quantize_kv.Options(opts.kv_dtype, target, opts.index_kv_dtype),
            "shard_tp": shard_tp.Options(opts.tp),
            "shard_ep": shard_ep.Options(opts.attention_dp, opts.ffn_ep),
            "fuse_elementwise": fuse_elementwise.Options(),
            "select_kernels": select_kernels.Options(target, dict(opts.providers), opts.block_size),
            "plan_deep_ep": plan_deep_ep.Options(opts.max_num_seqs, opts.deep_ep_max_tokens),
            "plan_cuda_graphs": plan_cuda_graphs.Options(opts.cuda_graphs, opts.max_num_seqs),
            "plan_memory": plan_memory.Options(opts.block_size, opts.max_num_batched_tokens or
                                               defaults.step_tokens(target.device, defaults.BIG_GPU_BYTES)[0])}


def mtp_tokens(opts: CompileOptions) -> int:
    """K when the compile asks for MTP drafts, else 0 (ngram needs nothing from the plan)."""
    if opts.speculative not in (None, "mtp", "ngram"):
        raise NanoForgeError(f"--speculative {opts.speculative!r}: choose mtp (the checkpoint's MTP head) or ngram")
    if opts.num_speculative_tokens is not None and opts.speculative is None:
        raise NanoForgeError("--num-speculative-tokens needs --speculative (mtp or ngram)")
    if opts.speculative != "mtp":
        return 0
    k = 3 if opts.num_speculative_tokens is None else opts.num_speculative_tokens
    if k < 1:
        raise NanoForgeError(f"--num-speculative-tokens {k}: must be at least 1")
    if max(opts.tp, opts.attention_dp, opts.ffn_ep) > 1:
        raise NanoForgeError("--speculative mtp on a sharded plan (--tp / --attention-dp / --ffn-ep) is not built yet; "
                             "compile for one rank")
    return k


def _numeric_check(name: str, before: Module, after: Module) -> str | None:
    from .check import numeric  # imports torch: only when asked for

    return numeric.after_pass(name, before, after)


def compile_checkpoint(path: str | Path, opts: CompileOptions, log: Callable[[str], None] = lambda m: None,
                       ckpt: Checkpoint | None = None) -> Plan:
    t0 = time.perf_counter()
    ckpt = ckpt or open_checkpoint(path, config_only=opts.config_only)
    shipped = weight_quant_of(ckpt.config)  # an unsupported quantization fails here, naming its method
    t_open = time.perf_counter()
    dtype = resolve_dtype(opts.dtype, ckpt.config)
    module = trace_model(ckpt.config, dtype, draft=mtp_tokens(opts) > 0)
    if not opts.config_only:  # each tensor by name while params are still one per key (before fusions)
        if "draft" in module.functions:
            check_draft_weights(module, ckpt.tensors)
        check_bindings(module, ckpt, storage=False)
    t_trace = time.perf_counter()
    if opts.pipeline not in PIPELINES:
        raise NanoForgeError(f"unknown pipeline {opts.pipeline!r}; pipelines: {', '.join(PIPELINES)}")
    asks = [("shard_tp", f"--tp {opts.tp}", opts.tp > 1),
            ("shard_ep", f"--ffn-ep {max(opts.ffn_ep, opts.attention_dp)}", max(opts.ffn_ep, opts.attention_dp) > 1),
            ("quantize_kv", f"--kv-dtype {opts.kv_dtype}", quantize_kv.kv_dtype_of(opts.kv_dtype) is not None),
            ("quantize_kv", f"--index-kv-dtype {opts.index_kv_dtype}",
             quantize_kv.kv_dtype_of(opts.index_kv_dtype, "--index-kv-dtype") is not None),
            ("attach_mtp", "--speculative mtp", mtp_tokens(opts) > 0)]
    for name, flag, asked in asks:
        if asked and (name in opts.disable_passes or name not in PIPELINES[opts.pipeline]):
            raise NanoForgeError(f"{flag} needs the {name} pass, which this compile does not run")
    target = target_of(opts.device)
    ctx = PassContext(options=pass_options(opts, target, shipped), disabled=set(opts.disable_passes),
                      dump_dir=Path(opts.dump_dir) if opts.dump_dir else None,
                      after_pass=_numeric_check if opts.verify_each_pass else None, log=log)
    pm = PassManager(PASSES, PIPELINES[opts.pipeline], ctx)
    module = pm.run(module)
    # every param against its tensors as the passes left it: shapes, each rank's slices, FP8 scales
    unused = [] if opts.config_only else check_bindings(module, ckpt)
    t_end = time.perf_counter()
    stats = {"open_ms": round((t_open - t0) * 1000, 1), "trace_ms": round((t_trace - t_open) * 1000, 1),
             "passes_ms": round((t_end - t_trace) * 1000, 1), "total_ms": round((t_end - t0) * 1000, 1),
             "nodes": sum(len(f.nodes) for f in module.functions.values()), "params": len(module.params),
             "unused_checkpoint_tensors": len(unused)}
    checkpoint = CheckpointRef(str(Path(path).resolve()), ckpt.kind, None if opts.config_only else ckpt.fingerprint())
    return Plan(module, checkpoint, ckpt.config, target, [asdict(r) for r in pm.records],
                {k: v for k, v in asdict(opts).items() if k != "dump_dir"}, stats)
