"""Kernel providers: who can run which op on which target, ranked, with a reason for each
provider that cannot. `select_kernels` asks here; codegen binds the chosen ones by name.

A provider's module exposes one function per op it implements, named after the op, taking
the node's inputs positionally and its params and attrs as keywords (plus `ctx` for ops that
read the batch context).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace
from typing import Callable

from ..errors import NanoForgeError
from ..facts import Target
from ..ir.ops import OPS


@dataclass(frozen=True)
class Provider:
    name: str
    module: str  # import path of the kernel module
    ops: frozenset[str]
    probe: Callable[[Target], str | None]  # target -> None if usable, else why not
    graph_unsafe: frozenset[str] = frozenset()  # ops whose kernels sync with the host (no CUDA graph)
    first_for: Callable[[str, dict], bool] | None = None  # (op, node attrs) -> rank this provider first there
    block_sizes: dict[str, tuple[int, ...]] | None = None  # op -> the KV block sizes its kernel takes
    first_note: str = ""  # why it ranks first where first_for says so (shown by `nanoforge inspect`)
    refuses: Callable[[str, dict], str | None] | None = None  # (op, node attrs) -> why it cannot run that node


def _bf16_kv_only(why: str) -> Callable[[str, dict], str | None]:
    """`refuses` of an attention kernel that reads KV in the model's dtype only (quantize_kv)."""
    return lambda op, attrs: f"{why} (the plan keeps KV in {attrs['kv_dtype']})" \
        if op == "attention" and attrs.get("kv_dtype") else None


def _always(target: Target) -> str | None:
    return None


def _triton_probe(target: Target) -> str | None:
    if target.device != "cuda":
        return "needs a CUDA target (compile with --device cuda)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if 0 < target.sm < 80:
        return f"needs sm80 or newer; the target is {target.capability}"
    return None


def _cpu_probe(target: Target) -> str | None:
    return None if target.device == "cpu" else "runs on the CPU target only"


def _lib_probe(name: str, adapter: str | None = None) -> Callable[[Target], str | None]:
    """Probe of a third-party kernel library (kernels/libs): cheap target checks, then a
    lookup, then the adapter's import with its version check; never raises. `adapter`: another
    adapter module of the same library than its Lib's."""
    def probe(target: Target) -> str | None:
        from dataclasses import replace

        from ..kernels import libs

        lib = libs.LIBS[name]
        return libs.probe(replace(lib, adapter=adapter) if adapter else lib, target)

    probe.__name__ = f"_{name}_probe"
    return probe


FLASH_MLA_MIN_HEADS = 64  # H100, bench/kernels/mla_decode.py: 128 heads 2.6-3.5x Triton at batch >= 32 (0.75x at
# batch 1), 16 heads (DeepSeek-V3 at TP8) 0.47-0.97x: FlashMLA ranks first from this many heads per rank


def _flash_mla_first(attrs: dict) -> bool:
    """An MLA layer FlashMLA's dense decode takes (latent 512 + rope 64: DeepSeek-V3, Kimi-K2, GLM-5;
    bf16) and runs faster than the Triton kernel (enough heads)."""
    return (attrs.get("kind") == "mla" and not attrs.get("kv_dtype") and attrs.get("kv_lora_rank") == 512 and attrs.get("qk_rope_head_dim") == 64
            and attrs.get("out_dtype") == "bf16" and attrs.get("heads", 0) >= FLASH_MLA_MIN_HEADS)


def _flash_mla_sparse_refuses(op: str, attrs: dict) -> str | None:
    """Why FlashMLA's SM90 sparse kernel cannot run a sparse_mla node (kernels/libs/flash_mla_sparse.py)."""
    if op != "sparse_mla":
        return None
    if attrs.get("kv_dtype"):
        return (f"its sparse kernel reads bf16 entries (the plan keeps KV in {attrs['kv_dtype']}; the pinned "
                "FlashMLA's FP8 sparse decode wants DeepSeek's 656-byte layout)")
    if attrs.get("kv_lora_rank") != 512 or attrs.get("qk_rope_head_dim") != 64:
        return (f"its sparse kernel takes a latent of 512 + rope 64 (this layer: {attrs.get('kv_lora_rank')} + "
                f"{attrs.get('qk_rope_head_dim')})")
    if attrs.get("out_dtype", "bf16") != "bf16":
        return f"its sparse kernel runs bf16 (the plan runs {attrs['out_dtype']})"
    return None


def _deep_gemm_indexer_refuses(op: str, attrs: dict) -> str | None:
    """Why DeepGEMM's paged MQA logits cannot score an indexer node (kernels/libs/deep_gemm_indexer.py)."""
    if op != "indexer":
        return None
    if attrs.get("kv_dtype") != "fp8_e4m3":
        return ("its paged MQA logits read FP8 keys with per-token scales (compile with --index-kv-dtype fp8, "
                "or --kv-dtype fp8)")
    if attrs.get("head_dim") != 128 or not 0 < attrs.get("heads", 0) <= 64:
        return (f"its SM90 paged MQA logits take index head dim 128 and at most 64 heads (this layer: "
                f"{attrs.get('heads')} x {attrs.get('head_dim')})")
    return None


TRITON_OPS = frozenset({"embed", "rms_norm", "add_rms_norm", "silu_mul", "rope", "qk_norm_rope", "qk_rope_store",
                        "attention", "moe",
                        "grouped_experts", "linear",  # linear: the skinny decode kernel up to 16 rows, cuBLAS above
                        # graph safe in decode-only batches (the only ones captured): gdn's decode rows run the
                        # conv-update and recurrent-step kernels on device state rows (prefill rows, eager only,
                        # go through the chunked kernels of gdn_prefill.py); indexer (scores + torch.topk) and
                        # sparse_mla size their grids from shapes and read rows' sequences on the device
                        "gdn", "indexer", "sparse_mla"})

PROVIDERS: list[Provider] = [  # rank order: the first usable one wins
    Provider("triton", "nanoforge.kernels.triton", TRITON_OPS, _triton_probe),
    # EP dispatch/combine as all-gather + reduce-scatter: fixed shapes, no host sync (CUDA graphs)
    Provider("allgather", "nanoforge.kernels.ep_allgather", frozenset({"moe_dispatch", "moe_combine"}),
             _always),
    # the CPU target's host-bound ops in fewer aten calls (kernels/cpu): attention over the whole flat
    # batch in a few SDPA calls (torch_ref loops over sequences in Python; host-synced like torch's, which
    # does not matter where there are no graphs), norms, rope with cos/sin built once per step, and f32
    # linears on oneDNN with weights packed at load
    Provider("cpu", "nanoforge.kernels.cpu", frozenset({"attention", "rms_norm", "add_rms_norm", "silu_mul", "rope",
                                                        "qk_norm_rope", "linear", "lm_head"}), _cpu_probe,
             graph_unsafe=frozenset({"attention"}),
             refuses=_bf16_kv_only("its SDPA attention reads unquantized KV; the torch reference dequantizes")),
    Provider("torch", "nanoforge.kernels.torch_ref", frozenset(OPS), _always,
             graph_unsafe=frozenset({"attention", "qk_rope_store", "moe", "moe_dispatch", "moe_combine", "indexer",
                                        "sparse_mla", "gdn"})),
    # Library adapters rank after torch, which runs everything: they run where forced (--provider
    # rms_norm=flashinfer, --provider moe=deep_gemm) or where their first_for ranks them first for a node.
    # Not registered: FlashInfer decode attention (plans on the host per step, decode rows only).
    Provider("flashinfer", "nanoforge.kernels.libs.flashinfer_attn", frozenset({"rms_norm", "add_rms_norm"}),
             _lib_probe("flashinfer")),
    # first for the W8A8 FP8 linears (H100: 0.75-1.9x bf16 cuBLAS, the Triton W8A8 GEMM 0.08-0.99x;
    # bench/results/fp8/), which its adapter sends to fp8_gemm_nt or, off its checked shapes, to Triton;
    # and for W8A8 block-FP8 MoE experts (moe / grouped_experts, act_quant=128): m-grouped FP8 GEMMs
    # (masked layout for decode, contiguous above; graph safe), off SM90 or its shapes Triton's experts;
    # batches of up to deep_gemm_ops.SMALL_MAX_T tokens run its experts on triton/moe_fp8.py instead
    Provider("deep_gemm", "nanoforge.kernels.libs.deep_gemm_ops", frozenset({"linear", "moe", "grouped_experts"}),
             _lib_probe("deep_gemm"), first_for=lambda op, attrs: attrs.get("act_quant") == 128,
             first_note="W8A8 block-FP8 GEMMs (fp8_gemm_nt, m-grouped FP8 experts; experts of batches up to 32 "
                        "tokens on the Triton small-batch FP8 kernels; bench/results/fp8/)"),
    # first for MLA attention: absorbed decode on FlashMLA's dense SM90 kernel (64-token pages, so
    # plan_memory picks block 64 for its plans), decode rows of mixed steps too; prefill chunks in the
    # expanded form on torch's SDPA (kernels/mla_prefill.py, as under Triton), verify rows on the Triton kernel
    Provider("flash_mla", "nanoforge.kernels.libs.flash_mla_decode", frozenset({"attention"}), _lib_probe("flash_mla"),
             first_for=lambda op, attrs: op == "attention" and _flash_mla_first(attrs),
             block_sizes={"attention": (64,)},
             refuses=_bf16_kv_only("the pinned FlashMLA's dense decode reads bf16 latents only"),
             first_note=f"MLA decode with >= {FLASH_MLA_MIN_HEADS} heads on FlashMLA's dense SM90 kernel "
                        "(2.6-3.5x Triton's at batch >= 32 on an H100: bench/kernels/mla_decode.py)"),
    # first for sparse_mla (DeepSeek-V3.2, GLM-5) where it fits: FlashMLA's SM90 sparse kernel (bf16
    # [latent 512 | rope 64] rows by flat pool index, heads padded to 64 / 128; any block size), decode
    # and prefill rows alike; the Triton kernel where it does not (kernels/libs/flash_mla_sparse.py).
    # bench/dsa_decode.py times it beside Triton's sparse and both dense decodes.
    Provider("flash_mla_sparse", "nanoforge.kernels.libs.flash_mla_sparse", frozenset({"sparse_mla"}),
             _lib_probe("flash_mla", "nanoforge.kernels.libs.flash_mla_sparse"),
             first_for=lambda op, attrs: _flash_mla_sparse_refuses(op, attrs) is None,
             refuses=_flash_mla_sparse_refuses,
             first_note="DSA's sparse MLA on FlashMLA's SM90 sparse kernel (DeepSeek's own; bench/dsa_decode.py)"),
    # first for the indexer of --kv-dtype fp8 or --index-kv-dtype fp8 plans (the latter keep bf16 latents for
    # flash_mla_sparse beside the FP8 keys): decode steps score on DeepGEMM's paged FP8 MQA logits
    # (the kernel DeepSeek's inference runs; 64-token pages on SM90, so plan_memory picks block 64),
    # prefill and mixed steps on the Triton kernel (kernels/libs/deep_gemm_indexer.py)
    Provider("deep_gemm_indexer", "nanoforge.kernels.libs.deep_gemm_indexer", frozenset({"indexer"}),
             _lib_probe("deep_gemm", "nanoforge.kernels.libs.deep_gemm_indexer"),
             first_for=lambda op, attrs: _deep_gemm_indexer_refuses(op, attrs) is None,
             refuses=_deep_gemm_indexer_refuses, block_sizes={"indexer": (64,)},
             first_note="FP8 indexer keys scored on DeepGEMM's fp8_paged_mqa_logits in decode steps"),
    # forced as a trio (select_kernels); graph-safe in low-latency mode, which every captured batch
    # uses (plan_deep_ep: max_num_seqs <= the cap; with the cap 0 it records why there are no graphs)
    Provider("deep_ep", "nanoforge.kernels.libs.deep_ep_ops",
             frozenset({"moe_dispatch", "grouped_experts", "moe_combine"}), _lib_probe("deep_ep")),
]
BY_NAME = {p.name: p for p in PROVIDERS}


def candidates(op: str, target: Target, attrs: dict | None = None) -> list[tuple[str, str | None]]:
    """Every provider of `op` in rank order (those that rank themselves first for a node's `attrs`,
    plus its output dtype as "out_dtype", ahead), with None (usable) or the reason it is not."""
    ranked = [p for p in PROVIDERS if op in p.ops]
    ranked.sort(key=lambda p: not (p.first_for is not None and attrs is not None and p.first_for(op, attrs)))
    return [(p.name, p.probe(target) or (p.refuses(op, attrs) if p.refuses and attrs is not None else None))
            for p in ranked]


def graph_unsafe_reason(op: str, provider: str) -> str | None:
    p = BY_NAME.get(provider)
    if p is not None and op in p.graph_unsafe:
        return f"{op} runs on provider {provider}, whose kernel syncs with the host"
    return None


def kernel_namespace(names: set[str]) -> SimpleNamespace:
    """`K.<provider>.<op>` for the providers a plan uses."""
    spaces = {}
    for name in sorted(names):
        if name not in BY_NAME:
            raise NanoForgeError(f"plan uses unknown kernel provider {name!r}; known: {', '.join(BY_NAME)}")
        mod: ModuleType = importlib.import_module(BY_NAME[name].module)
        spaces[name] = mod
    return SimpleNamespace(**spaces)
