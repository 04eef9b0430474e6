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
128: 1.94x the tokens in the same memory)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import NanoForgeError
from ..facts import Target
from ..ir.graph import Module
from .manager import Pass

KV_DTYPES = {"auto": None, "fp8": "fp8_e4m3", "fp8_e4m3": "fp8_e4m3"}  # --kv-dtype -> pool dtype
SCALES = {"gqa": "per token and kv head", "mla": "per token"}
KV_OPS = ("attention", "sparse_mla", "indexer")  # ops that store into the paged pool (DSA: MLA entry, indexer key)
FP8_MIN_SM = 89  # e4m3 conversions in hardware (Ada, Hopper and newer)


@dataclass(frozen=True)
class Options:
    kv_dtype: str = "auto"  # auto: the model's dtype; fp8: e4m3 values with dynamic f32 scales
    target: Target = field(default_factory=Target)


def kv_dtype_of(flag: str) -> str | None:
    """The pool dtype `--kv-dtype flag` asks for (None: the model's), or a one-line error."""
    if flag not in KV_DTYPES:
        raise NanoForgeError(f"--kv-dtype {flag!r}: choose auto (the model's dtype) or fp8 (e4m3 with per-token scales)")
    return KV_DTYPES[flag]


def quantize_kv(module: Module, opts: Options) -> int:
    dtype = kv_dtype_of(opts.kv_dtype)
    if dtype is None:
        return 0
    t = opts.target
    if t.device == "cuda" and 0 < t.sm < FP8_MIN_SM:
        raise NanoForgeError(f"--kv-dtype {opts.kv_dtype}: needs a GPU with FP8 support (sm{FP8_MIN_SM} or newer); "
                             f"this one is {t.capability}")
    changes = 0
    for _, node in module.nodes():
        if node.op in KV_OPS and node.attrs.get("kv_dtype") != dtype:
            node.attrs["kv_dtype"] = dtype
            node.attrs["kv_scale"] = SCALES[node.attrs.get("kind", "mla")]  # DSA ops: one scale per token
            changes += 1
    return changes


def kv_dtype_of_module(module: Module) -> str | None:
    """The pool dtype the attention nodes were given (None: the model's); one for all layers."""
    dtypes = {n.attrs.get("kv_dtype") for _, n in module.nodes() if n.op in KV_OPS}
    if len(dtypes) > 1:
        raise NanoForgeError(f"attention layers disagree on the KV dtype: {sorted(map(str, dtypes))}")
    return next(iter(dtypes), None)


PASS = Pass("quantize_kv", quantize_kv, "FP8 KV cache: quantize at store, dequantize at read", Options)
