"""Host staging for PD KV over dlslime's TCP mode, which moves host memory only (the 0.1.23 wheel
has no CUDA copies): a CUDA pool's rows go through pinned host buffers that kv_dlslime.py registers
as one dlslime memory region each. The prefill side (`ExportStaging`) copies a request's rows
device to host into a span of its buffer at kv_pull, found first fit and held until the parked
request is freed (kv_ack, abort, park timeout); a request that does not fit now is refused (the
decode engine recomputes it). The decode side (`ReadStaging`) reads the span into a buffer of its
own, grown to the largest request, then copies host to device into its pool. Both lay a request
out alike: region by region (kv.* then state.*), each region's rows in the order the header names
them (`rows_per_region`), so a span needs no index of its own. NANOFORGE_DLSLIME_STAGE=1 stages a
CPU pool too (tests: the CUDA path's logic, on CPU)."""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

import torch

from ..errors import NanoForgeError

ALIGN = 256  # span starts
DEFAULT_MAX = 1 << 30  # default staging: the pool's size, at most 1 GiB


def forced() -> bool:
    """NANOFORGE_DLSLIME_STAGE=1: host-stage a CPU pool too (tests)."""
    return os.environ.get("NANOFORGE_DLSLIME_STAGE") == "1"


def default_bytes(tensors: list[torch.Tensor]) -> int:
    """min(1 GiB, the pool's size): with a smaller pool every parked request fits at once."""
    return min(DEFAULT_MAX, sum(t.numel() * t.element_size() for t in tensors))


def host_buffer(nbytes: int, pinned: bool) -> torch.Tensor:
    """nbytes of host memory, page-locked when `pinned` (CUDA copies run asynchronously from it)."""
    return torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pinned)


def byte_rows(t: torch.Tensor) -> torch.Tensor:
    """A contiguous pool tensor as [rows, bytes a row] of uint8 (any dtype: FP8 too)."""
    return t.view(torch.uint8).view(t.shape[0], -1)


def rows_per_region(num_kv: int, num_regions: int, block_ids: list[int], slot: int) -> list[list[int]]:
    """A request's rows in each region: its blocks in every pool tensor, its state row (slot >= 0)."""
    return [block_ids] * num_kv + [[slot] if slot >= 0 else []] * (num_regions - num_kv)


class _Copier:
    """Copies between pool rows and a host buffer, on a stream of its own (CUDA): the engine's
    queued steps need not finish first, and a copy is done when the call returns."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.rows = [byte_rows(t) for t in tensors]
        self.device = tensors[0].device if tensors else torch.device("cpu")
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def _ids(self, rows: list[list[int]]) -> list[torch.Tensor | None]:
        made: dict[int, torch.Tensor] = {}  # kv regions share one list: one index tensor
        for r in rows:
            if r and id(r) not in made:
                made[id(r)] = torch.tensor(r, dtype=torch.long, device=self.device)
        return [made.get(id(r)) if r else None for r in rows]

    def copy(self, rows: list[list[int]], buf: torch.Tensor, at: int, out: bool) -> int:
        """out: the rows into buf from `at`, in layout order; else buf's bytes into the rows.
        Returns the bytes copied."""
        start = at
        ctx = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with ctx:
            for t, r, idx in zip(self.rows, rows, self._ids(rows)):
                if idx is None:
                    continue
                n = len(r) * t.shape[1]
                host = buf[at:at + n].view(len(r), t.shape[1])
                if not out:
                    t.index_copy_(0, idx, host.to(self.device, non_blocking=True))
                elif self.stream is None:
                    torch.index_select(t, 0, idx, out=host)
                else:
                    host.copy_(t.index_select(0, idx), non_blocking=True)
                at += n
        if self.stream is not None:
            self.stream.synchronize()
        return at - start


class Spans:
    """First-fit spans of a buffer of `size` bytes, one per key (a request id) until freed;
    thread-safe (taken on the server's I/O thread, freed on the engine thread)."""

    def __init__(self, size: int):
        self.size, self.held, self.lock = size, {}, threading.Lock()

    def take(self, key: str, n: int) -> int | None:
        """The offset of n bytes held for key (a span key held already is freed first), or None."""
        with self.lock:
            self.held.pop(key, None)
            at = 0
            for s, e in sorted(self.held.values()):
                if at + n <= s:
                    break
                at = -(-e // ALIGN) * ALIGN
            if at + n > self.size:
                return None
            self.held[key] = (at, at + n)
            return at

    def free(self, key: str) -> bool:
        with self.lock:
            return self.held.pop(key, None) is not None


class ExportStaging:
    """The prefill side's pinned buffer: `stage` copies a parked request's rows into a span of it
    (the kv_pull reply says where), `free` gives the span back when the request is unparked."""

    def __init__(self, tensors: list[torch.Tensor], num_kv: int, nbytes: int):
        self.copier, self.num_kv, self.num_regions = _Copier(tensors), num_kv, len(tensors)
        self.row_bytes = [t.shape[1] for t in self.copier.rows]
        self.buf = host_buffer(nbytes, self.copier.device.type == "cuda")
        self.spans = Spans(nbytes)
        self.full = self.staged = 0  # pulls refused for want of room, requests staged

    def stage(self, key: str, block_ids: list[int], slot: int) -> dict[str, int]:
        """Copy the rows into a span held for `key`; {offset, length} of it. The caller keeps the
        rows from being freed meanwhile (EngineLoop.parked_lock)."""
        rows = rows_per_region(self.num_kv, self.num_regions, block_ids, slot)
        n = sum(len(r) * rb for r, rb in zip(rows, self.row_bytes))
        at = self.spans.take(key, n)
        if at is None:
            self.full += 1
            raise NanoForgeError(f"dlslime staging: no room for {n} bytes now ({self.spans.size} bytes of host "
                                 f"staging, {len(self.spans.held)} requests held; --kv-staging-mib); recompute it")
        try:
            self.copier.copy(rows, self.buf, at, out=True)
        except Exception:
            self.spans.free(key)
            raise
        self.staged += 1
        return {"offset": at, "length": n}

    def free(self, key: str) -> None:
        self.spans.free(key)

    def stats(self) -> dict[str, Any]:
        return {"kv_staging_bytes": self.spans.size, "kv_staging_held": len(self.spans.held),
                "kv_staging_full": self.full, "kv_staged": self.staged}


class ReadStaging:
    """The decode side's buffer: a request is read into it (`ensure` first, which may grow it:
    the caller registers the new one), then `land` copies it into the pool rows."""

    def __init__(self, tensors: list[torch.Tensor], num_kv: int):
        self.copier, self.num_kv, self.num_regions = _Copier(tensors), num_kv, len(tensors)
        self.buf: torch.Tensor | None = None

    def ensure(self, n: int) -> torch.Tensor | None:
        """A new buffer when the current one holds fewer than n bytes (a power of two, >= 1 MiB)."""
        if self.buf is not None and self.buf.numel() >= n:
            return None
        self.buf = host_buffer(max(1 << 20, 1 << (n - 1).bit_length()), self.copier.device.type == "cuda")
        return self.buf

    def land(self, block_ids: list[int], slot: int, nbytes: int) -> None:
        if self.buf is None:
            raise NanoForgeError("dlslime staging: nothing was read")
        rows = rows_per_region(self.num_kv, self.num_regions, block_ids, slot)
        if self.copier.copy(rows, self.buf, 0, out=False) != nbytes:
            raise NanoForgeError("dlslime staging: the rows landed differ from the bytes read")
