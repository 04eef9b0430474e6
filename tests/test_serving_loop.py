"""EngineLoop + InProcessClient: streamed deltas add up to LLM.generate's tokens, several
concurrent requests interleave, closing a stream early aborts the request and frees its blocks,
bad parameters come back as an error delta while the loop keeps serving."""
from __future__ import annotations

import asyncio

import pytest

from hf_fixtures import random_prompts, tiny_config
from nanoforge import LLM, SamplingParams
from nanoforge.serving.inprocess import InProcessClient
from nanoforge.serving.protocol import GenerateRequest

LENGTHS = [5, 17, 9, 30]


@pytest.fixture(scope="module")
def served(tiny_ckpt):
    llm = LLM(tiny_ckpt("qwen3"), progress=False)
    client = InProcessClient(llm.engine, "tiny")
    yield llm, client
    client.close()


async def _collect(client, rid, prompt, **params):
    tokens, deltas, last = [], 0, None
    async for d in client.generate(GenerateRequest(rid, prompt, params)):
        tokens += d.token_ids
        deltas += 1
        last = d
    return tokens, deltas, last


def test_concurrent_streams_equal_offline_generate(served, tiny_ckpt):
    llm, client = served
    prompts = random_prompts(tiny_config("qwen3").vocab_size, LENGTHS, seed=5)
    ref = LLM(tiny_ckpt("qwen3"), progress=False).generate(prompts, SamplingParams(temperature=0, max_tokens=12,
                                                                                   ignore_eos=True))

    async def main():
        return await asyncio.gather(*[_collect(client, f"r{i}", p, temperature=0, max_tokens=12, ignore_eos=True)
                                      for i, p in enumerate(prompts)])

    for (tokens, deltas, last), r in zip(asyncio.run(main()), ref):
        assert tokens == r.token_ids and last.finish_reason == "length" and deltas >= 2
        assert last.num_prompt_tokens == len(r.prompt_token_ids)


def test_closing_a_stream_aborts_and_frees_blocks(served):
    llm, client = served

    async def main():
        stream = client.generate(GenerateRequest("gone", list(range(1, 40)), {"temperature": 0, "max_tokens": 500,
                                                                               "ignore_eos": True}))
        got = 0
        async for d in stream:
            got += len(d.token_ids)
            if got >= 3:
                break
        await stream.aclose()
        for _ in range(100):
            if (await client.stats())["num_running"] == 0:
                break
            await asyncio.sleep(0.02)
        return await client.stats()

    stats = asyncio.run(main())
    assert stats["num_running"] == stats["num_waiting"] == 0 and stats["aborted"] >= 1
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_bad_parameters_are_an_error_delta_and_the_loop_keeps_serving(served):
    llm, client = served

    async def main():
        bad = await _collect(client, "bad", [1, 2, 3], max_tokens=-1)
        unknown = await _collect(client, "unknown", [1, 2, 3], max_tokenz=3)
        good = await _collect(client, "good", [1, 2, 3], temperature=0, max_tokens=3, ignore_eos=True)
        return bad, unknown, good

    bad, unknown, good = asyncio.run(main())
    assert bad[2].finish_reason == "error" and "max_tokens" in bad[2].error
    assert unknown[2].finish_reason == "error" and "max_tokenz" in unknown[2].error
    assert len(good[0]) == 3 and good[2].finish_reason == "length"
