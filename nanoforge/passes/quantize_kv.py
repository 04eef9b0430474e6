"""quantize_kv: keep the paged KV cache in FP8 (`compile --kv-dtype fp8`).

Decode reads every running sequence's whole KV each step, so halving its bytes doubles the
sequences that fit and, where attention is bandwidth-bound, nearly halves its time. The pass marks
every attention node `kv_dtype="fp8_e4m3"` with `kv_scale` saying how it is scaled; plan_memory
then writes a KV contract whose pool holds e4m3 values plus an f32 scale beside each token's entry,
and every attention provider that runs the node quantizes at store and dequantizes at read.

Scales are dynamic: each entry is scaled by its own largest magnitude when it is stored (per token
and KV head for GQA, per token over MLA's [latent | k_rope] entry; kernels/fp8.py `quantize_kv`).
That needs no calibration data, keeps an outlier token from costing its neighbours precision, and
costs 4 bytes per token and head (2112 instead of 4096 bytes per token and layer for 8 KV heads of
128: 1.94x the tokens in the same memory).

DeepSeek sparse attention (DeepSeek-V3.2, GLM-5) keeps two caches per layer: MLA's entries (sparse_mla)
and the lightning indexer's keys (indexer). Each node says its own cache's dtype, so `--index-kv-dtype
fp8` stores the indexer's keys in e4m3 with a scale per token (as the real model does, and as DeepGEMM's
paged MQA logits read them) while MLA's latents stay in the model's dtype (FlashMLA's sparse kernel
reads bf16 only). `auto`: the indexer's keys follow --kv-dtype."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import NanoForgeError
from ..facts import ModelInfo, Target, read
from ..ir.graph import Module
from .manager import Pass

KV_DTYPES = {"auto": None, "fp8": "fp8_e4m3", "fp8_e4m3": "fp8_e4m3"}  # --kv-dtype -> pool dtype
SCALES = {"gqa": "per token and kv head", "mla": "per token"}
KV_OPS = ("attention", "sparse_mla")  # ops whose entries the paged pool holds (DSA: MLA's entry)
INDEX_OPS = ("indexer",)  # DSA's lightning indexer: its keys, paged beside MLA's entries (--index-kv-dtype)
FP8_MIN_SM = 89  # e4m3 conversions in hardware (Ada, Hopper and newer)


@dataclass(frozen=True)
class Options:
    kv_dtype: str = "auto"  # auto: the model's dtype; fp8: e4m3 values with dynamic f32 scales
    target: Target = field(default_factory=Target)
    index_kv_dtype: str = "auto"  # DSA indexer keys: auto (as kv_dtype) | fp8 (e4m3 + an f32 scale per token)


def kv_dtype_of(flag: str, name: str = "--kv-dtype") -> str | None:
    """The pool dtype `name flag` asks for (None: the model's), or a one-line error."""
    if flag not in KV_DTYPES:
        what = "the model's dtype" if name == "--kv-dtype" else "as --kv-dtype"
        raise NanoForgeError(f"{name} {flag!r}: choose auto ({what}) or fp8 (e4m3 with per-token scales)")
    return KV_DTYPES[flag]


def quantize_kv(module: Module, opts: Options) -> int:
    dtype = kv_dtype_of(opts.kv_dtype)
    asked_index = kv_dtype_of(opts.index_kv_dtype, "--index-kv-dtype")
    index_dtype = asked_index or dtype
    if asked_index is not None and not any(n.op in INDEX_OPS for _, n in module.nodes()):
        info = read(module, ModelInfo)
        raise NanoForgeError(f"--index-kv-dtype {opts.index_kv_dtype}: {info.architecture if info else 'this model'} "
                             "has no sparse-attention indexer (DeepSeek-V3.2 / GLM-5 do); use --kv-dtype fp8")
    t = opts.target
    if index_dtype is not None and t.device == "cuda" and 0 < t.sm < FP8_MIN_SM:
        flag = f"--kv-dtype {opts.kv_dtype}" if dtype else f"--index-kv-dtype {opts.index_kv_dtype}"
        raise NanoForgeError(f"{flag}: needs a GPU with FP8 support (sm{FP8_MIN_SM} or newer); "
                             f"this one is {t.capability}")
    changes = 0
    for _, node in module.nodes():
        want = dtype if node.op in KV_OPS else index_dtype if node.op in INDEX_OPS else None
        if want is not None and node.attrs.get("kv_dtype") != want:
            node.attrs["kv_dtype"] = want
            node.attrs["kv_scale"] = SCALES[node.attrs.get("kind", "mla")]  # DSA ops: one scale per token
            changes += 1
    return changes


def kv_dtype_of_module(module: Module) -> str | None:
    """The pool dtype the attention nodes were given (None: the model's); one for all layers."""
    return _one_dtype(module, KV_OPS, "attention layers disagree on the KV dtype")


def index_kv_dtype_of_module(module: Module) -> str | None:
    """The dtype the DSA indexer nodes were given for their keys (None: as the pool's entries)."""
    return _one_dtype(module, INDEX_OPS, "indexers disagree on their keys' dtype")


def _one_dtype(module: Module, ops: tuple[str, ...], why: str) -> str | None:
    dtypes = {n.attrs.get("kv_dtype") for _, n in module.nodes() if n.op in ops}
    if len(dtypes) > 1:
        raise NanoForgeError(f"{why}: {sorted(map(str, dtypes))}")
    return next(iter(dtypes), None)


PASS = Pass("quantize_kv", quantize_kv, "FP8 KV cache: quantize at store, dequantize at read", Options)
