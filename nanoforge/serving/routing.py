"""Routing strategies: which engine gets the next request. Pure and synchronous (no I/O).

The router keeps an EngineLoad per candidate engine and calls `choose`; strategies only compare
numbers and remember prefixes, so they are tested without processes or sockets.
"""
from __future__ import annotations

import inspect
from collections import OrderedDict
from dataclasses import dataclass

from nanoforge.errors import NanoForgeError

STRATEGIES = ("round-robin", "least-loaded", "prefix-aware")


@dataclass
class EngineLoad:
    """One candidate engine as the router sees it."""

    key: str  # engine instance (or addr)
    in_flight: int = 0  # requests the router has outstanding there (always fresh)
    kv_usage: float = 0.0  # 0..1 from the engine's stats; may be stale
    num_waiting: int = 0  # engine-reported queue length; may be stale

    @property
    def load(self) -> int:
        return self.in_flight + self.num_waiting


def _check(candidates: list[EngineLoad]) -> None:
    if not candidates:
        raise NanoForgeError("no engine available")


def least_loaded(candidates: list[EngineLoad]) -> EngineLoad:
    """Fewest in-flight + waiting; tie -> lower kv_usage; tie -> earlier in the list."""
    _check(candidates)
    return min(candidates, key=lambda c: (c.load, c.kv_usage))  # min keeps the first of equals


class _NoMemory:
    """observe/forget for strategies that remember nothing, so the router calls every one alike."""

    def observe(self, engine_key: str, prompt_ids: list[int]) -> None:
        pass

    def forget(self, key: str) -> None:
        pass


class RoundRobin(_NoMemory):
    """Cycles through the candidates; ignores load and prompt."""

    def __init__(self) -> None:
        self._next = 0

    def choose(self, candidates: list[EngineLoad], prompt_ids: list[int]) -> EngineLoad:
        _check(candidates)
        chosen = candidates[self._next % len(candidates)]
        self._next += 1
        return chosen


class LeastLoaded(_NoMemory):
    """Sends each request where the fewest requests are in flight or queued."""

    def choose(self, candidates: list[EngineLoad], prompt_ids: list[int]) -> EngineLoad:
        return least_loaded(candidates)


class PrefixAware:
    """Sends a prompt to the engine that last served its longest prefix, so its prefix cache hits.

    The prompt is hashed in full blocks of `block_size` tokens as a chain (block i's hash covers
    blocks 0..i), so one dict lookup per block tells who served that whole prefix. Locality yields
    to balance when the matching engine has more than `max_imbalance` requests above the least
    loaded one. Only full blocks count, as in the engines' prefix cache.
    """

    def __init__(self, block_size: int = 16, max_imbalance: int = 8, max_entries: int = 100_000):
        if block_size < 1 or max_imbalance < 0 or max_entries < 1:
            raise NanoForgeError(f"prefix-aware routing needs block_size >= 1, max_imbalance >= 0, "
                                 f"max_entries >= 1 (got {block_size}, {max_imbalance}, {max_entries})")
        self.block_size, self.max_imbalance, self.max_entries = block_size, max_imbalance, max_entries
        self._owner: OrderedDict[int, str] = OrderedDict()  # chain hash -> engine key, LRU order

    def chain_hashes(self, prompt_ids: list[int]) -> list[int]:
        out, h, bs = [], 0, self.block_size
        for i in range(0, len(prompt_ids) - bs + 1, bs):
            h = hash((h, tuple(prompt_ids[i:i + bs])))  # ints and tuples hash the same in every process
            out.append(h)
        return out

    def match(self, candidates: list[EngineLoad], prompt_ids: list[int]) -> tuple[EngineLoad | None, int]:
        """(candidate holding the longest cached prefix, its length in blocks), or (None, 0)."""
        by_key = {c.key: c for c in candidates}
        chains = self.chain_hashes(prompt_ids)
        for depth in range(len(chains), 0, -1):
            owner = self._owner.get(chains[depth - 1])
            if owner in by_key:
                return by_key[owner], depth
        return None, 0

    def choose(self, candidates: list[EngineLoad], prompt_ids: list[int]) -> EngineLoad:
        best = least_loaded(candidates)
        hit, _ = self.match(candidates, prompt_ids)
        chosen = hit if hit is not None and hit.load - best.load <= self.max_imbalance else best
        self.observe(chosen.key, prompt_ids)
        return chosen

    def observe(self, engine_key: str, prompt_ids: list[int]) -> None:
        """Record that engine_key now holds this prompt's prefix (choose does this itself)."""
        # deepest first, so the shared short prefixes are the most recent and evicted last
        for h in reversed(self.chain_hashes(prompt_ids)):
            self._owner[h] = engine_key
            self._owner.move_to_end(h)
        while len(self._owner) > self.max_entries:
            self._owner.popitem(last=False)

    def forget(self, key: str) -> None:
        """Drop everything known about an engine (it left the registry; its cache is gone)."""
        for h in [h for h, k in self._owner.items() if k == key]:
            del self._owner[h]

    def __len__(self) -> int:
        return len(self._owner)


_CLASSES = {"round-robin": RoundRobin, "least-loaded": LeastLoaded, "prefix-aware": PrefixAware}


def make_strategy(name: str, **kw):
    """Strategy by its CLI name; options (e.g. block_size) must be ones that strategy takes."""
    cls = _CLASSES.get(name)
    if cls is None:
        raise NanoForgeError(f"unknown routing strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    try:
        inspect.signature(cls).bind(**kw)
    except TypeError as e:
        raise NanoForgeError(f"routing strategy {name!r}: {e}") from None
    return cls(**kw)
