"""The CPU decode steps that attend on kept K/V copies (nanoforge/kernels/cpu/decode_kv.py): over
runs of consecutive decode steps sharing one carry dict, the cpu provider's attention gives
torch_ref's outputs and bit-equal pools at every step, while its copies are built once and then
extended (counted); a changed batch, a prefill step or a caller without a carry falls back to the
gather path and rebuilds; the copies grow past their capacity and stay under the budget."""
from __future__ import annotations

import importlib
import random

import numpy as np
import pytest
import torch

from nanoforge.kernels import torch_ref
from nanoforge.kernels.context import allocate_pool, make_context
from nanoforge.kv_contract import KVContract, KVLayer

cpu_attn = importlib.import_module("nanoforge.kernels.cpu.attention")
decode_kv = importlib.import_module("nanoforge.kernels.cpu.decode_kv")

H, KVH, D, BS, LAYERS = 4, 2, 16, 4, 2


class Run:
    """Two identical pools (one per kernel) and sequences that grow a token a step."""

    def __init__(self, lens: list[int], seed: int):
        self.rng, self.gen = random.Random(seed), torch.Generator().manual_seed(seed)
        self.free = list(range(1, 600))
        self.rng.shuffle(self.free)
        contract = KVContract(BS, "f32", tuple(KVLayer(i, "gqa", ((KVH, D), (KVH, D))) for i in range(LAYERS)))
        self.pool = allocate_pool(contract, 600)
        for layer in self.pool:
            for t in layer:
                t.copy_(torch.randn(t.shape, generator=self.gen))
                t[0] = float("nan")  # table padding reads block 0: it must never reach an output
        self.ref_pool = [tuple(t.clone() for t in layer) for layer in self.pool]
        self.seqs = [self.blocks_for([], n) + [n] for n in lens]  # [block list, ctx_len]
        self.carry: dict = {}

    def blocks_for(self, table: list[int], ctx_len: int) -> list:
        while len(table) * BS < ctx_len:
            table.append(self.free.pop())
        return [table]

    def step(self, q_lens: list[int] | None = None, carry: bool = True) -> None:
        """One step: each sequence gets q_len new tokens (default 1); both kernels, compared."""
        q_lens = q_lens or [1] * len(self.seqs)
        spec = []
        for s, q in zip(self.seqs, q_lens):
            s[1] += q
            self.blocks_for(s[0], s[1])
            spec.append((q, s[1], s[0]))
        ctx = make_context(self.pool, BS, spec)
        ctx.carry = self.carry if carry else None
        ref_ctx = make_context(self.ref_pool, BS, [(q, c, list(b)) for q, c, b in spec])
        t = sum(q_lens)
        for layer in range(LAYERS):
            q, k, v = (torch.randn(t, n * D, generator=self.gen) for n in (H, KVH, KVH))
            kw = dict(kind="gqa", layer=layer, scale=D ** -0.5, heads=H, kv_heads=KVH, head_dim=D)
            out = cpu_attn.attention(q, k, v, ctx=ctx, **kw)
            ref = torch_ref.attention(q, k, v, ctx=ref_ctx, **kw)
            assert torch.isfinite(out).all()
            assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5), (out - ref).abs().max()
        for a, b in zip(self.pool, self.ref_pool):
            for x, y in zip(a, b):
                assert torch.equal(x.nan_to_num(7.0), y.nan_to_num(7.0))

    @property
    def state(self):
        return self.carry.get(decode_kv.KEY)


@pytest.fixture
def counted(monkeypatch):
    """Counts of decode_kv.attend calls that built copies / extended them."""
    counts = {"built": 0, "extended": 0}
    real = decode_kv.attend

    def attend(q, k, v, pools, step, layer, **kw):
        held = step.state.layers.get(layer)
        counts["built" if held is None or held[0] != step.state.step - 1 else "extended"] += 1
        return real(q, k, v, pools, step, layer, **kw)

    monkeypatch.setattr(decode_kv, "attend", attend)
    return counts


@pytest.mark.parametrize("lens", [[9] * 6, [30, 33, 36, 44, 31], [5, 40, 9, 60, 17, 33]],
                         ids=["uniform", "ragged", "ragged-chunks"])
def test_consecutive_decode_steps_extend_the_copies(lens, counted):
    run = Run(lens, seed=len(lens))
    run.step([5] * len(lens))  # a prefill chunk: gathers, keeps nothing
    assert run.state is None and counted == {"built": 0, "extended": 0}
    run.step()  # the first decode step only records its rows
    assert counted["built"] == 0 and run.state is not None and not run.state.layers
    for _ in range(9):  # crosses block boundaries (ragged-chunks: and powers of two, so its chunks change)
        run.step()
    assert counted == {"built": LAYERS, "extended": 8 * LAYERS}
    assert (run.state.order is not None) == (len(set(lens)) > 1 and lens != sorted(lens, reverse=True))


def test_a_changed_batch_or_no_carry_rebuilds(counted):
    run = Run([34, 36, 38, 35], seed=3)
    for _ in range(3):
        run.step()
    assert counted == {"built": LAYERS, "extended": LAYERS}
    run.seqs.pop(1)  # a sequence finished: the rows changed
    run.step()
    run.step()
    assert counted == {"built": 2 * LAYERS, "extended": LAYERS}
    run.seqs[0][0] = list(run.seqs[0][0])  # released and readmitted: a new block list, the same blocks
    run.step()  # records
    run.step(carry=False)  # a caller that keeps nothing
    run.step()  # the rows it ran were not recorded: records again
    run.step()
    assert counted == {"built": 3 * LAYERS, "extended": LAYERS}
    run.step([3, 1, 2])  # a mixed step drops the copies
    run.step()
    run.step()
    assert counted == {"built": 4 * LAYERS, "extended": LAYERS}


def test_copies_grow_and_respect_the_budget(counted, monkeypatch):
    run = Run([60, 60], seed=4)
    for _ in range(3):
        run.step()
    (seg,) = run.state.segments
    cap = seg.cap
    assert cap >= 63 and all(kb.shape[0] == 2 * KVH * cap for _, kb, _ in run.state.layers.values())
    for _ in range(cap - 61):  # past the capacity: rebuilt larger, once
        run.step()
    assert run.state.segments[0].cap > cap and counted["built"] == 2 * LAYERS
    monkeypatch.setattr(decode_kv, "BUDGET", 1e-6)  # of the pool
    run2 = Run([8, 8], seed=5)
    for _ in range(4):
        run2.step()
    assert counted["built"] == 2 * LAYERS and not run2.state.layers  # over budget: gathers


def test_ragged_rows_kept_in_segments_of_their_own_width(counted, monkeypatch):
    """Rows of 18..300 keys in segments by power of two, each as wide as its own longest row (plus room):
    far fewer bytes than one rectangle as wide as the longest, so a budget the rectangle would break
    still keeps copies; a short row outgrowing its segment rebuilds them."""
    lens = [250, 20, 130, 40, 70, 18, 300]
    run = Run(lens, seed=6)
    run.step()
    kept = [(g.hi - g.lo, g.cap) for g in decode_kv._segments(np.sort(np.array(lens) + 1)[::-1])]
    keys = sum(r * c for r, c in kept)
    rectangle = len(lens) * max(c for _, c in kept)
    assert len(kept) >= 4 and keys < 0.8 * rectangle
    st = run.state
    budget = (keys + rectangle) / 2 * st.entry_bytes / st.pool_bytes
    monkeypatch.setattr(decode_kv, "BUDGET", budget)  # the segments fit, the rectangle would not
    for _ in range(4):
        run.step()
    assert counted == {"built": LAYERS, "extended": 3 * LAYERS} and len(run.state.segments) == len(kept)
    monkeypatch.setattr(decode_kv, "BUDGET", 10.0)  # (this test's pool is small)
    short = min(run.state.segments, key=lambda g: g.cap)
    for _ in range(short.cap - int(run.state.lens.min())):  # the shortest row passes its segment's room
        run.step()
    assert counted["built"] == 2 * LAYERS
