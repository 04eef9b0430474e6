"""PD on the GPU: a prefill and a decode engine server (two processes, on two GPUs when there are
two, else sharing one) behind the Router give the greedy tokens of one engine, with the KV moved
by CUDA IPC (device-to-device copy) or host-staged over ZMQ; the migration rate goes to $OUT.
Run with `pytest -m gpu tests/test_gpu_pd.py` (bench/gpu_check.sh; needs pyzmq, see .whl)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from pathlib import Path

import pytest
import torch

from hf_fixtures import random_prompts, tiny_config
from nanoforge import LLM, SamplingParams
from nanoforge.serving.engine_server import start_engine_server, wait_engine_ready
from nanoforge.serving.protocol import GenerateRequest
from nanoforge.serving.router import Router
from nanoforge.serving.zmq_client import ZmqEngineClient
from nanoforge.tools.mps import client_env, mps_daemon

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.timeout(600)]
GREEDY = {"temperature": 0, "ignore_eos": True, "max_tokens": 16}


@pytest.mark.parametrize("transport, kv_dtype, mps", [("ipc", "auto", None), ("tcp", "auto", None),
                                                     ("ipc", "fp8", None), ("ipc", "auto", 50)],
                         ids=["ipc", "tcp", "ipc-fp8", "ipc-mps50"])
def test_pd_on_gpu_equals_one_engine(transport, kv_dtype, mps, tiny_ckpt, monkeypatch):
    """mps: both engines under a private MPS daemon, prefill on that % of the SMs (`bench pd
    --mps-split`): fewer SMs change kernel grids, never the tokens."""
    ckpt = tiny_ckpt("qwen3")
    two = torch.cuda.device_count() >= 2
    procs = {}
    with contextlib.ExitStack() as stack:
        daemon = stack.enter_context(mps_daemon()) if mps else None
        _run_pd(ckpt, transport, kv_dtype, daemon, mps, two, procs, monkeypatch)


def _run_pd(ckpt, transport, kv_dtype, daemon, mps, two, procs, monkeypatch):
    # with two GPUs the decode engine sees them in the other order: its cuda:0 is the prefill's
    # cuda:1, so the IPC handles must be matched by device UUID, not index
    for role, devices in (("prefill", "0,1"), ("decode", "1,0")):
        with monkeypatch.context() as m:
            if two:
                m.setenv("CUDA_VISIBLE_DEVICES", devices)
            for k, v in (client_env(daemon, mps if role == "prefill" else 100 - mps) if daemon else {}).items():
                m.setenv(k, v)  # the engines only: this process (the reference LLM) stays off MPS
            procs[role] = start_engine_server(ckpt, role=role, device="cuda", num_blocks=2048, max_num_seqs=32,
                                              kv_transport=transport, model_name="tiny", kv_dtype=kv_dtype)
    try:
        prompts = random_prompts(tiny_config("qwen3").vocab_size, [900, 5, 640, 33, 1000, 257, 780, 64] * 2, seed=4)
        ref = LLM(ckpt, device="cuda", progress=False, kv_cache_memory=256 << 20, max_num_seqs=32, kv_dtype=kv_dtype)
        want = [o.token_ids for o in ref.generate(prompts, SamplingParams(**GREEDY))]
        del ref
        torch.cuda.empty_cache()
        for proc, addr in procs.values():
            wait_engine_ready(proc, addr, timeout=300)

        async def main():
            router = await Router.connect([procs["prefill"][1]], [procs["decode"][1]], timeout=30)
            try:
                async def one(i, p):
                    toks = []
                    async for d in router.generate(GenerateRequest(f"g{i}", p, GREEDY)):
                        toks += d.token_ids
                        last = d
                    return toks, last

                start = time.perf_counter()
                outs = await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)])
                return outs, time.perf_counter() - start, await router.stats()
            finally:
                router.close()

        outs, wall, stats = asyncio.run(main())
        for (tokens, last), w in zip(outs, want):
            assert last.finish_reason == "length", last
            assert tokens == w
        log = Path(procs["decode"][0].log_path).read_text()
        assert f": {transport} transport" in log, log[-2000:]
        assert stats["kv_migrations"] == len(prompts) and stats["kv_migration_fallbacks"] == 0
        gbs = stats["kv_migration_bytes"] / max(stats["kv_migration_seconds"], 1e-9) / 1e9
        result = {"transport": transport, "kv_dtype": kv_dtype, "mps_split": mps, "gpus": 2 if two else 1, "device": torch.cuda.get_device_name(0),
                  "migrations": stats["kv_migrations"], "bytes": stats["kv_migration_bytes"],
                  "seconds": stats["kv_migration_seconds"], "GB_per_s": gbs, "wall_s": wall}
        print(json.dumps(result))
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], f"pd_migration_{transport}{'_fp8' if kv_dtype == 'fp8' else ''}{f'_mps{mps}' if mps else ''}.json").write_text(json.dumps(result, indent=1))

        async def idle(addr):
            c = await ZmqEngineClient.connect(addr, timeout=10)
            try:
                for _ in range(100):
                    s = await c.stats()
                    if s["kv_blocks_free"] == s["kv_blocks_total"] and s["kv_parked"] == 0:
                        break
                    await asyncio.sleep(0.05)
                return s
            finally:
                c.close()

        for _, addr in procs.values():
            s = asyncio.run(idle(addr))
            assert s["kv_blocks_free"] == s["kv_blocks_total"] and s["kv_parked"] == 0
    finally:
        for proc, _ in procs.values():
            proc.kill()
            proc.wait()
