"""Moving KV blocks between two engines' pools (PD disaggregation), the tensor half: the serving
layer (serving/kv_migration.py) carries what these functions produce and never touches tensors.

Host-staged: `gather_blocks` copies blocks of every pool tensor to host bytes (one buffer per
tensor, layer by layer), `scatter_blocks` writes such buffers into another pool. Same-host GPU:
`export_ipc` describes the pool's CUDA storages as msgpack-able CUDA IPC handles (never pickle),
`open_ipc` maps them in another process and `copy_blocks` copies device to device. Both sides
have checked that their KV contracts match, so the shapes agree block for block.

`KVStore` is the pool as PD reads and writes it, in the one-rank layout: `local_store` for an
engine of one rank; a sharded engine's DistributedRunner.kv_store() moves the blocks through its
ranks (kv_shards.py), so engines of different layouts pair.

Per-sequence state (recurrent layers: kernels/context.allocate_state) is laid out like a pool with
one row per sequence instead of one block per 16 tokens: `gather_state` / `scatter_state` move a
parked sequence's row (every recurrent layer's tensors) with the same code, as extra buffers of the
same kv_data message."""
from __future__ import annotations

import socket
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import NanoForgeError
from ..kv_contract import KVContract

Pool = list[tuple[torch.Tensor, ...]]


@dataclass
class KVStore:
    """Reads and writes of a request's blocks in the one-rank layout. `read(replica, block_ids,
    ready)` -> one host buffer per pool tensor; `write(replica, block_ids, buffers)` -> bytes
    written. The replica is the attention-DP replica that owns the request (0 otherwise)."""

    contract: KVContract  # what a one-rank plan of the model holds: what engines compare when they pair
    layout: str  # the engine's parallel layout, for messages ("one rank", "tp=2", ...)
    pool: Pool  # this process's pool (rank 0's share of a sharded engine's)
    read: Callable[[int, list[int], Any], list[memoryview]]
    write: Callable[[int, list[int], list[Any]], int]
    sharded: bool = False  # blocks live on several ranks: no CUDA IPC of `pool`
    state: Pool = field(default_factory=list)  # per-sequence state pool, a row per slot ([]: no recurrent layers)


def local_store(pool: Pool, contract: KVContract, state: Pool | None = None) -> KVStore:
    """The store of a one-rank engine: its pool (and state pool), directly."""
    return KVStore(contract, "one rank", pool, lambda _r, ids, ready: gather_blocks(pool, ids, ready),
                   lambda _r, ids, bufs: scatter_blocks(pool, ids, bufs), state=list(state or []))


def pool_device(pool: Pool) -> torch.device:
    return pool[0][0].device


def _raw(t: torch.Tensor) -> torch.Tensor:
    """t as plain bytes where torch lacks indexed copies for its dtype (FP8 KV: index_copy_ of e4m3)."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def block_nbytes(pool: Pool) -> int:
    """Bytes of one block over all layers and pool tensors."""
    return sum(t[0].numel() * t.element_size() for layer in pool for t in layer)


def gather_blocks(pool: Pool, block_ids: list[int], ready: Any = None) -> list[memoryview]:
    """Host copies of `block_ids` of every pool tensor (layer by layer), as raw bytes. `ready`: a
    CUDA event the writes of those blocks were recorded at (another thread wrote them)."""
    if ready is not None:
        ready.synchronize()
    ids = torch.tensor(block_ids, dtype=torch.long, device=pool_device(pool))
    out = []
    for layer in pool:
        for t in layer:
            blocks = t.index_select(0, ids).cpu().contiguous()  # bf16 / fp8 have no numpy dtype: go
            out.append(memoryview(blocks.view(torch.uint8).numpy().reshape(-1)))  # through uint8
    return out


def scatter_blocks(pool: Pool, block_ids: list[int], buffers: list[Any]) -> int:
    """Write gather_blocks' buffers (from a pool of the same contract) into `block_ids`; returns
    the bytes written. A buffer of the wrong size raises (a peer that lies about its layout)."""
    tensors = [t for layer in pool for t in layer]
    if len(buffers) != len(tensors):
        raise NanoForgeError(f"KV data has {len(buffers)} tensors, this pool {len(tensors)}")
    if not block_ids:
        return 0
    ids = torch.tensor(block_ids, dtype=torch.long, device=pool_device(pool))
    total = 0
    with warnings.catch_warnings():  # frombuffer warns on read-only buffers; we only read them
        warnings.simplefilter("ignore", UserWarning)
        for t, buf in zip(tensors, buffers):
            want = len(block_ids) * t[0].numel() * t.element_size()
            n = memoryview(buf).nbytes
            if n != want:
                raise NanoForgeError(f"KV data tensor of {n} bytes, expected {want} for {len(block_ids)} blocks "
                                     f"of shape {list(t.shape[1:])} {t.dtype}")
            src = torch.frombuffer(buf, dtype=torch.uint8).view(_raw(t).dtype).view(len(block_ids), *t.shape[1:])
            _raw(t).index_copy_(0, ids, src.to(t.device))
            total += n
    if pool_device(pool).type == "cuda":  # done before the engine thread may read the blocks
        torch.cuda.synchronize(pool_device(pool))
    return total


def gather_state(state: Pool, slot: int, ready: Any = None) -> list[memoryview]:
    """Host copies of state row `slot` of every recurrent layer's tensors (a sequence's state after
    its last computed token), as raw bytes; [] for a plan without per-sequence state."""
    return gather_blocks(state, [slot], ready) if state else []


def scatter_state(state: Pool, slot: int, buffers: list[Any]) -> int:
    """Write gather_state's buffers into row `slot`; returns the bytes written. A count or size
    that differs from this pool's raises (both sides compared contracts, so a peer that lies)."""
    n = sum(len(layer) for layer in state)
    if len(buffers) != n:
        raise NanoForgeError(f"state data has {len(buffers)} tensors, this engine's state pool {n}")
    if slot < 0 and n:
        raise NanoForgeError("state data for a sequence that holds no state row")
    return scatter_blocks(state, [slot], buffers) if n else 0


def copy_blocks(src: Pool, src_ids: list[int], dst: Pool, dst_ids: list[int]) -> int:
    """Device-to-device copy (peer copy across GPUs) of src blocks into dst blocks; waits for it."""
    if len(src_ids) != len(dst_ids):
        raise NanoForgeError(f"KV copy of {len(src_ids)} blocks into {len(dst_ids)}")
    if not src_ids:
        return 0
    s_ids = torch.tensor(src_ids, dtype=torch.long, device=pool_device(src))
    d_ids = torch.tensor(dst_ids, dtype=torch.long, device=pool_device(dst))
    total = 0
    for s_layer, d_layer in zip(src, dst, strict=True):
        for s, d in zip(s_layer, d_layer, strict=True):
            _raw(d).index_copy_(0, d_ids, _raw(s).index_select(0, s_ids).to(d.device))
            total += len(src_ids) * s[0].numel() * s.element_size()
    if pool_device(dst).type == "cuda":
        torch.cuda.synchronize(pool_device(dst))
        torch.cuda.synchronize(pool_device(src))
    return total


def generator_state(gen: torch.Generator | None) -> bytes | None:
    """A seeded request's RNG state, so the decode engine draws what one engine would have."""
    return None if gen is None else gen.get_state().numpy().tobytes()


def set_generator_state(gen: torch.Generator | None, state: bytes | None) -> None:
    if gen is not None and state:
        gen.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))


# -- CUDA IPC (same host) -------------------------------------------------------------------------
def _device_uuid(index: int) -> str:
    return str(getattr(torch.cuda.get_device_properties(index), "uuid", "")) or f"index:{index}"


def export_ipc(pool: Pool) -> dict[str, Any]:
    """CUDA IPC handles of every pool tensor's storage: plain bytes / ints, safe for msgpack. The
    device is named by UUID, since two processes may number the same GPU differently."""
    if pool_device(pool).type != "cuda":
        raise NanoForgeError("CUDA IPC needs a KV pool on a CUDA device")
    tensors = []
    for layer in pool:
        for t in layer:
            dev, handle, size, offset, rc_handle, rc_offset, ev_handle, ev_sync = t.untyped_storage()._share_cuda_()
            tensors.append({"handle": [handle, int(size), int(offset), rc_handle, int(rc_offset), ev_handle,
                                       bool(ev_sync)], "device_uuid": _device_uuid(dev), "shape": list(t.shape),
                            "stride": list(t.stride()), "storage_offset": t.storage_offset(),
                            "dtype": str(t.dtype).removeprefix("torch.")})
    return {"host": socket.gethostname(), "tensors": tensors, "layers": [len(layer) for layer in pool]}


def open_ipc(info: dict[str, Any]) -> Pool:
    """Map another process's pool (export_ipc's description) into this one, tensor by tensor."""
    uuids = {_device_uuid(i): i for i in range(torch.cuda.device_count())}
    torch.cuda._lazy_init()
    flat = []
    for d in info["tensors"]:
        local = uuids.get(d["device_uuid"])
        if local is None:
            raise NanoForgeError(f"CUDA IPC: device {d['device_uuid']} of the source pool is not visible here")
        handle, size, offset, rc_handle, rc_offset, ev_handle, ev_sync = d["handle"]
        with torch.cuda.device(local):
            storage = torch.UntypedStorage._new_shared_cuda(local, handle, size, offset, rc_handle, rc_offset,
                                                            ev_handle, ev_sync)
        dtype = getattr(torch, d["dtype"])
        typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)
        flat.append(torch._utils._rebuild_tensor(typed, d["storage_offset"], tuple(d["shape"]), tuple(d["stride"])))
    pool, i = [], 0
    for n in info["layers"]:
        pool.append(tuple(flat[i:i + n]))
        i += n
    return pool
