"""PD between engines of different layouts: the KV of a request in one layout every engine shares.

On the wire a request's KV is always in the one-rank layout (every KV head of every layer, the
contract a tp=1 compile would write), whatever the plans of the two engines: a TP rank holds only
its heads, an attention-DP replica holds whole heads of its own requests. So a prefill tp=2 engine
combines the halves of its two ranks, and a decode attention-DP engine writes the whole entry into
the pool of the replica that will own the request; two layouts pair when their one-rank contracts
match (`one_rank_contract`), and the error names both layouts when they do not.

Which part of a layer's heads a TP rank holds comes from the shard spec of the linear that makes
its K (followed back through split and per-head ops): "d0:n@tp" over `tp` ranks gives rank r part
r * n // tp (n < tp: kv heads replicated in groups; see parallel/shard_spec.py). MLA's latent and
DSA's entries are replicated on every TP rank (one part)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from math import prod

import torch

from ..errors import NanoForgeError
from ..facts import ParallelLayout
from ..ir.graph import Module, Node, Value
from ..kv_contract import KVContract
from ..parallel.shard_spec import parse_spec

Pool = list[tuple[torch.Tensor, ...]]


def kv_parts(module: Module, layout: ParallelLayout, contract: KVContract) -> tuple[int, ...]:
    """For each contract layer, into how many parts the TP group splits its heads (1: each rank
    holds them all)."""
    if layout.tp == 1:
        return (1,) * len(contract.layers)
    parts = {}
    for fn in module.functions.values():
        prod_of = {id(v): (n, i) for n in fn.nodes for i, v in enumerate(n.outputs)}
        for n in fn.nodes:
            if n.op == "attention" and n.attrs.get("kind") == "gqa":
                parts[n.attrs["layer"]] = _k_parts(module, prod_of, n)
    return tuple(parts.get(layer.layer, 1) if layer.kind == "gqa" else 1 for layer in contract.layers)


def _k_parts(module: Module, prod_of: dict[int, tuple[Node, int]], attn: Node) -> int:
    """The TP part count of the linear that makes the attention's K: walk back through split and
    per-head ops (rope, qk_norm_rope, norms) to it, keeping which key of a cat weight K is."""
    v: Value = attn.inputs[1]
    key = 0
    for _ in range(16):
        node, i = prod_of.get(id(v), (None, 0))
        if node is None:
            break
        if node.op == "linear":
            p = module.params[node.params["weight"]]
            spec = parse_spec(p.shard) if p.shard else None
            return 1 if spec is None or spec.group != "tp" else spec.count(key)
        if node.op == "split":
            key = i
            v = node.inputs[0]
        else:
            v = node.inputs[i] if len(node.outputs) > 1 else node.inputs[0]
    raise NanoForgeError(f"PD: cannot tell how the KV heads of layer {attn.attrs['layer']} ({attn.source}) are split "
                         "over the tp ranks (no sharded linear found before its K)")


def one_rank_contract(contract: KVContract, parts: tuple[int, ...]) -> KVContract:
    """The contract a one-rank plan of the same model has: each split layer's heads times its parts."""
    def widen(shapes: tuple[tuple[int, ...], ...], n: int) -> tuple[tuple[int, ...], ...]:
        return tuple((s[0] * n, *s[1:]) for s in shapes)

    layers = tuple(replace(layer, shapes=widen(layer.shapes, n), scale_shapes=widen(layer.scale_shapes, n))
                   if n > 1 else layer for layer, n in zip(contract.layers, parts))
    return replace(contract, layers=layers)


@dataclass
class KVShards:
    """Rank-local KV blocks (flat bytes, each pool tensor's blocks in turn) <-> one-rank buffers
    (one per pool tensor), for the `tp` ranks of one replica. `template`: a rank's pool, for the
    tensors' shapes and dtypes (every rank's are the same)."""

    template: Pool
    parts: tuple[int, ...]
    tp: int

    def _tensors(self) -> list[tuple[torch.Tensor, int]]:
        return [(t, n) for layer, n in zip(self.template, self.parts) for t in layer]

    def local_nbytes(self, num_blocks: int) -> int:
        return num_blocks * sum(t[0].numel() * t.element_size() for t, _ in self._tensors())

    def _views(self, flat: torch.Tensor, num_blocks: int) -> list[torch.Tensor]:
        out, at = [], 0
        for t, _ in self._tensors():
            n = num_blocks * t[0].numel() * t.element_size()
            out.append(flat[at:at + n].view(_raw(t).dtype).view(num_blocks, *t.shape[1:]))
            at += n
        return out

    def combine(self, ranks: list[torch.Tensor], num_blocks: int) -> list[memoryview]:
        """The tp ranks' flat local buffers -> one-rank buffers, one per pool tensor."""
        views = [self._views(r, num_blocks) for r in ranks]
        out = []
        for j, (_, n) in enumerate(self._tensors()):
            pieces = [views[p * self.tp // n][j] for p in range(n)]
            whole = pieces[0] if n == 1 else torch.cat(pieces, dim=2)
            out.append(memoryview(whole.contiguous().view(torch.uint8).numpy().reshape(-1)))
        return out

    def split(self, buffers: list, num_blocks: int) -> list[torch.Tensor]:
        """One-rank buffers (one per pool tensor) -> each tp rank's flat local buffer."""
        tensors = self._tensors()
        if len(buffers) != len(tensors):
            raise NanoForgeError(f"KV data has {len(buffers)} tensors, this pool {len(tensors)}")
        per_rank: list[list[torch.Tensor]] = [[] for _ in range(self.tp)]
        for buf, (t, n) in zip(buffers, tensors):
            shape = (num_blocks, t.shape[1], t.shape[2] * n, *t.shape[3:])  # [blocks, block_size, heads, ...]
            got, want = memoryview(buf).nbytes, prod(shape) * t.element_size()
            if got != want:
                raise NanoForgeError(f"KV data tensor of {got} bytes, expected {want} for {num_blocks} blocks of "
                                     f"shape {list(shape[1:])} {t.dtype}")
            whole = torch.frombuffer(bytearray(buf), dtype=torch.uint8).view(_raw(t).dtype).view(shape)
            chunks = whole.chunk(n, dim=2) if n > 1 else [whole]
            for r in range(self.tp):
                per_rank[r].append(chunks[r * n // self.tp].contiguous().view(torch.uint8).reshape(-1))
        return [torch.cat(p) if p else torch.empty(0, dtype=torch.uint8) for p in per_rank]


def pack_local(pool: Pool, block_ids: list[int]) -> torch.Tensor:
    """This rank's blocks of every pool tensor as one flat uint8 CPU tensor (KVShards' layout)."""
    ids = torch.tensor(block_ids, dtype=torch.long, device=pool[0][0].device)
    parts = [_raw(t).index_select(0, ids).cpu().contiguous().view(torch.uint8).reshape(-1) for layer in pool
             for t in layer]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)


def unpack_local(pool: Pool, block_ids: list[int], flat: torch.Tensor) -> None:
    """Write pack_local's layout into `block_ids` of this rank's pool."""
    ids = torch.tensor(block_ids, dtype=torch.long, device=pool[0][0].device)
    at = 0
    for layer in pool:
        for t in layer:
            n = len(block_ids) * t[0].numel() * t.element_size()
            src = flat[at:at + n].view(_raw(t).dtype).view(len(block_ids), *t.shape[1:])
            _raw(t).index_copy_(0, ids, src.to(t.device))
            at += n


def _raw(t: torch.Tensor) -> torch.Tensor:
    """t as plain bytes where torch lacks indexed copies for its dtype (FP8 KV)."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
