"""Rows of the per-sequence state pool (recurrent layers: kernels/context.allocate_state): one per
running sequence, taken when its first blocks are, given back with its blocks (finish, abort,
preemption), so the scheduler admits a sequence only while a row is free."""
from __future__ import annotations

from ..errors import NanoForgeError
from ..kv_contract import KVContract


class StateSlots:
    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.free = list(range(num_slots - 1, -1, -1))  # pop() hands out 0, 1, ... first

    @property
    def num_free(self) -> int:
        return len(self.free)

    def take(self) -> int:
        return self.free.pop()

    def give_back(self, slot: int) -> None:
        assert 0 <= slot < self.num_slots and slot not in self.free, f"state slot {slot} freed twice"
        self.free.append(slot)


def check_state_support(contract: KVContract, sharded: bool) -> None:
    """Refuse, in one line, what per-sequence state cannot do yet (never run it wrong). Speculation
    works: verify steps keep the state after each draft row and roll back to the last accepted one."""
    if not contract.state:
        return
    if sharded:
        raise NanoForgeError(f"this plan's {len(contract.state)} recurrent layers keep per-sequence state, which "
                             "sharded plans do not handle yet; compile it for one rank")


def prefix_caching_note(contract: KVContract, asked: bool) -> str:
    """"on", or "off: why" (shown by the engine's metrics, the server's start-up line and inspect)."""
    if not asked:
        return "off: disabled"
    why = contract.prefix_cache_blocker()
    return "on" if why is None else f"off: {why}"
