"""plan_deep_ep: which DeepEP mode serves which batch sizes, checked where the plan is made.

DeepEP (nanoforge/kernels/libs/deep_ep_ops.py) moves decode batches in its low-latency mode, whose
buffers hold a fixed number of tokens per rank (`max_tokens`, --deep-ep-max-tokens), and larger
batches (prefill, mixed) in its normal mode. A decode batch is up to max_num_seqs tokens per rank,
so it must fit the cap, or decode would silently take the slower path. The cap goes on every
deep_ep moe_dispatch as attr `low_latency_max_tokens` (the kernel reads it; 0 = normal mode only)
and the split into the DeepEPPlan fact for `nanoforge inspect`. Also checked here, so a plan
DeepEP cannot run never compiles: bf16 activations, EP ranks of one NVLink host, and the hidden
sizes and top-k the pinned build's low-latency kernels were instantiated for."""
from __future__ import annotations

from dataclasses import dataclass

from .. import defaults
from ..errors import NanoForgeError
from ..facts import DeepEPPlan, GraphBlockers, layout_of, read, write
from ..ir.graph import Module, Node
from .manager import Pass

LOW_LATENCY_HIDDEN = (2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192)  # tokenspeed-deepep 1.2.1's LL kernels
LOW_LATENCY_MAX_TOP_K = 11  # its low-latency combine's kNumMaxTopk
MAX_CAP = 511  # NVSHMEM_QP_DEPTH 1024 must be >= 2 * (cap + 1)
NVLINK_RANKS = (2, 4, 8)  # intranode normal mode (internode needs RDMA buffers we do not make)
FLAG = "--deep-ep-max-tokens"


def _check(node: Node, ranks: int, cap: int) -> None:
    where = f"deep_ep @{node.source}"
    hidden, dtype = node.inputs[0].type.shape[-1], node.inputs[0].type.dtype
    if dtype != "bf16":
        raise NanoForgeError(f"{where}: DeepEP moves bf16 activations, this plan's are {dtype} (compile with "
                             "--dtype bf16)")
    if ranks not in NVLINK_RANKS:
        raise NanoForgeError(f"{where}: DeepEP's NVLink mode runs on 2, 4 or 8 EP ranks, not {ranks}")
    if cap and hidden not in LOW_LATENCY_HIDDEN:
        raise NanoForgeError(f"{where}: DeepEP's low-latency kernels take hidden sizes "
                             f"{', '.join(map(str, LOW_LATENCY_HIDDEN))}, not {hidden}; {FLAG} 0 uses normal mode")
    if cap and node.attrs["top_k"] > LOW_LATENCY_MAX_TOP_K:
        raise NanoForgeError(f"{where}: DeepEP's low-latency combine takes top-k <= {LOW_LATENCY_MAX_TOP_K}, not "
                             f"{node.attrs['top_k']}; {FLAG} 0 uses normal mode")


@dataclass(frozen=True)
class Options:
    max_num_seqs: int = defaults.MAX_NUM_SEQS  # decode batch per rank
    max_tokens: int = defaults.DEEP_EP_MAX_TOKENS  # low-latency cap per rank (--deep-ep-max-tokens)


def plan_deep_ep(module: Module, opts: Options) -> int:
    nodes = [n for _, n in module.nodes() if n.op == "moe_dispatch" and n.provider == "deep_ep"]
    if not nodes:
        return 0
    cap, seqs = opts.max_tokens, opts.max_num_seqs
    if not 0 <= cap <= MAX_CAP:
        raise NanoForgeError(f"{FLAG} {cap}: DeepEP's low-latency mode holds 1 to {MAX_CAP} tokens per rank "
                             "(0 turns it off)")
    if cap and seqs > cap:
        raise NanoForgeError(f"--max-num-seqs {seqs} exceeds DeepEP's low-latency cap {FLAG} {cap}: lower "
                             f"--max-num-seqs to {cap} or raise {FLAG} to {seqs}")
    ranks = layout_of(module).ffn_ep
    for node in nodes:
        _check(node, ranks, cap)
        node.attrs["low_latency_max_tokens"] = cap
    if not cap:  # normal mode reads its received counts on the host
        blockers = read(module, GraphBlockers) or GraphBlockers()
        write(module, GraphBlockers((*blockers.reasons, f"deep_ep in normal mode only ({FLAG} 0) syncs with the host")))
    write(module, DeepEPPlan(cap, seqs, (f"low_latency while no EP rank holds more than {cap} tokens (every decode "
                                         f"batch: max_num_seqs {seqs}), normal above (prefill, mixed batches)")
                             if cap else f"normal for every batch ({FLAG} 0)"))
    return len(nodes)


PASS = Pass("plan_deep_ep", plan_deep_ep, "DeepEP low-latency vs normal mode by batch size, checked", Options)
