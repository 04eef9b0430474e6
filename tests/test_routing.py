"""Routing strategies: pure functions of the candidates' loads and the prompt."""
import pytest

from nanoforge.errors import NanoForgeError
from nanoforge.serving.routing import (STRATEGIES, EngineLoad, LeastLoaded, PrefixAware, RoundRobin,
                                       make_strategy)


def loads(*spec):
    return [EngineLoad(f"e{i}", *s) if isinstance(s, tuple) else EngineLoad(f"e{i}", s) for i, s in enumerate(spec)]


def prompt(seed, n=64):
    return [(seed * 1000 + i) % 50_000 for i in range(n)]


def test_empty_candidates():
    for name in STRATEGIES:
        with pytest.raises(NanoForgeError, match="no engine available"):
            make_strategy(name).choose([], [1, 2, 3])


def test_round_robin_cycles():
    rr, c = RoundRobin(), loads(0, 5, 9)
    assert [rr.choose(c, []).key for _ in range(7)] == ["e0", "e1", "e2", "e0", "e1", "e2", "e0"]


def test_least_loaded_and_ties():
    ll = LeastLoaded()
    assert ll.choose(loads(3, 1, 2), []).key == "e1"
    # in_flight + num_waiting counts: e0 has 1 + 4 waiting
    assert ll.choose(loads((1, 0.0, 4), (2, 0.0, 0)), []).key == "e1"
    # equal load -> lower kv_usage
    assert ll.choose(loads((2, 0.9), (2, 0.2), (2, 0.5)), []).key == "e1"
    # equal everything -> first in the list
    assert ll.choose(loads((2, 0.5), (2, 0.5)), []).key == "e0"
    assert ll.choose(list(reversed(loads((2, 0.5), (2, 0.5)))), []).key == "e1"


def test_prefix_aware_keeps_shared_prefix_on_one_engine():
    pa = PrefixAware(block_size=16)
    c = loads(0, 0, 0)
    system = prompt(1, 48)
    first = pa.choose(c, system + prompt(2, 20))
    assert first.key == "e0"  # nothing cached: least loaded, first of equals
    # the engine that served the prefix is now busier, yet the shared prefix still wins
    c[0].in_flight = 3
    assert pa.choose(c, system + prompt(3, 30)).key == "e0"
    # a prompt shorter than one block has no chain: least loaded
    assert pa.choose(c, system[:10]).key == "e1"


def test_prefix_aware_picks_longest_match_and_spreads_new_prefixes():
    pa = PrefixAware(block_size=4)
    c = loads(0, 0, 0)
    base = prompt(7, 8)
    pa.observe("e1", base)  # e1 holds 2 blocks
    pa.observe("e2", base + prompt(8, 8))  # e2 holds 4 blocks of a longer prompt; e1's blocks move to e2
    hit, depth = pa.match(c, base + prompt(8, 4) + prompt(9, 8))
    assert (hit.key, depth) == ("e2", 3)
    # unrelated prefixes go where load is least
    c = loads(2, 0, 1)
    assert pa.choose(c, prompt(20)).key == "e1"
    c[1].in_flight = 5
    assert pa.choose(c, prompt(21)).key == "e2"
    # each then sticks to its engine
    assert pa.choose(c, prompt(20)).key == "e1"
    assert pa.choose(c, prompt(21)).key == "e2"


def test_prefix_aware_falls_back_when_imbalanced():
    pa = PrefixAware(block_size=16, max_imbalance=8)
    p = prompt(5)
    pa.observe("e0", p)
    assert pa.choose(loads(8, 0), p).key == "e0"  # 8 above the least loaded: still within bounds
    assert pa.choose(loads((5, 0.0, 4), 0), p).key == "e1"  # 9 above (in flight + waiting): fall back
    assert pa.match(loads(0, 0), p)[0].key == "e1"  # and the prefix now follows e1


def test_prefix_aware_ignores_engines_not_among_candidates_and_forget():
    pa = PrefixAware(block_size=8)
    p = prompt(3)
    pa.observe("gone", p)
    assert pa.choose(loads(1, 0), p).key == "e1"
    pa.observe("e0", prompt(4))
    n = len(pa)
    pa.forget("e0")
    assert len(pa) == n - len(prompt(4)) // 8
    assert pa.match(loads(0, 0), prompt(4)) == (None, 0)
    assert pa.match(loads(0, 0), p)[0].key == "e1"  # others' entries are kept


def test_prefix_aware_lru_is_bounded():
    pa = PrefixAware(block_size=4, max_entries=10)
    for s in range(20):
        pa.observe(f"e{s % 3}", prompt(s, 16))  # 4 chains each
    assert len(pa) == 10
    assert pa.match(loads(0, 0, 0), prompt(19, 16))[0].key == "e1"  # the newest survives


def test_make_strategy():
    assert isinstance(make_strategy("round-robin"), RoundRobin)
    assert isinstance(make_strategy("least-loaded"), LeastLoaded)
    pa = make_strategy("prefix-aware", block_size=32, max_imbalance=2)
    assert isinstance(pa, PrefixAware) and pa.block_size == 32 and pa.max_imbalance == 2
    with pytest.raises(NanoForgeError, match=r"unknown routing strategy 'random'; choose one of "
                                             r"round-robin, least-loaded, prefix-aware"):
        make_strategy("random")
    with pytest.raises(NanoForgeError, match="routing strategy 'round-robin'.*block_size"):
        make_strategy("round-robin", block_size=16)
    with pytest.raises(NanoForgeError, match="block_size >= 1"):
        make_strategy("prefix-aware", block_size=0)
    for name in STRATEGIES:  # the router calls these on every strategy alike
        s = make_strategy(name)
        s.observe("e0", [1] * 32)
        s.forget("e0")
