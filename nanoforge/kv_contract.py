"""The KV contract: what the paged KV pool holds, block by block and layer by layer.

Written by the plan_memory pass, it is all the runtime needs to allocate the pool, all two
engines must agree on before KV blocks move between them (PD migration, the router's check at
connect), and what `inspect` shows. One token's entry in layer L is one row in each of the
layer's pool tensors, of the shapes listed; a block holds `block_size` tokens.

Besides per-token entries: per-token scales beside quantized values (FP8 KV: `scale_shapes` and
`scale_dtype`), per-tensor dtypes where a layer's tensors differ (a DSA layer's FP8 indexer keys beside
model-dtype latents, `--index-kv-dtype fp8`: `KVLayer.dtypes`) and fixed-size per-sequence state (Gated
DeltaNet layers' conv window and recurrent state: `state`, one row per running sequence in a pool of its
own, kernels/context.allocate_state)."""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Any, ClassVar

from .ir.graph import DTYPE_BYTES
from .typed_json import from_json, to_json


@dataclass(frozen=True)
class KVLayer:
    layer: int  # the attention node's `layer` attr: the pool index
    kind: str  # gqa: K and V per KV head; mla: the compressed latent with the rope key; dsa: mla's entry, then
    # the sparse-attention indexer's key (DeepSeek-V3.2, GLM-5)
    shapes: tuple[tuple[int, ...], ...]  # one token's entry in each pool tensor of the layer
    source: str = ""  # the HF module, for messages
    scale_shapes: tuple[tuple[int, ...], ...] = ()  # one token's scales beside each FP8 tensor, in order
    dtypes: tuple[str, ...] = ()  # per tensor where they are not all the contract's dtype (DSA: bf16 latents,
    # FP8 indexer keys); empty: every tensor in KVContract.dtype


@dataclass(frozen=True)
class SequenceState:
    """A fixed-size state per sequence rather than per token (recurrent layers)."""

    layer: int
    kind: str
    shapes: tuple[tuple[int, ...], ...]
    dtype: str
    source: str = ""


@dataclass(frozen=True)
class KVContract:
    KEY: ClassVar[str] = "kv_contract"  # written by plan_memory
    block_size: int
    dtype: str  # of the pool's values
    layers: tuple[KVLayer, ...]
    scale_dtype: str | None = None  # of the scales, when the values are quantized
    state: tuple[SequenceState, ...] = ()

    def tensor_dtypes(self, layer: KVLayer) -> tuple[str, ...]:
        """The dtype of each of the layer's pool tensors (values; their scales are in scale_dtype)."""
        return layer.dtypes or (self.dtype,) * len(layer.shapes)

    def index_dtype(self) -> str | None:
        """The dtype of the DSA layers' indexer keys (None: no such layer)."""
        dsa = next((layer for layer in self.layers if layer.kind == "dsa"), None)
        return self.tensor_dtypes(dsa)[1] if dsa else None

    def dtype_label(self) -> str:
        """The pool's dtypes in words, for inspect and the engine's metrics."""
        scales = f" + {self.scale_dtype} scales" if self.scale_dtype else ""
        index = self.index_dtype()
        if index is not None and index != self.dtype:
            return f"{self.dtype}, indexer keys {index}{scales}"
        return self.dtype + scales

    def bytes_per_token(self) -> int:
        scale = DTYPE_BYTES[self.scale_dtype] if self.scale_dtype else 0
        return sum(DTYPE_BYTES[d] * prod(s) for layer in self.layers
                   for s, d in zip(layer.shapes, self.tensor_dtypes(layer))) + \
            sum(scale * prod(s) for layer in self.layers for s in layer.scale_shapes)

    def bytes_per_sequence(self) -> int:
        """The fixed per-sequence state (recurrent layers), whatever the sequence's length."""
        return sum(DTYPE_BYTES[st.dtype] * prod(s) for st in self.state for s in st.shapes)

    def prefix_cache_blocker(self) -> str | None:
        """Why cached KV blocks cannot serve a new sequence (None: they can). A recurrent layer's state
        after a prefix is not in any block and is not snapshotted, so a hit would skip it."""
        if not self.state:
            return None
        return (f"{len(self.state)} recurrent layers keep per-sequence state that prefix blocks do not hold "
                "(no state snapshots yet)")

    def mismatches(self, other: "KVContract") -> list[str]:
        """Why blocks written under this contract cannot be read under `other` (empty: they can),
        one line per difference, the first differing layer only."""
        out = [f"{k}: {getattr(self, k)!r} vs {getattr(other, k)!r}" for k in ("block_size", "dtype", "scale_dtype")
               if getattr(self, k) != getattr(other, k)]
        if len(self.layers) != len(other.layers):
            out.append(f"attention layers: {len(self.layers)} vs {len(other.layers)}")
        for x, y in zip(self.layers, other.layers):
            if (x.kind, x.shapes, x.scale_shapes, self.tensor_dtypes(x)) != \
                    (y.kind, y.shapes, y.scale_shapes, other.tensor_dtypes(y)):
                out.append(f"layer {x.layer}: {x.kind} {_shapes(x)} {'/'.join(self.tensor_dtypes(x))} vs "
                           f"{y.kind} {_shapes(y)} {'/'.join(other.tensor_dtypes(y))}")
                break
        if [(s.kind, s.shapes, s.dtype) for s in self.state] != [(s.kind, s.shapes, s.dtype) for s in other.state]:
            out.append(f"per-sequence state: {len(self.state)} vs {len(other.state)} entries, or their shapes differ")
        return out

    def to_json(self) -> dict[str, Any]:
        data = to_json(self)
        for key in ("scale_dtype", "state"):  # absent when unused: the same JSON as before they existed
            if not data[key]:
                del data[key]
        for layer in data["layers"]:
            for key in ("scale_shapes", "dtypes"):
                if not layer[key]:
                    del layer[key]
        return data

    @classmethod
    def from_json(cls, data: Any, where: str = "kv_contract") -> "KVContract":
        return from_json(cls, data, where)


def _shapes(layer: KVLayer) -> list:
    out = [list(s) for s in layer.shapes]
    return out + [f"scales {list(s)}" for s in layer.scale_shapes] if layer.scale_shapes else out
