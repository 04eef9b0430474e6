"""PD disaggregation at the engine level, no processes: a prefill engine parks a request's KV
after its first token (blocks kept), the bytes round-trip into another engine's pool (host-staged,
and the ipc transport's device copy run on CPU pools) and the continued decode equals one engine;
release, abort and the park timeout free the blocks; a pull that cannot happen is recomputed."""
from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import pytest

from hf_fixtures import random_prompts, tiny_config
from nanoforge import LLM, SamplingParams
from nanoforge.errors import NanoForgeError
from nanoforge.runtime.kv_transfer import gather_blocks, scatter_blocks
from nanoforge.serving.engine_loop import EngineLoop
from nanoforge.serving.kv_migration import CudaIpc, HostStaged, MigrationWorker, choose_transport
from nanoforge.serving.protocol import GenerateRequest, TokenDelta

pytestmark = pytest.mark.timeout(120)
GREEDY = {"temperature": 0, "ignore_eos": True}
VOCAB = tiny_config("qwen3").vocab_size


def test_park_pull_release_and_timeout_at_engine_level(tiny_ckpt):
    ckpt = tiny_ckpt("qwen3")
    a, b = LLM(ckpt, progress=False, num_blocks=64), LLM(ckpt, progress=False, num_blocks=64)
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompts = random_prompts(VOCAB, [37, 21], seed=3)
    prompts.append(prompts[0][:33])  # two blocks cached: its first token comes from a one-token step
    want = [o.token_ids for o in a.generate(prompts, sp)]
    ea, eb = a.engine, b.engine
    total = ea.blocks.num_blocks

    seq = ea.add_request(prompts[0], sp)
    while not seq.num_output:
        ea.step()
    assert ea.park(seq) is None and seq.finish_reason == "prefilled" and not ea.has_work()
    assert seq.num_computed == 37 and ea.blocks.num_free == total - 3  # the blocks stay with the parked KV
    moved, first = eb.add_migrated(seq.token_ids, seq.num_prompt, sp, seq.num_computed)
    assert first == 0 and len(moved.block_table) == 3 and moved.num_output == 1
    n = scatter_blocks(eb.runner.pool, moved.block_table, gather_blocks(ea.runner.pool, seq.block_table))
    assert n == 3 * 16 * 3 * 2 * 2 * 80 * 4  # blocks x tokens x layers x (k, v) x kv heads x head dim x f32
    eb.resume_migrated(moved, seq.num_computed)
    eb.run_until_done()
    assert moved.output_ids == want[0] and moved.finish_reason == "length"
    # the ipc transport's device copy moves the same bytes (run here on CPU pools)
    ipc = CudaIpc(eb.runner.pool, ea.runner.pool)
    spare = list(range(eb.blocks.num_blocks - 3, eb.blocks.num_blocks))  # never handed out
    assert ipc.receive({"block_ids": seq.block_table}, [], spare) == n
    assert all(bytes(x) == bytes(y) for x, y in zip(gather_blocks(eb.runner.pool, spare),
                                                    gather_blocks(ea.runner.pool, seq.block_table)))
    ea.release_parked(seq)
    assert ea.blocks.num_free == total
    ea.blocks.check_invariants([])
    hello = {"kv_ipc": {"tensors": []}, "host": socket.gethostname()}
    assert isinstance(choose_transport("auto", eb.runner.pool, hello, "tcp://x"), HostStaged)
    with pytest.raises(NanoForgeError, match="ipc: this engine's KV pool is not on CUDA"):
        choose_transport("ipc", eb.runner.pool, hello, "tcp://x")
    with pytest.raises(NanoForgeError, match="--kv-transport ipc needs the engine's KV pool on a CUDA device"):
        MigrationWorker(eb.runner.pool, {}, print, "ipc")

    assert [len(b) for b in gather_blocks(ea.runner.pool, [])] == [0] * 6  # all cached: nothing to pull
    assert scatter_blocks(eb.runner.pool, [], gather_blocks(ea.runner.pool, [])) == 0

    # the same prompt again: its blocks are in b's prefix cache, so only the last block is pulled
    again, first = eb.add_migrated(seq.token_ids, seq.num_prompt, sp, 37)
    assert first == 2 and len(again.block_table) == 3
    eb.release_parked(again)

    # EngineLoop: a parked KV nobody pulls is freed at the timeout, an aborted one at once
    deltas: list[TokenDelta] = []
    loop = EngineLoop(ea, deltas.extend, kv_park_timeout=1.5).start()
    try:
        for rid in ("late", "dropped"):
            loop.submit(GenerateRequest(rid, prompts[1], {"max_tokens": 10, **GREEDY}, {"phase": "prefill"}))
        end = time.monotonic() + 10
        while len(deltas) < 2 and time.monotonic() < end:
            time.sleep(0.01)
        assert [(d.finish_reason, len(d.token_ids)) for d in deltas] == [("prefilled", 1)] * 2
        assert deltas[0].token_ids == want[1][:1] and deltas[0].kv == {"num_tokens": 21, "block_size": 16}
        header, bufs = loop.read_parked("late", 1)
        assert header["block_ids"] and len(bufs) == 6 and header["num_tokens"] == 21
        loop.abort("dropped")
        while loop.stats()["kv_parked"] != 1 and time.monotonic() < end:
            time.sleep(0.01)
        assert loop.stats()["kv_parked"] == 1
        while loop.stats()["kv_parked"] and time.monotonic() < end:
            time.sleep(0.05)
        s = loop.stats()
        assert s["kv_parked"] == 0 and s["kv_park_expired"] == 1 and s["kv_blocks_free"] == s["kv_blocks_total"]
        with pytest.raises(NanoForgeError, match="no parked KV for request 'late'"):
            loop.read_parked("late", 0)

        # a first token sampled by a decode-shaped step, which overlapped decode chains a step onto
        # (computing that token's KV too): the prompt's KV is what is offered, and it continues right
        loop.submit(GenerateRequest("cached", prompts[2], {"max_tokens": 10, **GREEDY}, {"phase": "prefill"}))
        while len(deltas) < 3 and time.monotonic() < end:
            time.sleep(0.01)
        assert deltas[2].kv["num_tokens"] == 33 and deltas[2].num_cached_tokens == 32
        moved, first = eb.add_migrated(prompts[2] + deltas[2].token_ids, 33, sp, 33)
        assert first == 2  # b has the two cached blocks too
        scatter_blocks(eb.runner.pool, moved.block_table[first:], loop.read_parked("cached", first)[1])
        loop.release("cached")
        eb.resume_migrated(moved, 33)
        eb.run_until_done()
        assert moved.output_ids == want[2]
        while loop.stats()["kv_parked"] and time.monotonic() < end:
            time.sleep(0.01)
        assert loop.stats()["kv_blocks_free"] == total
    finally:
        loop.stop()

    # a decode request whose KV cannot be pulled (no migration worker) recomputes its prompt
    out: list[TokenDelta] = []
    loop = EngineLoop(eb, out.extend).start()
    try:
        pd = {"phase": "decode", "source": "tcp://127.0.0.1:1", "source_request_id": "x", "num_prompt": 21,
              "num_tokens": 21}
        loop.submit(GenerateRequest("d", prompts[1] + want[1][:1], {"max_tokens": 10, **GREEDY}, pd))
        end = time.monotonic() + 10
        while not (out and out[-1].finish_reason) and time.monotonic() < end:
            time.sleep(0.01)
        assert [t for d in out for t in d.token_ids] == want[1][1:] and out[-1].num_prompt_tokens == 21
        assert loop.stats()["kv_migration_fallbacks"] == 1
    finally:
        loop.stop()


def test_pd_modules_never_use_pickle():
    root = Path(__file__).resolve().parent.parent / "nanoforge"
    for name in ("serving/router.py", "serving/kv_migration.py", "serving/engine_loop.py", "runtime/kv_transfer.py"):
        src = (root / name).read_text()
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle)\b|\bpickle\.|_pyobj", src, re.M), name
