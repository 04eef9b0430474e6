"""PD KV migration over dlslime (`--kv-transport dlslime`), the tensor half: the prefill engine
registers every pool tensor (each attention layer's, draft layers' included, then the per-sequence
state pool's) as a dlslime memory region (`KVExport`); the decode engine reads a request's blocks,
and its state row, straight into its own pool, one batch of reads per request (`KVReader`). What
the two exchange to connect (addresses, region names and sizes) is plain data the serving layer
carries in its hello messages (msgpack). A CUDA pool in TCP mode is host-staged instead
(kv_staging.py): the prefill engine copies the request's rows into a pinned buffer, registered in
the pool's place, at kv_pull (whose reply says where: `staged`), the decode engine reads them into
a pinned buffer of its own and copies them into its pool.

dlslime moves bytes by RDMA where the host has a NIC (dlslime.available_nic()), over its own TCP
mode otherwise. What dlslime 0.1.23 does that this file works around:
- Its TCP mode reads host memory only (the wheel has no CUDA copies): a CUDA pool is read in place
  over RDMA only, and host-staged in TCP mode (either side; the other may read its pool in place).
- A TCP read opens a connection per assignment and completes when a 32-bit mask fills, one bit per
  assignment: more than 32 in one read() would complete early, so TCP reads go in groups of 32, two
  groups in flight; large assignments are split (TCP_SPLIT) so that a staged span, one contiguous
  run, still moves over several connections.
- A TCP read's future spins a core in wait() and holds the GIL in wait_for(t > 0): reads run in a
  helper thread that polls wait_for(0) and sleeps, while the caller waits on an Event.
- Its TCP server reads and writes any address a connected peer names (no region check): the
  prefill endpoint binds the engine's own host (127.0.0.1 unless the engine binds wider; probed
  first, since a failed bind only logs and then listens on every interface), and the reader checks
  every block id against the region sizes (and a staged span against the staging region), so a
  bad header never reads elsewhere.
- A read cannot be cancelled. At the deadline the reader shuts its endpoint down (TCP: the I/O
  thread is joined, nothing more lands in our pool; RDMA: dlslime fails the in-flight ops) and
  stays `broken`: the caller gives the blocks back for recompute and connects anew."""
from __future__ import annotations

import socket
import threading
import time
import uuid
from typing import Any

import torch

from ..errors import NanoForgeError
from .kv_staging import ExportStaging, ReadStaging, default_bytes, forced

Pool = list[tuple[torch.Tensor, ...]]
INSTALL = "pip install dlslime==0.1.23 (it needs libibverbs1 and libnuma1: apt-get install libibverbs1 libnuma1)"
TCP_GROUP = 32  # assignments per TCP read(): the width of dlslime's completion mask
TCP_IN_FLIGHT = 2  # TCP read() groups in flight (each assignment is one connection)
RDMA_PEERS = 64  # connected RDMA endpoints a prefill engine keeps, one per decode-side reader
TCP_SPLIT, TCP_MIN_PIECE = 16, 1 << 20  # a TCP read's bytes go over >= 16 connections, >= 1 MiB each
Assign = tuple[int, int, int, int, int]  # (local region, remote region, remote offset, local offset, bytes)


def load() -> Any:
    """The dlslime module, or a one-line error saying how to install it."""
    try:
        import dlslime
    except Exception as e:  # ImportError, or OSError when libibverbs / libnuma are missing
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise NanoForgeError(f"--kv-transport dlslime: dlslime does not import ({why}); install it: {INSTALL}") \
            from None
    return dlslime


def rdma_nics(dl: Any) -> list[str]:
    """The host's RDMA NICs as dlslime sees them ([]: its TCP mode)."""
    try:
        return [str(n) for n in dl.available_nic()]
    except Exception:  # no verbs devices at all
        return []


def check_usable(pool: Pool, state: Pool, staging_bytes: int | None = None) -> str:
    """At engine startup: dlslime imports; how it will move this pool (for the log)."""
    nics = rdma_nics(load())
    if not _staged(pool):
        return f"RDMA over {nics[0]}" if nics else "dlslime's TCP mode, the host pool read in place"
    n = staging_bytes if staging_bytes is not None else default_bytes([t for _, t in _regions(pool, state)])
    staged = (f"host-staged in dlslime's TCP mode (a prefill engine through {n / 2**20:.0f} MiB of pinned memory, "
              "--kv-staging-mib; a decode engine's grows to the largest request)")
    return f"RDMA over {nics[0]} (peers without a NIC: {staged})" if nics else staged


def _staged(pool: Pool) -> bool:
    """Whether TCP mode stages this pool through host buffers (it is on CUDA, or tests force it)."""
    return (bool(pool) and pool[0][0].device.type != "cpu") or forced()


def _regions(pool: Pool, state: Pool) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every pool tensor, then every state tensor: the order both sides use."""
    return [(f"kv.{i}", t) for i, t in enumerate(t for layer in pool for t in layer)] + \
        [(f"state.{i}", t) for i, t in enumerate(t for layer in state for t in layer)]


def _row_bytes(t: torch.Tensor) -> int:
    """Bytes of one block (pool) or one sequence's row (state); rows are contiguous."""
    return t[0].numel() * t.element_size()


def _register(ep: Any, regions: list[tuple[str, torch.Tensor]]) -> list[int]:
    out = []
    for name, t in regions:
        if not t.is_contiguous():
            raise NanoForgeError(f"dlslime: pool tensor {name} is not contiguous")
        h = ep.register_memory_region(name, t.data_ptr(), 0, t.numel() * t.element_size())
        if h < 0:
            raise NanoForgeError(f"dlslime: cannot register pool tensor {name} as a memory region")
        out.append(h)
    return out


class KVExport:
    """The prefill side: the pool registered once, answered to each decode engine's offer. TCP: one
    endpoint serves every reader. RDMA: one memory pool, a connected endpoint per reader."""

    def __init__(self, pool: Pool, state: Pool, host: str, staging_bytes: int | None = None):
        self.dl, self.host = load(), host
        self.regions = _regions(pool, state)
        self.num_kv = sum(len(layer) for layer in pool)
        self.staged = _staged(pool)  # TCP answers offer a staging buffer, not the pool
        self.staging_bytes = staging_bytes
        self.staging: ExportStaging | None = None  # made with the TCP endpoint
        self.tcp: Any = None
        self.rdma_pool: Any = None
        self.rdma: dict[str, Any] = {}  # reader id -> endpoint

    def answer(self, offer: Any) -> dict[str, Any]:
        """The hello reply's kv_dlslime for `offer` (a reader's): where to read, and the regions."""
        if not isinstance(offer, dict) or offer.get("kind") not in ("tcp", "rdma"):
            raise NanoForgeError("hello kv_dlslime must be a map with kind 'tcp' or 'rdma'")
        if offer["kind"] == "rdma" and rdma_nics(self.dl):
            ep = self._rdma_endpoint(offer)
            info = dict(ep.endpoint_info())
            mrs = info.pop("mr_info")
            return {"kind": "rdma", "endpoint": info, "regions": [[n, mrs[n]] for n, _ in self.regions]}
        if self.tcp is None:
            try:  # dlslime only logs a failed bind, then listens on every interface: try it first
                with socket.socket() as probe:
                    probe.bind((self.host, 0))
            except OSError as e:
                raise NanoForgeError(f"dlslime cannot listen on {self.host}: {e}") from None
            ep = self.dl.TcpEndpoint(self.host, 0)
            if self.staged:
                tensors = [t for _, t in self.regions]
                n = self.staging_bytes if self.staging_bytes is not None else default_bytes(tensors)
                self.staging = ExportStaging(tensors, self.num_kv, n)
                _register(ep, [("stage", self.staging.buf)])
            else:
                _register(ep, self.regions)
            self.tcp = ep
        info = self.tcp.endpoint_info()
        mrs = {n: {"addr": int(m["addr"]), "length": int(m["length"])} for n, m in info["mr_info"].items()}
        out = {"kind": "tcp", "endpoint": {"host": info["host"], "port": int(info["port"])}}
        if self.staging is not None:  # where the spans are, and how each request is laid out in one
            return {**out, "staged": mrs["stage"], "layout": [[n, _row_bytes(t), t.shape[0]] for n, t in self.regions]}
        return {**out, "regions": [[n, mrs[n]] for n, _ in self.regions]}

    def stage(self, key: str, block_ids: list[int], slot: int) -> dict[str, int]:
        """kv_pull of a staged reader: the request's rows into a span; {offset, length} of it."""
        if self.staging is None:
            raise NanoForgeError("this prefill engine stages no KV for dlslime (no TCP reader said hello)")
        return self.staging.stage(key, block_ids, slot)

    def unstage(self, key: str) -> None:
        """The parked request is freed (kv_ack, abort, park timeout): its span too."""
        if self.staging is not None:
            self.staging.free(key)

    def stats(self) -> dict[str, Any]:
        return self.staging.stats() if self.staging is not None else {}

    def _rdma_endpoint(self, offer: dict[str, Any]) -> Any:
        if self.rdma_pool is None:
            ctx = self.dl.RDMAContext()
            ctx.init(rdma_nics(self.dl)[0], 1, "auto")
            mem = self.dl.RDMAMemoryPool(ctx)
            for name, t in self.regions:
                mem.register_memory_region(t.data_ptr(), t.numel() * t.element_size(), name)
            self.rdma_pool = mem
        ep = self.dl.RDMAEndpoint(pool=self.rdma_pool, num_qp=1)
        ep.connect({k: v for k, v in dict(offer.get("endpoint") or {}).items() if k != "mr_info"})
        self.rdma[str(offer.get("id"))] = ep
        while len(self.rdma) > RDMA_PEERS:  # readers that broke come back with new ids: drop the oldest
            self.rdma.pop(next(iter(self.rdma))).shutdown()
        return ep

    def close(self) -> None:
        for ep in [self.tcp, *self.rdma.values()]:
            if ep is not None:
                ep.shutdown()
        self.tcp, self.rdma = None, {}


class KVReader:
    """The decode side, one per prefill engine: `offer()` goes in the hello, `connect(answer)` takes
    the reply, `read(...)` moves a request's blocks (and state row) into this engine's pool: in
    place, or through `staging` (a CUDA pool in TCP mode)."""

    def __init__(self, pool: Pool, state: Pool):
        self.dl = load()
        self.regions = _regions(pool, state)
        self.rows = [t.shape[0] for _, t in self.regions]
        self.row_bytes = [_row_bytes(t) for _, t in self.regions]
        self.num_kv = sum(len(layer) for layer in pool)
        self.staged = _staged(pool)  # in TCP mode: read into `staging`, then copy into the pool
        self.staging: ReadStaging | None = None
        self.stage_handle, self.stage_count = -1, 0
        nics = rdma_nics(self.dl)
        self.kind = "rdma" if nics else "tcp"
        self.id = uuid.uuid4().hex
        self.broken: str | None = None  # why this reader cannot be used again
        self.remote: list[tuple[int, int]] = []  # (region handle, rows) per region, in _regions' order
        self.remote_stage: tuple[int, int] | None = None  # (handle, bytes) of a staging prefill engine's buffer
        self.where = "?"
        if self.kind == "rdma":  # its endpoint info goes in the offer: the prefill side connects to it
            self.ep = self.dl.RDMAEndpoint(device_name=nics[0], ib_port=1, link_type="auto", num_qp=1)
        else:  # a listening socket dlslime opens whatever the use: keep it on loopback
            self.ep = self.dl.TcpEndpoint("127.0.0.1", 0)
        self.local = self._register_pool()

    def _register_pool(self) -> list[int]:
        """The pool as local regions, unless TCP mode stages it (its buffer registers when made)."""
        if self.kind == "tcp" and self.staged:
            self.staging = ReadStaging([t for _, t in self.regions], self.num_kv)
            return []
        return _register(self.ep, self.regions)

    def offer(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "id": self.id}
        if self.kind == "rdma":
            out["endpoint"] = {k: v for k, v in dict(self.ep.endpoint_info()).items() if k != "mr_info"}
        return out

    def connect(self, answer: Any, host: str | None = None) -> None:
        """Connect to the prefill engine's answer; `host` replaces a wildcard host in it (the
        address this engine reached the prefill engine at)."""
        if not isinstance(answer, dict) or answer.get("error"):
            raise NanoForgeError(f"dlslime: {answer.get('error') if isinstance(answer, dict) else 'no answer'}")
        kind, endpoint = answer.get("kind"), answer.get("endpoint")
        if kind != self.kind and not (self.kind == "rdma" and kind == "tcp"):
            raise NanoForgeError(f"dlslime: the prefill engine answered mode {kind!r} to an offer of {self.kind!r}")
        if not isinstance(endpoint, dict):
            raise NanoForgeError("dlslime: the prefill engine's answer names no endpoint")
        if kind == "tcp" and self.kind == "rdma":  # a prefill host without a NIC: TCP after all
            self.ep.shutdown()
            self.kind, self.ep = "tcp", self.dl.TcpEndpoint("127.0.0.1", 0)
            self.local = self._register_pool()
        if kind == "tcp":
            endpoint = {"host": host if endpoint.get("host") in ("0.0.0.0", "::", "") and host else
                        endpoint.get("host"), "port": endpoint.get("port")}
            self.where = f"{endpoint['host']}:{endpoint['port']}"
        else:
            self.where = f"{host or 'the prefill engine'} (RDMA)"
        self.ep.connect(endpoint)
        if kind == "tcp" and not self.ep.is_connected():
            raise NanoForgeError(f"dlslime: cannot reach the prefill engine's endpoint at {self.where}")
        if kind == "tcp" and answer.get("staged") is not None:
            self._connect_staged(answer["staged"], answer.get("layout"))
        else:
            self._connect_regions(answer.get("regions"))

    def _connect_regions(self, regions: Any) -> None:
        """The prefill pool's own regions (RDMA, or a host pool in TCP mode)."""
        if not isinstance(regions, list) or len(regions) != len(self.regions):
            raise NanoForgeError(f"dlslime: the prefill engine offers {len(regions or ())} memory regions, "
                                 f"this engine has {len(self.regions)}")
        self.remote = []
        for (name, t), (rname, info), rb in zip(self.regions, regions, self.row_bytes):
            if rname != name or not isinstance(info, dict) or type(info.get("length")) is not int:
                raise NanoForgeError(f"dlslime: region {rname!r} of the prefill engine where {name} was expected")
            h = self.ep.register_remote_memory_region(name, info)
            if h < 0:
                raise NanoForgeError(f"dlslime: cannot register the prefill engine's region {name}")
            self.remote.append((h, info["length"] // rb))

    def _connect_staged(self, staged: Any, layout: Any) -> None:
        """A staging prefill engine's buffer, and its pool's layout: [name, row bytes, rows] a region."""
        if not isinstance(staged, dict) or type(staged.get("addr")) is not int or \
                type(staged.get("length")) is not int or not isinstance(layout, list) or \
                len(layout) != len(self.regions):
            raise NanoForgeError(f"dlslime: the prefill engine stages {len(layout or ())} regions, this engine has "
                                 f"{len(self.regions)}")
        for (name, _), rb, row in zip(self.regions, self.row_bytes, layout):
            if not isinstance(row, list) or len(row) != 3 or row[:2] != [name, rb] or type(row[2]) is not int:
                raise NanoForgeError(f"dlslime: the prefill engine stages {row!r} where region {name} of {rb}-byte "
                                     "rows was expected")
        h = self.ep.register_remote_memory_region("stage", {"addr": staged["addr"], "length": staged["length"]})
        if h < 0:
            raise NanoForgeError("dlslime: cannot register the prefill engine's staging buffer")
        self.remote_stage, self.remote = (h, staged["length"]), [(-1, row[2]) for row in layout]

    def read(self, src_ids: list[int], dst_ids: list[int], src_slot: int, dst_slot: int, deadline: float,
             staged: Any = None) -> int:
        """Read blocks src_ids of the prefill pool into dst_ids of ours, and state row src_slot
        into dst_slot (-1: none), by time.monotonic() `deadline`; returns the bytes read. `staged`:
        the kv_pull reply's {offset, length} of a staging prefill engine's span."""
        if self.broken:
            raise NanoForgeError(self.broken)
        pieces = self._pieces(src_ids, dst_ids, src_slot, dst_slot)
        nbytes = sum(n * self.row_bytes[i] for i, _, _, n in pieces)
        span = self._span(staged, nbytes)
        if not pieces:
            return 0
        if self.staging is not None and (buf := self.staging.ensure(nbytes)) is not None:
            self.stage_count += 1
            self.stage_handle = _register(self.ep, [(f"stage.{self.stage_count}", buf)])[0]
        assigns = self._assigns(pieces, span)
        done, box = threading.Event(), {}

        def run() -> None:
            try:
                box["status"] = self._tcp(assigns) if self.kind == "tcp" else self.ep.read(assigns).wait()
            except Exception as e:  # reported to the caller
                box["error"] = e
            finally:
                done.set()

        threading.Thread(target=run, name="nanoforge-dlslime-read", daemon=True).start()
        t0 = time.monotonic()
        if not done.wait(max(0.0, deadline - t0)):
            self.close(f"dlslime read of {nbytes} bytes from {self.where} did not complete within "
                       f"{deadline - t0:.1f}s")
            raise NanoForgeError(self.broken)
        if "error" in box or box.get("status"):
            self.close(f"dlslime read from {self.where} failed: {box.get('error') or 'status %s' % box['status']}")
            raise NanoForgeError(self.broken)
        if self.staging is not None:  # into the pool, done before the engine reads it
            self.staging.land(dst_ids, dst_slot if src_slot >= 0 else -1, nbytes)
        return nbytes

    def _pieces(self, src_ids: list[int], dst_ids: list[int], src_slot: int,
                dst_slot: int) -> list[tuple[int, int, int, int]]:
        """(region, source row, row here, rows) per contiguous run of blocks of each pool tensor,
        then the state row: the staged layout's order. Every id checked against both regions."""
        if len(src_ids) != len(dst_ids):
            raise NanoForgeError(f"dlslime: {len(src_ids)} source blocks for {len(dst_ids)} blocks here")
        runs: list[list[int]] = []  # [src, dst, count]
        for s, d in zip(src_ids, dst_ids):
            if type(s) is not int or type(d) is not int:
                raise NanoForgeError("dlslime: block ids must be ints")
            if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
                runs[-1][2] += 1
            else:
                runs.append([s, d, 1])
        rows = [(i, s, d, n) for i in range(self.num_kv) for s, d, n in runs]
        if (src_slot >= 0) != (dst_slot >= 0) and len(self.regions) > self.num_kv:
            raise NanoForgeError(f"dlslime: state row {src_slot} of the prefill engine for row {dst_slot} here")
        if src_slot >= 0 and dst_slot >= 0:
            rows += [(i, src_slot, dst_slot, 1) for i in range(self.num_kv, len(self.regions))]
        for i, s, d, n in rows:
            remote_rows = self.remote[i][1]
            if s < 0 or s + n > remote_rows or d < 0 or d + n > self.rows[i]:
                raise NanoForgeError(f"dlslime: rows {s}..{s + n - 1} -> {d}..{d + n - 1} are outside region "
                                     f"{self.regions[i][0]} ({remote_rows} rows there, {self.rows[i]} here)")
        return rows

    def _span(self, staged: Any, nbytes: int) -> int | None:
        """The remote offset of a staged request's span (None: the prefill pool is read in place),
        checked against the staging region: a bad header never reads outside it."""
        if self.remote_stage is None:
            if staged is not None:
                raise NanoForgeError("dlslime: a staged span from a prefill engine that offered its pool")
            return None
        if not isinstance(staged, dict) or type(staged.get("offset")) is not int or staged.get("length") != nbytes:
            raise NanoForgeError(f"dlslime: the prefill engine stages {staged!r}; wanted {{offset, length: "
                                 f"{nbytes}}}")
        if staged["offset"] < 0 or staged["offset"] + nbytes > self.remote_stage[1]:
            raise NanoForgeError(f"dlslime: staged bytes {staged['offset']}..{staged['offset'] + nbytes} are outside "
                                 f"the prefill engine's staging region ({self.remote_stage[1]} bytes)")
        return staged["offset"]

    def _assigns(self, pieces: list[tuple[int, int, int, int]], span: int | None) -> list[Assign]:
        """One assignment per piece, from the prefill pool or its staged span (from `span` on, in
        layout order) into our pool or our staging buffer (from 0); runs contiguous on both ends
        merge, and in TCP mode large ones split over connections."""
        out: list[Assign] = []
        at = 0
        for i, s, d, n in pieces:
            rb = self.row_bytes[i]
            remote = (self.remote_stage[0], span + at) if span is not None and self.remote_stage is not None \
                else (self.remote[i][0], s * rb)
            local = (self.stage_handle, at) if self.staging is not None else (self.local[i], d * rb)
            last = out[-1] if out else None
            if last and last[:2] == (local[0], remote[0]) and last[2] + last[4] == remote[1] and \
                    last[3] + last[4] == local[1]:
                out[-1] = (*last[:4], last[4] + n * rb)
            else:
                out.append((local[0], remote[0], remote[1], local[1], n * rb))
            at += n * rb
        if self.kind != "tcp":
            return out
        size = max(TCP_MIN_PIECE, -(-at // TCP_SPLIT))
        return [(lh, rh, ro + k, lo + k, min(size, n - k)) for lh, rh, ro, lo, n in out for k in range(0, n, size)]

    def _tcp(self, assigns: list[Assign]) -> int:
        """The helper thread's TCP reads: groups of TCP_GROUP assignments, TCP_IN_FLIGHT at a time,
        polled; stops when the reader is closed (its futures then never complete)."""
        groups = [assigns[i:i + TCP_GROUP] for i in range(0, len(assigns), TCP_GROUP)]
        pending: list[Any] = []
        nap = 2e-4
        while (groups or pending) and not self.broken:
            while groups and len(pending) < TCP_IN_FLIGHT:
                pending.append(self.ep.read(groups.pop(0)))
            still = []
            for f in pending:
                st = f.wait_for(0)
                if st is None:
                    still.append(f)
                elif st:
                    return int(st)
            if len(still) == len(pending):
                time.sleep(nap)
                nap = min(nap * 2, 5e-3)
            else:
                nap = 2e-4
            pending = still
        return 0 if not self.broken else -1

    def close(self, why: str = "dlslime reader closed") -> None:
        """Shut the endpoint down (nothing more lands in the pool afterwards); the reader is broken."""
        if self.broken is None:
            self.broken = why
            self.ep.shutdown()
