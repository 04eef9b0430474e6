"""The `nanoforge` command: compile, inspect, generate, serve."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import defaults
from .errors import NanoForgeError
from .serving.engine_flags import (add_engine_flags, add_engine_server_flags, add_kv_staging_flag, add_model_preset_flag,
                                   engine_options, model_source, staging_bytes)
from .tools.bench_migration import add_bench_migration_parser
from .tools.bench_pd import add_bench_pd_parser
from .tools.bench_serve import add_bench_serve_parser
from .tools.inspect_plan import cmd_inspect, mib as _mib


def _kv_pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise NanoForgeError(f"{flag} {item!r}: expected OP=PROVIDER")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def cmd_compile(a: argparse.Namespace) -> int:
    from .compiler import CompileOptions, compile_checkpoint

    opts = CompileOptions(dtype=a.dtype, device=a.device, pipeline=a.pipeline, disable_passes=a.disable_pass,
                          dump_dir=a.dump_dir, verify_each_pass=a.verify_each_pass, config_only=a.config_only,
                          quantize=a.quantize, fp8_activations=a.fp8_activations, kv_dtype=a.kv_dtype,
                          index_kv_dtype=a.index_kv_dtype,
                          block_size=a.block_size, max_num_batched_tokens=a.max_num_batched_tokens,
                          providers=_kv_pairs(a.provider, "--provider"), tp=a.tp,
                          attention_dp=a.attention_dp, ffn_ep=a.ffn_ep, max_num_seqs=a.max_num_seqs,
                          deep_ep_max_tokens=a.deep_ep_max_tokens, speculative=a.speculative,
                          num_speculative_tokens=a.num_speculative_tokens)
    say = (lambda m: None) if a.quiet else print
    say(f"compiling {a.checkpoint}")
    plan = compile_checkpoint(a.checkpoint, opts, log=say)
    plan.save(Path(a.output))
    s, mem = plan.stats, plan.memory
    say(f"{plan.model.architecture}: {s['nodes']} nodes, {s['params']} params "
        f"({_mib(mem.param_bytes)}), KV {mem.kv_bytes_per_token:,} B/token")
    if a.dump_dir:
        say(f"pass dumps: {a.dump_dir}/ (index.txt lists them)")
    print(f"wrote {a.output} in {s['total_ms'] / 1000:.2f} s (trace {s['trace_ms']:.0f} ms, "
          f"passes {s['passes_ms']:.0f} ms)")
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    from .llm import LLM
    from .runtime.sampling_params import SamplingParams

    if not a.prompt:
        raise NanoForgeError("give at least one --prompt")
    # `with LLM` starts a sharded plan's ranks, and stops them
    with LLM(a.model, checkpoint=a.checkpoint, progress=not a.json, **engine_options(a), **_layout(a),
             **_launch(a)) as llm:
        sp = SamplingParams(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed,
                            max_tokens=a.max_tokens, ignore_eos=a.ignore_eos)
        bar = sys.stderr.isatty() and not a.json  # tokens generated, on a terminal
        if a.image and (a.chat or len(a.prompt) != 1):
            raise NanoForgeError("--image goes with exactly one --prompt and without --chat (images in chat "
                                 "messages are not supported yet)")
        if a.chat:
            outs = llm.chat([[{"role": "user", "content": p}] for p in a.prompt], sp, use_tqdm=bar)
        elif a.image:
            from .runtime.vision_inputs import IMAGE_PLACEHOLDER

            prompt = a.prompt[0] if IMAGE_PLACEHOLDER in a.prompt[0] else IMAGE_PLACEHOLDER * len(a.image) + a.prompt[0]
            outs = llm.generate([prompt], sp, use_tqdm=bar, images=[a.image])
        else:
            outs = llm.generate(a.prompt, sp, use_tqdm=bar)
    for prompt, out in zip(a.prompt, outs):
        if a.json:
            print(json.dumps({"prompt": prompt, "token_ids": out.token_ids, "text": out.text,
                              "finish_reason": out.finish_reason}))
        else:
            print(out.text)
    return 0


def _layout(a: argparse.Namespace) -> dict[str, int]:
    """--tp / --attention-dp / --ffn-ep given for a checkpoint compiled on the fly (a plan has its own)."""
    return {k: v for k in ("tp", "attention_dp", "ffn_ep") if (v := getattr(a, k, None)) is not None}


def _launch(a: argparse.Namespace) -> dict[str, str]:
    """--launcher / --ray-address: where a sharded plan's worker ranks run (EngineConfig fields)."""
    return {k: v for k in ("launcher", "ray_address") if (v := getattr(a, k, None)) is not None}


def add_layout_flags(p: argparse.ArgumentParser) -> None:
    from .runtime.launchers import LAUNCHERS

    p.add_argument("--tp", type=int, metavar="N", help="a checkpoint: compile it for N tensor-parallel ranks, one "
                   "process each (a plan runs the ranks it was compiled for)")
    p.add_argument("--attention-dp", type=int, metavar="N", help="a checkpoint: attention data-parallel ranks "
                   "(with --ffn-ep N)")
    p.add_argument("--ffn-ep", type=int, metavar="N", help="a checkpoint: expert-parallel ranks")
    p.add_argument("--launcher", choices=LAUNCHERS, help="where the worker ranks run: local processes "
                   "(default) or Ray actors (pip install ray; the checkpoint at the same path on every node)")
    p.add_argument("--ray-address", metavar="ADDR", help="--launcher ray: the cluster to join (default "
                   "$RAY_ADDRESS, else the one on this node, else a new local one)")


def cmd_bench_offline(a: argparse.Namespace) -> int:
    from .tools.bench_offline import OfflineWorkload, bench_cpu_suite, bench_offline

    if a.threads is not None:
        import torch

        torch.set_num_threads(a.threads)  # both engines: they share the process
    if a.max_num_batched_tokens is None and (a.device != "cuda" or a.suite is not None):
        a.max_num_batched_tokens = 4096  # CUDA: the engine's own default (defaults.step_tokens), as LLM() runs
    if a.suite == "cpu":
        s = bench_cpu_suite(Path(a.results_dir), a.repeats or 3, a.max_num_batched_tokens)
        print(f"wrote {s['path']}")
        return 0
    w = OfflineWorkload(a.num_prompts, a.min_input, a.max_input, a.min_output, a.max_output, a.seed)
    if not (1 <= w.min_input <= w.max_input and 1 <= w.min_output <= w.max_output and w.num_prompts >= 1):
        raise NanoForgeError("bench offline: need 1 <= --min-input <= --max-input, 1 <= --min-output <= "
                             "--max-output and --num-prompts >= 1")
    if a.hf_num_prompts is None:
        a.hf_num_prompts = a.num_prompts
    opts = {"device": a.device, "dtype": a.dtype, "max_num_seqs": a.max_num_seqs,
            "max_model_len": a.max_input + a.max_output + 1, "gpu_memory_utilization": a.gpu_memory_utilization,
            "kv_dtype": a.kv_dtype}
    if a.max_num_batched_tokens is not None:
        opts.update(max_num_batched_tokens=a.max_num_batched_tokens, max_prefill_chunk=a.max_num_batched_tokens)
    if a.enforce_eager:
        opts["enforce_eager"] = True
    if a.disable_pass:
        opts["disable_passes"] = a.disable_pass
    r = bench_offline(a.model, w, opts, a.hf_num_prompts, a.hf_batch_size, Path(a.results_dir), repeats=a.repeats or 1,
                      gc_freeze=a.gc_freeze)
    nf = r["nanoforge"]
    print(f"nanoforge  {nf['output_tok_s']:10.1f} output tok/s  {nf['total_tok_s']:10.1f} total tok/s  "
          f"{nf['time_s']:8.2f} s  ({nf['output_tokens']} tokens, {nf['engine']['preemptions']} preemptions; "
          f"gc {nf['gc_s']:.2f} s in {nf['gc_pauses']} pauses, longest {nf['gc_max_ms']:.0f} ms)")
    print(f"roofline   {r['roofline']['output_tok_s']:10.1f} output tok/s  (copy "
          f"{r['ceilings']['copy_bytes_per_s'] / 1e12:.2f} TB/s); nanoforge at {100 * r['fraction_of_ceiling']:.0f}%")
    b = r["step_breakdown"]
    for g in b["decode"] + ([b["mixed"]] if b["mixed"] else []):
        kind = "mixed steps" if g is b["mixed"] else f"decode rows {g['rows']:>7}"
        print(f"  {kind:19s} {g['steps']:5d} steps {g['seconds']:7.2f} s  {g['mean_ms']:7.2f} ms a step against a "
              f"floor of {g['mean_floor_ms']:6.2f} ({100 * g['fraction_of_floor']:.0f}%)")
    if "hf" in r:
        print(f"HF         {r['hf']['output_tok_s']:10.1f} output tok/s  {'':>23}{r['hf']['time_s']:8.2f} s  "
              f"({r['hf']['num_prompts']} prompts in batches of {r['hf']['batch_size']})")
        print(f"ratio nanoforge / HF: {r['ratio_nanoforge_over_hf']:.2f}")
    print(f"wrote {r['path']}")
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    """OpenAI-compatible HTTP server over one in-process engine (its own thread); with --addr or a
    prefill/decode/encode role, an engine server (ZMQ, no HTTP) for `nanoforge route` instead."""
    if a.addr or a.role != "both":
        if a.allowed_local_media_path:
            raise NanoForgeError("--allowed-local-media-path is for the HTTP server (serve without --addr, or "
                                 "route), which reads the files; an engine server gets the images' bytes")
        return _serve_engine(a)
    if a.registry or a.advertise_addr or a.registry_scope:
        raise NanoForgeError("--registry, --registry-scope and --advertise-addr are for engine servers: add --addr "
                             "ADDR (and --role prefill|decode)")
    import signal

    import uvicorn

    from .llm import LLM
    from .runtime.chat_images import check_media_dir
    from .serving.inprocess import InProcessClient
    from .serving.openai_api import build_app
    from .serving.sockets import listen_tcp

    check_media_dir(a.allowed_local_media_path)  # before the model loads
    opts = engine_options(a)
    model, name = model_source(a.model, a.model_preset, opts)
    sock = listen_tcp(a.host, a.port, "serve")  # and the port: a taken one fails now
    with sock, LLM(model, **opts, **_layout(a), **_launch(a)) as llm:  # starts a sharded plan's ranks
        name = a.served_model_name or name
        client = InProcessClient(llm.engine, name)
        # uvicorn re-raises a SIGTERM once it has shut down; as SystemExit it unwinds through here,
        # so the engine thread stops and `with LLM` stops the worker ranks
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        print(startup_line(name, llm.engine.kv_cache), flush=True)
        try:
            app = build_app(client, llm.tokenizer, name, a.api_key, a.allowed_local_media_path)
            uvicorn.Server(uvicorn.Config(app, host=a.host, port=a.port, log_level="info")).run(sockets=[sock])
        finally:
            client.close()
    return 0


def startup_line(name: str, kv_cache: dict) -> str:
    """What `serve` prints before it listens: the KV cache it got and whether prefix caching is on
    (an engine turns it off, saying why, for models with per-sequence state)."""
    state = f", state {kv_cache['state_slots']} sequences x {kv_cache['state_bytes_per_sequence']:,} B" \
        if "state_slots" in kv_cache else ""
    return (f"serving {name}: KV cache {kv_cache['tokens']:,} tokens ({kv_cache['dtype']}){state}; "
            f"prefix caching {kv_cache['prefix_caching']}")


def _serve_engine(a: argparse.Namespace) -> int:
    import logging

    from .serving.engine_server import serve_engine

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    opts = {**engine_options(a), **_layout(a), **_launch(a)}
    model, name = model_source(a.model, a.model_preset, opts)
    device = opts.pop("device", None)
    serve_engine(model, a.addr or "tcp://127.0.0.1:5555", model_name=a.served_model_name or name, role=a.role,
                 device=device, kv_park_timeout=a.kv_park_timeout, kv_transport=a.kv_transport,
                 kv_pull_timeout=a.kv_pull_timeout, kv_staging_bytes=staging_bytes(a.kv_staging_mib),
                 registry=a.registry, advertise_addr=a.advertise_addr, registry_scope=a.registry_scope, **opts)
    return 0


def cmd_route(a: argparse.Namespace) -> int:
    """The OpenAI HTTP API over engine servers: PD (prefill + decode engines) or whole requests."""
    import asyncio

    import uvicorn

    from .serving.openai_api import build_app
    from .serving.router import Router
    from .serving.sockets import listen_tcp
    from .runtime.chat_images import check_media_dir
    from .serving.routing import make_strategy

    make_strategy(a.strategy)  # an unknown name fails before any connection
    check_media_dir(a.allowed_local_media_path)  # and a bad directory
    sock = listen_tcp(a.host, a.port, "route")  # and a taken port

    async def main() -> None:
        router = await Router.connect(a.prefill, a.decode, a.engine, encode=a.encode, registry_url=a.registry,
                                      strategy=a.strategy, model_name=a.served_model_name,
                                      registry_scope=a.registry_scope)
        try:
            app = build_app(router, router.tokenizer, router.model_name, a.api_key, a.allowed_local_media_path)
            await uvicorn.Server(uvicorn.Config(app, host=a.host, port=a.port, log_level="info")).serve([sock])
        finally:
            router.close()

    with sock:
        asyncio.run(main())
    return 0


def add_media_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allowed-local-media-path", metavar="DIR", help="chat image_url parts may name files under DIR "
                   "(file:// URLs or paths; relative ones to DIR), read by this server; without it only data: URLs. "
                   "http(s) URLs are never fetched")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanoforge", description="Compile, inspect and run LLM checkpoints.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="checkpoint (HF dir or .gguf) -> plan dir")
    c.add_argument("checkpoint")
    c.add_argument("-o", "--output", required=True, help="plan directory to write")
    c.add_argument("--dtype", default="auto", choices=["auto", "f32", "bf16", "f16"],
                   help="activations (and weights not stored in FP8); auto: the checkpoint's torch_dtype. An explicit "
                        "dtype on a block-FP8 checkpoint widens its weights at load unless --quantize fp8")
    c.add_argument("--fp8-activations", default="auto", choices=["auto", "dynamic", "none"],
                   help="FP8 linears' inputs: dynamic = quantized per token and 128 columns (W8A8, as the FP8 "
                        "GEMMs run), none = weight-only; auto: dynamic on CUDA, none on CPU")
    c.add_argument("--quantize", default="auto", choices=["auto", "none", "fp8"],
                   help="weights: auto = as the checkpoint ships them; none = widen FP8 ones at load; fp8 = "
                        "block-quantize (128x128, e4m3) at load")
    c.add_argument("--kv-dtype", default="auto", metavar="auto|fp8",
                   help="the paged KV cache: auto = the model's dtype; fp8 = e4m3 with a dynamic f32 scale per token "
                        "and KV head (per token for MLA), about half the bytes per token")
    c.add_argument("--index-kv-dtype", default="auto", metavar="auto|fp8",
                   help="DeepSeek-V3.2 / GLM-5: the sparse-attention indexer's key cache; auto = as --kv-dtype; fp8 "
                        "= e4m3 with an f32 scale per token while MLA's latents keep --kv-dtype (as the real model)")
    c.add_argument("--speculative", metavar="mtp", help="mtp: keep the checkpoint's MTP layer as a draft function "
                   "the engine speculates with (pass attach_mtp)")
    c.add_argument("--num-speculative-tokens", type=int, metavar="K", help="MTP drafts per sequence and step "
                   "(default 3)")
    c.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    c.add_argument("--pipeline", default="default")
    c.add_argument("--dump-dir", help="write NN_<pass>.ir after every pass, plus index.txt")
    c.add_argument("--disable-pass", action="append", default=[], metavar="NAME")
    c.add_argument("--verify-each-pass", action="store_true",
                   help="check numerically (tiny random inputs) that every pass preserves the function")
    c.add_argument("--config-only", action="store_true", help="dry run from config.json alone (plan not runnable)")
    c.add_argument("--block-size", type=int, default=None, help="tokens per KV block (default: 64 where "
                   f"flash_mla runs MLA decode, else {defaults.BLOCK_SIZE})")
    c.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help=f"tokens per step the plan's memory is planned for (default {defaults.BIG_GPU_BATCHED_TOKENS} "
                   f"for CUDA, {defaults.MAX_NUM_BATCHED_TOKENS} for the CPU)")
    c.add_argument("--provider", action="append", default=[], metavar="OP=NAME", help="force a kernel provider")
    c.add_argument("--max-num-seqs", type=int, default=defaults.MAX_NUM_SEQS, metavar="N",
                   help="largest decode batch per rank the plan is made for (CUDA graphs, DeepEP's cap; default "
                        "%(default)s)")
    c.add_argument("--deep-ep-max-tokens", type=int, default=defaults.DEEP_EP_MAX_TOKENS, metavar="N",
                   help="tokens per rank DeepEP's low-latency mode holds (with --provider moe_dispatch=deep_ep; "
                        "0: normal mode only)")
    c.add_argument("--tp", type=int, default=1, metavar="N", help="tensor-parallel ranks (shard_tp pass)")
    c.add_argument("--attention-dp", type=int, default=1, metavar="N",
                   help="attention data-parallel ranks; with --ffn-ep N, wide expert parallelism (shard_ep pass)")
    c.add_argument("--ffn-ep", type=int, default=1, metavar="N", help="expert-parallel ranks (shard_ep pass)")
    c.add_argument("-q", "--quiet", action="store_true")
    c.set_defaults(run=cmd_compile)

    i = sub.add_parser("inspect", help="summarize a plan")
    i.add_argument("plan")
    i.add_argument("--ir", action="store_true", help="print the lowered IR")
    i.add_argument("--nodes", action="store_true", help="list every node with its provider")
    i.add_argument("--rank", type=int, metavar="R", help="a sharded plan's rank R: its graph, params, slices and bytes")
    i.set_defaults(run=cmd_inspect)

    g = sub.add_parser("generate", help="generate text from a plan or a checkpoint")
    g.add_argument("model", help="plan dir, HF checkpoint dir or .gguf file")
    g.add_argument("--prompt", action="append", default=[])
    g.add_argument("--chat", action="store_true", help="apply the chat template")
    g.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image for the (one) prompt, repeatable; vision-language models. Without its "
                        "placeholder in the prompt, one per image is put in front of it")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt: token_ids, text")
    g.add_argument("--checkpoint", help="weights location, if the plan's recorded path moved")
    add_engine_flags(g)
    add_layout_flags(g)
    g.set_defaults(run=cmd_generate)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat, completions, metrics)")
    s.add_argument("model", nargs="?", help="plan dir, HF checkpoint dir or .gguf file (or --model-preset)")
    add_model_preset_flag(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/*")
    s.add_argument("--served-model-name", help="the model name clients send (default: the path's last part)")
    add_media_flag(s)
    add_engine_flags(s)
    s.add_argument("--addr", help="run an engine server at this ZMQ address (tcp://HOST:PORT) instead of HTTP; "
                   "a prefill or decode role implies one (default tcp://127.0.0.1:5555)")
    add_layout_flags(s)
    add_engine_server_flags(s)
    add_kv_staging_flag(s)
    s.set_defaults(run=cmd_serve)

    r = sub.add_parser("route", help="OpenAI-compatible HTTP router over engine servers (PD or whole requests)")
    r.add_argument("--prefill", nargs="+", action="extend", default=[], metavar="ADDR", help="prefill engines")
    r.add_argument("--decode", nargs="+", action="extend", default=[], metavar="ADDR", help="decode engines")
    r.add_argument("--engine", nargs="+", action="extend", default=[], metavar="ADDR",
                   help="engines that serve whole requests (role both)")
    r.add_argument("--registry", help="redis://host:port[/db]: route to the engines registered there")
    r.add_argument("--registry-scope", metavar="NAME", help="only the engines registered in this scope (default: "
                   "the unscoped ones)")
    r.add_argument("--strategy", default="round-robin", help="round-robin, least-loaded or prefix-aware")
    r.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    r.add_argument("--port", type=int, default=8000)
    r.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/*")
    r.add_argument("--served-model-name", help="the model name clients send (default: the engines')")
    r.add_argument("--encode", nargs="+", action="extend", default=[], metavar="ADDR",
                   help="encode engines (serve --role encode): a request's images are encoded there and their "
                        "embeddings go to the prefill (or both) engine; without one, that engine encodes them")
    add_media_flag(r)
    r.set_defaults(run=cmd_route)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    o = bsub.add_parser("offline", help="the reference offline throughput workload (256 prompts, lengths "
                        "U[100, 1024]), against HF generate and a roofline")
    o.add_argument("--model", default="qwen3-0.6b",
                   help="preset (random weights), checkpoint, or plan dir (run with the checkpoint it was compiled "
                        "from)")
    o.add_argument("--num-prompts", type=int, default=256)
    o.add_argument("--min-input", type=int, default=100)
    o.add_argument("--max-input", type=int, default=1024)
    o.add_argument("--min-output", type=int, default=100)
    o.add_argument("--max-output", type=int, default=1024)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cpu; a plan runs on its own "
                   "device")
    o.add_argument("--dtype", default="auto", choices=["auto", "f32", "bf16", "f16"],
                   help="auto: f32 on CPU (its fast dtype); on CUDA bf16 for a preset, else the checkpoint's; a plan "
                        "keeps its own")
    o.add_argument("--kv-dtype", default="auto", metavar="auto|fp8", help="the KV cache of a checkpoint or preset "
                   "compiled on the fly (a plan keeps its own)")
    o.add_argument("--max-num-seqs", type=int, default=defaults.MAX_NUM_SEQS)
    o.add_argument("--max-num-batched-tokens", type=int, default=None, help="tokens a step (prefill chunks + "
                   "decode rows; also the prefill chunk). Default on CUDA: the engine's (8192 on a card of 70 GiB or "
                   "more: both H100 workloads ran faster than at 4096, whose twice as many eager mixed steps cost "
                   "host time); on the CPU 4096")
    o.add_argument("--gc-freeze", action="store_true", help="gc.freeze() the objects alive after start-up for the "
                   "timed runs (the collector's pauses are reported either way)")
    o.add_argument("--hf-num-prompts", type=int, default=None,
                   help="prompts of the workload also run through HF generate (default: all; 0 skips HF)")
    o.add_argument("--hf-batch-size", type=int, default=16)
    o.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    o.add_argument("--disable-pass", action="append", default=[], metavar="NAME",
                   help="compile a checkpoint or preset without this pass (repeatable; an A/B of one pass)")
    o.add_argument("--gpu-memory-utilization", type=float, default=defaults.GPU_MEMORY_UTILIZATION,
                   help="share of the GPU the engine may use (default %(default)s)")
    o.add_argument("--repeats", type=int, default=None, help="time each engine this many times (on the CPU "
                   "alternately) and report the median runs (default 1; 3 with --suite)")
    o.add_argument("--threads", type=int, default=None, help="torch's intra-op threads for both engines (default: "
                   "torch's, one per core)")
    o.add_argument("--suite", choices=["cpu"], help="cpu: the CPU comparison with HF generate (f32): uniform 32 x 64 "
                   "tokens on llama-tiny and smollm2-135m, ragged 16..256 on smollm2-135m; ignores the "
                   "workload flags")
    o.add_argument("--results-dir", default="bench/results")
    o.set_defaults(run=cmd_bench_offline)
    add_bench_serve_parser(bsub)
    add_bench_pd_parser(bsub)
    add_bench_migration_parser(bsub)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except NanoForgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `nanoforge inspect PLAN --nodes | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail again
        return 0


if __name__ == "__main__":
    sys.exit(main())
