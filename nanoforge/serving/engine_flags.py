"""The flags that build an engine (`nanoforge generate` / `serve`, `python -m
nanoforge.serving.engine_server`) and those of an engine server (its PD role and registry). Kept
apart from engine_server.py so the CLI can offer them without importing ZMQ or torch."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import defaults
from ..errors import NanoForgeError

KV_TRANSPORTS = ("auto", "tcp", "ipc", "dlslime")


def add_engine_server_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--role", choices=["both", "prefill", "decode", "encode"], default="both",
                   help="prefill: keep each PD request's KV after its first token for a decode engine to pull; "
                        "decode: pull it; both: whole requests; encode: a vision-language model's vision tower "
                        "only, turning a router's images into embeddings for the prefill engines (EPD)")
    p.add_argument("--kv-park-timeout", type=float, default=30.0,
                   help="seconds a prefilled request's KV waits to be pulled before it is freed (default %(default)s)")
    p.add_argument("--kv-transport", choices=KV_TRANSPORTS, default="auto",
                   help="how a decode engine pulls KV: tcp (host-staged, ZMQ), ipc (same-host CUDA copy), auto, or "
                        "dlslime (RDMA reads where the host has a NIC, dlslime's TCP mode otherwise, which moves host "
                        "memory only: a CUDA pool is then host-staged through pinned buffers; give it to the prefill "
                        "engine too, which then registers its KV pool, or its staging buffer, for decode engines to "
                        "read)")
    p.add_argument("--kv-pull-timeout", type=float, default=5.0,
                   help="seconds a decode engine waits for a request's KV (plus its bytes at 0.5 GB/s) before it "
                        "recomputes the prompt itself (default %(default)s)")
    p.add_argument("--registry", help="redis://host:port[/db]: heartbeat this engine's record there for routers")
    p.add_argument("--advertise-addr", help="the address routers and decode engines use (default: --addr)")
    p.add_argument("--registry-scope", metavar="NAME", help="with --registry: register in this scope; only routers "
                   "given the same scope see the engine (deployments sharing one Redis stay apart)")


def add_kv_staging_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-staging-mib", type=float, metavar="MIB",
                   help="--kv-transport dlslime in TCP mode with the KV pool on CUDA: pinned host memory a prefill "
                        "engine stages the requests being pulled through; a pull that does not fit now is recomputed "
                        "by the decode engine (default: the KV pool's size, at most 1024)")


def staging_bytes(mib: float | None) -> int | None:
    return None if mib is None else int(mib * 2**20)


ENGINE_FLAGS = ("dtype", "quantize", "kv_dtype", "index_kv_dtype", "speculative", "num_speculative_tokens", "device", "max_num_seqs", "max_model_len", "max_num_batched_tokens", "gpu_memory_utilization",
                "num_blocks", "enforce_eager")


def engine_options(a: argparse.Namespace) -> dict:
    """The engine flags the user gave (LLM keyword arguments); the others keep LLM's defaults."""
    return {k: v for k in ENGINE_FLAGS if (v := getattr(a, k, None)) not in (None, False)}


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """What `generate` and `serve` share: how the engine is built (vLLM's names)."""
    p.add_argument("--dtype", choices=["auto", "f32", "bf16", "f16"], help="a checkpoint compiled on the fly: "
                   "the activations' dtype (default auto: the checkpoint's); a plan keeps its own")
    p.add_argument("--quantize", choices=["auto", "none", "fp8"], help="a checkpoint compiled on the fly: its "
                   "weights as shipped (auto), widened (none) or block-quantized to FP8 at load (fp8)")
    p.add_argument("--kv-dtype", help="a checkpoint compiled on the fly: the KV cache's dtype, auto (the model's) "
                   "or fp8 (e4m3 with a scale per token and KV head); a plan keeps its own")
    p.add_argument("--index-kv-dtype", help="a DeepSeek-V3.2 / GLM-5 checkpoint compiled on the fly: the sparse-"
                   "attention indexer's key cache, auto (as --kv-dtype) or fp8 (latents keep --kv-dtype)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="a plan runs on its own device; a checkpoint on CPU "
                   "unless told")
    p.add_argument("--max-num-seqs", type=int, metavar="N", help=f"most sequences stepped together (default "
                   f"{defaults.MAX_NUM_SEQS})")
    p.add_argument("--max-model-len", type=int, metavar="N", help="prompt + output limit (default: the model's, "
                   "cut to what the KV cache holds)")
    p.add_argument("--max-num-batched-tokens", type=int, metavar="N", help=f"tokens per step (default "
                   f"{defaults.BIG_GPU_BATCHED_TOKENS} on a GPU of {defaults.BIG_GPU_BYTES >> 30} GiB or more, "
                   f"else {defaults.MAX_NUM_BATCHED_TOKENS})")
    p.add_argument("--gpu-memory-utilization", type=float, metavar="F", help=f"share of the GPU the engine may "
                   f"hold (default {defaults.GPU_MEMORY_UTILIZATION})")
    p.add_argument("--num-blocks", type=int, metavar="N", help="KV blocks (default: sized from memory; 1 GiB on CPU)")
    p.add_argument("--enforce-eager", action="store_true", help="never replay CUDA graphs")
    p.add_argument("--speculative", metavar="ngram|mtp", help="draft tokens each decode step verifies: ngram (prompt "
                   "lookup: what followed the latest earlier occurrence of the last tokens) or mtp (the checkpoint's "
                   "MTP head; a plan compiled with --speculative mtp uses it by default)")
    p.add_argument("--num-speculative-tokens", type=int, metavar="K", help="drafts per sequence and step (default: "
                   "the plan's, else 3)")


def add_model_preset_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-preset", metavar="NAME", help="instead of MODEL: random weights of a known config "
                   "(qwen3-0.6b, qwen3-8b, ...; f32 on CPU, bf16 on CUDA unless --dtype), e.g. to measure PD at real "
                   "KV sizes without a checkpoint; engines of one preset hold the same weights")


def model_source(model: str | None, preset: str | None, opts: dict[str, Any]) -> tuple[Any, str]:
    """(what LLM loads, its default served name): the MODEL argument (plan dir or checkpoint) or
    --model-preset's random weights, exactly one of them. For a preset, opts["dtype"] (auto, or
    unset) is resolved in place, so the engine compiles in the dtype the weights were made in."""
    if model is not None and preset is not None:
        raise NanoForgeError(f"give MODEL ({model}) or --model-preset {preset}, not both")
    if preset is None:
        if model is None:
            raise NanoForgeError("give MODEL (a plan dir or checkpoint) or --model-preset NAME")
        return model, Path(model).name
    from ..models.random_checkpoint import preset_checkpoint

    ckpt = preset_checkpoint(preset, opts.get("dtype") or "auto", opts.get("device") or "cpu")
    opts["dtype"] = ckpt.dtype
    return ckpt, preset
