"""PD between sharded engines on real processes (CPU, gloo): a prefill engine tp=2 and a decode
engine attention-dp 2 x ffn-ep 2, and the reverse, through the router give one engine's greedy
tokens and free every block on both sides; a killed decode rank ends its streams with an error and
the prefill engine frees the KV. The KV travels in the one-rank layout (runtime/kv_shards.py)."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import zmq

from hf_fixtures import TOKENIZER_VOCAB, _quiet_transformers, _randomize_extras, make_tokenizer, random_prompts, \
    tiny_config
from nanoforge import LLM, SamplingParams
from nanoforge.compiler import CompileOptions, compile_checkpoint
from nanoforge.errors import NanoForgeError
from nanoforge.kernels.context import allocate_pool
from nanoforge.kv_contract import KVContract
from nanoforge.runtime.kv_shards import KVShards, kv_parts, one_rank_contract
from nanoforge.serving.engine_server import free_tcp_addr, stop_engine_server, wait_engine_ready
from nanoforge.runtime.kv_transfer import KVStore
from nanoforge.serving.kv_migration import MigrationWorker, _Peer
from nanoforge.serving.protocol import GenerateRequest
from nanoforge.serving.router import Router
from test_pd import _stats

pytestmark = pytest.mark.timeout(180)
# test_distributed's Qwen3-MoE (sizes divide by 2), with 4 KV heads
SIZES = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=4, head_dim=16, num_local_experts=8,
             num_experts_per_tok=2, mlp_only_layers=[])
GREEDY = {"temperature": 0, "ignore_eos": True}
COMMON = ("--dtype", "f32", "--num-blocks", "128", "--max-model-len", "256", "--max-num-seqs", "16")


def _make_ckpt(out: Path, kv_heads: int) -> Path:
    import transformers as tf

    d = {**tiny_config("qwen3_moe").to_dict(), **SIZES, "num_key_value_heads": kv_heads}
    d.pop("layer_types", None)
    cfg = type(tiny_config("qwen3_moe")).from_dict(d)
    torch.manual_seed(0)
    with _quiet_transformers():
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _randomize_extras(model, 0)
    with _quiet_transformers():
        model.save_pretrained(out, safe_serialization=True)
    make_tokenizer(TOKENIZER_VOCAB["qwen3_moe"]).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _make_ckpt(tmp_path_factory.mktemp("moe_kv4"), 4)


def _serve(ckpt: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    addr = free_tcp_addr()
    log = tempfile.NamedTemporaryFile("wb", prefix="nanoforge-pd-sharded-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "nanoforge.cli", "serve", str(ckpt), "--addr", addr, *COMMON,
                             *flags], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    proc.log_path = log.name  # type: ignore[attr-defined]
    return proc, addr


def workers_of(driver: int) -> list[int]:
    ps = subprocess.run(["ps", "-ww", "-eo", "pid,stat,args"], capture_output=True, text=True).stdout.splitlines()
    return [int(ln.split()[0]) for ln in ps if "nanoforge.runtime.worker" in ln and " Z" not in ln
            and ln.rstrip().endswith(f"--driver-pid {driver}")]


@pytest.fixture(scope="module")
def pd(ckpt):
    """Four engine servers (two processes each): prefill and decode engines of each layout."""
    tp, dp = ("--tp", "2"), ("--attention-dp", "2", "--ffn-ep", "2")
    procs = {"prefill_tp": _serve(ckpt, "--role", "prefill", *tp, "--kv-park-timeout", "5"),
             "decode_dp": _serve(ckpt, "--role", "decode", *dp),
             "prefill_dp": _serve(ckpt, "--role", "prefill", *dp, "--kv-park-timeout", "5"),
             "decode_tp": _serve(ckpt, "--role", "decode", *tp)}
    try:
        ref = LLM(ckpt, dtype="f32", progress=False, num_blocks=128, max_model_len=256)  # while they start
        hello = {k: wait_engine_ready(proc, addr, timeout=120) for k, (proc, addr) in procs.items()}
        yield SimpleNamespace(ref=ref, procs=procs, hello=hello, **{k: addr for k, (_, addr) in procs.items()})
    finally:
        for proc, _ in procs.values():
            stop_engine_server(proc, timeout=20)


def _wait_idle(addr: str, timeout: float = 10.0) -> dict:
    end = time.monotonic() + timeout
    while True:
        s = _stats(addr)
        if (s["kv_blocks_free"] == s["kv_blocks_total"] and s["kv_parked"] == 0 and s["kv_migrating"] == 0
                and s["num_running"] == 0) or time.monotonic() > end:
            return s
        time.sleep(0.1)


async def _run(router, rid: str, prompt: list[int], **params):
    tokens, last = [], None
    async for d in router.generate(GenerateRequest(rid, prompt, params)):
        tokens += d.token_ids
        last = d
    return tokens, last


PROMPTS = random_prompts(1024, [5, 33, 2, 10, 17, 40, 8, 25, 3, 12, 29, 6, 19, 37, 4, 21], seed=3)
MAX_TOKENS = [6, 9, 4, 7, 5, 8, 6, 4, 9, 5, 7, 6, 8, 4, 5, 7]


@pytest.mark.parametrize("prefill,decode", [("prefill_tp", "decode_dp"), ("prefill_dp", "decode_tp")])
def test_sharded_pd_gives_one_engines_greedy_tokens_and_frees_every_block(pd, prefill, decode):
    assert pd.hello[prefill]["kv_layout"] != pd.hello[decode]["kv_layout"]
    assert pd.hello[prefill]["kv_contract"] == pd.hello[decode]["kv_contract"]  # the one-rank contract
    want = [o.token_ids for o in pd.ref.generate(PROMPTS, [SamplingParams(max_tokens=n, **GREEDY)
                                                           for n in MAX_TOKENS])]
    before = _stats(getattr(pd, decode))["kv_migrations"]

    async def main():
        router = await Router.connect([getattr(pd, prefill)], [getattr(pd, decode)], timeout=10)
        try:
            return await asyncio.gather(*[_run(router, f"{prefill}-{i}", p, max_tokens=n, **GREEDY)
                                          for i, (p, n) in enumerate(zip(PROMPTS, MAX_TOKENS))])
        finally:
            router.close()

    outs = asyncio.run(main())
    assert [t for t, _ in outs] == want
    assert all(last.finish_reason == "length" for _, last in outs)
    for side in (prefill, decode):
        s = _wait_idle(getattr(pd, side))
        assert s["kv_blocks_free"] == s["kv_blocks_total"] and s["kv_parked"] == 0, (side, s)
    d = _stats(getattr(pd, decode))
    assert d["kv_migrations"] - before == len(PROMPTS) and d["kv_migration_fallbacks"] == 0  # no recompute


def test_a_killed_decode_rank_ends_its_streams_and_frees_the_prefill_blocks(pd):
    driver = pd.procs["decode_dp"][0]
    rank1 = workers_of(driver.pid)
    assert len(rank1) == 1
    prompts = random_prompts(1024, [20, 33, 8, 17], seed=17)

    async def main():
        router = await Router.connect([pd.prefill_tp], [pd.decode_dp], timeout=10)
        started, counts = asyncio.Event(), [0] * len(prompts)

        async def stream(i: int, p: list[int]):
            last = None
            async for d in router.generate(GenerateRequest(f"k{i}", p, {"max_tokens": 200, **GREEDY})):
                counts[i] += len(d.token_ids)
                last = d
                if min(counts) >= 3:
                    started.set()
            return last

        async def killer():
            await asyncio.wait_for(started.wait(), 30)
            os.kill(rank1[0], signal.SIGKILL)
            late = await _run(router, "late", prompts[0], max_tokens=50, **GREEDY)  # prefilled, its decode fails
            return time.monotonic(), late

        try:
            return await asyncio.gather(asyncio.gather(*[stream(i, p) for i, p in enumerate(prompts)]), killer())
        finally:
            router.close()

    lasts, (killed_at, late) = asyncio.run(main())
    for last in lasts:
        assert last.finish_reason == "error" and "worker rank 1" in last.error, last
    assert late[1].finish_reason == "error" and len(late[0]) <= 1
    s = _wait_idle(pd.prefill_tp)
    assert s["kv_blocks_free"] == s["kv_blocks_total"] and s["kv_parked"] == 0 and s["num_running"] == 0
    assert time.monotonic() - killed_at < 15


def test_layouts_pair_by_one_rank_contract_and_a_mismatch_names_both(ckpt, tmp_path):
    """kv_parts follows K back to its sharded linear: 4 kv heads over tp=2 is 2 parts; 2 kv heads
    over tp=4 replicate in pairs (2 parts, a rank's local contract of 1 head alone can't say)."""
    plans = {tp: compile_checkpoint(ckpt, CompileOptions(dtype="f32", tp=tp)) for tp in (1, 2)}
    dp = compile_checkpoint(ckpt, CompileOptions(dtype="f32", attention_dp=2, ffn_ep=2))
    for plan in (*plans.values(), dp):
        parts = kv_parts(plan.module, plan.parallel, plan.kv_contract)
        assert one_rank_contract(plan.kv_contract, parts) == plans[1].kv_contract
    kv2 = _make_ckpt(tmp_path / "kv2", 2)
    tp4 = compile_checkpoint(kv2, CompileOptions(dtype="f32", tp=4))
    assert tp4.kv_contract.layers[0].shapes == ((1, 16), (1, 16))
    assert kv_parts(tp4.module, tp4.parallel, tp4.kv_contract) == (2, 2)
    # tp=4 ranks 0, 1 hold head 0 and ranks 2, 3 head 1: combine takes ranks 0 and 2, split gives them back
    shards = KVShards(allocate_pool(tp4.kv_contract, 4), (2, 2), 4)
    ranks = [torch.full((shards.local_nbytes(1) // 4,), float(r)).view(torch.uint8) for r in range(4)]
    whole = shards.combine(ranks, 1)
    assert torch.frombuffer(bytearray(whole[0]), dtype=torch.float32).view(16, 2, 16)[:, :, 0][0].tolist() == [0, 2]
    back = [b.view(torch.float32)[0].item() for b in shards.split(whole, 1)]
    assert back == [0, 0, 2, 2]
    # a decode engine whose one-rank contract differs refuses the source, naming both layouts
    reports = []
    other = one_rank_contract(plans[2].kv_contract, (2, 2))
    other = KVContract(32, other.dtype, other.layers)
    pool = allocate_pool(other, 2)
    store = KVStore(other, "attention_dp=2 x ffn_ep=2", pool, print, print, sharded=True)
    w = MigrationWorker(pool, other, reports.append, "tcp", store=store)
    try:
        peer = _Peer("tcp://x", w.ctx.socket(zmq.DEALER), 7)
        w.peers[peer.addr] = peer
        w.poller.register(peer.sock, zmq.POLLIN)
        w._on_hello(peer, {"type": "hello", "kv_contract": plans[1].kv_contract.to_json(), "kv_layout": "tp=2"})
        assert "\n" not in peer.error and "(tp=2)" in peer.error and "(attention_dp=2 x ffn_ep=2)" in peer.error
        assert "block_size: 16 vs 32" in peer.error
    finally:
        w.stop()
    with pytest.raises(NanoForgeError, match=r"ipc: this engine's KV is split over its ranks \(attention_dp=2"):
        MigrationWorker(pool, other, print, "ipc", store=store)
