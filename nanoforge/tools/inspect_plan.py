"""`nanoforge inspect PLAN`: what the plan holds and what every pass decided, read from its facts
(model, params and their quantization, the passes, ops and providers per function, the parallel
layout, CUDA-graph sizes, speculation, memory and KV layout), or one rank's slices."""
from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import replace

from ..errors import NanoForgeError

QUANT_NAMES = {"fp8_e4m3": "block-FP8 weights", "scale": "their f32 scales", "dequant": "FP8 tensors widened at load"}


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def cmd_inspect(a: argparse.Namespace) -> int:
    from ..ir.printer import format_function
    from ..plan import read_plan

    plan = read_plan(a.plan)
    m = plan.module
    if a.rank is not None:
        return _inspect_rank(plan, a.rank)
    if a.ir:
        for fn in m.functions.values():
            print(format_function(fn))
        return 0
    info, mem, kv = plan.model, plan.memory, plan.kv_contract
    print(f"model        {info.architecture} ({info.dtype}), {info.num_layers} layers, vocab {info.vocab_size}")
    print(f"checkpoint   {plan.checkpoint.path} [{plan.checkpoint.kind}]")
    t = plan.target
    print(f"target       {t.device}{' ' + t.capability if t.capability else ''} (torch {t.torch}, {t.machine})")
    print(f"params       {len(m.params)} tensors, {mib(m.param_bytes())}")
    quant = Counter(p.quant for p in m.params.values() if p.quant)
    if quant:
        print("quantized    " + ", ".join(f"{QUANT_NAMES.get(k.split(':')[0], k)} {k.split(':')[-1]} x{n}"
                                          for k, n in quant.items()))
    print("passes       " + ", ".join(f"{p['name']}({'skipped' if p.get('skipped') else p['changes']})"
                                      for p in plan.passes))
    for fn in m.functions.values():
        ops = Counter(n.op for n in fn.nodes)
        print(f"function     {fn.name}: {len(fn.nodes)} nodes")
        for op, count in sorted(ops.items(), key=lambda kv: -kv[1]):
            providers = Counter(n.provider or "-" for n in fn.nodes if n.op == op)
            print(f"  {op:<14} {count:>5}  provider " + ", ".join(f"{p} x{c}" for p, c in providers.items()))
    for op, why in plan.provider_notes.items():
        print(f"  providers {op}: " + "; ".join(why))
    if a.nodes:
        for fn in m.functions.values():
            for n in fn.nodes:
                print(f"  {fn.name}  %{n.outputs[0].name:<5} {n.op:<14} {n.provider or '-':<10} @{n.source}")
    _print_parallel(plan)
    if plan.deep_ep is not None:
        print(f"deep_ep      {plan.deep_ep.modes}")
    graphs = plan.cuda_graphs
    print("cuda graphs  " + (f"decode batch sizes {', '.join(map(str, graphs.sizes))}" if graphs.sizes
                             else f"none: {graphs.reason}")
          + (f"; verify {', '.join(map(str, graphs.verify_sizes))}" if graphs.verify_sizes else ""))
    if plan.speculative is not None:
        sp = plan.speculative
        print(f"speculative  {sp.method}: {sp.num_tokens} drafts a step from the draft function, its KV in layer(s) "
              f"{', '.join(map(str, sp.draft_kv_layers))}")
        if plan.kv_contract.state:  # verify steps keep each draft row's state; the slot takes the accepted one's
            print(f"             {len(plan.kv_contract.state)} recurrent layers roll back to the last accepted token "
                  f"({sp.num_tokens} extra state rows a sequence; verify steps run eagerly)")
    print(f"memory       weights {mib(mem.param_bytes)}, KV {mem.kv_bytes_per_token:,} B/token "
          f"(block {kv.block_size}, {_kv_dtype(kv, info.dtype)}, {len(kv.layers)} layers), activations "
          f"{mem.activation_bytes_per_token:,} B/token x {mem.max_num_batched_tokens} tokens "
          f"= {mib(mem.activation_bytes_per_token * mem.max_num_batched_tokens)}")
    if kv.state:  # recurrent layers: a fixed state per sequence beside the per-token KV
        print(f"state        {kv.bytes_per_sequence():,} B/sequence ({len(kv.state)} recurrent layers: "
              f"{', '.join(sorted({s.kind for s in kv.state}))}, {kv.state[0].dtype}) vs KV "
              f"{mem.kv_bytes_per_token:,} B/token; one row per running sequence")
    if blocker := kv.prefix_cache_blocker():
        print(f"prefix cache off: {blocker}")
    return 0


def _kv_dtype(kv, model_dtype: str) -> str:
    """The pool's dtype; for quantized KV also its scales and the tokens it fits vs the model's dtype."""
    if not kv.scale_dtype:
        return kv.dtype
    from ..kv_contract import KVContract

    plain = KVContract(kv.block_size, model_dtype, tuple(replace(layer, scale_shapes=(), dtypes=())
                                                         for layer in kv.layers))
    per_gib = lambda c: 2**30 // max(c.bytes_per_token(), 1)  # noqa: E731
    return (f"{kv.dtype_label()}: {per_gib(kv):,} tokens per GiB, "
            f"{per_gib(kv) / max(per_gib(plain), 1):.2f}x {model_dtype}'s {per_gib(plain):,}")


def _print_parallel(plan) -> None:
    from ..parallel.rank_view import collectives_per_step, model_bytes

    m, layout = plan.module, plan.parallel
    if not layout.sharded:
        return
    coll = collectives_per_step(m)
    replicated = type(m)(m.meta, {n: p for n, p in m.params.items() if not p.shard}).param_bytes()
    print(f"parallel     {layout.describe()}: {layout.world} ranks; per step {sum(coll.values())} collectives ("
          + ", ".join(f"{op} x{n}" for op, n in sorted(coll.items())) + ")")
    print(f"per rank     weights {mib(m.param_bytes())} of the model's {mib(model_bytes(m))} ("
          f"{mib(m.param_bytes() - replicated)} sharded + {mib(replicated)} replicated), KV "
          f"{plan.memory.kv_bytes_per_token:,} B/token; `inspect --rank R` lists a rank's slices")


def _inspect_rank(plan, rank: int) -> int:
    from ..ir.printer import format_function
    from ..parallel.rank_view import describe_rank, rank_slices

    m, world = plan.module, plan.parallel.world
    if not 0 <= rank < world:
        raise NanoForgeError(f"--rank {rank}: the plan has {world} rank{'s' if world > 1 else ''} (0..{world - 1})")
    for fn in m.functions.values():
        print(format_function(fn))
    lines = describe_rank(m, rank)
    print(lines[0])
    print("\n".join(lines[1:]))
    total = sum(ks.nbytes for ks in rank_slices(m, rank))
    print(f"rank {rank} reads {mib(total)} of the checkpoint ({total:,} B)")
    _print_parallel(plan)
    return 0
