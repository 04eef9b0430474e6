"""Sharded plans on 2 GPUs of one host (NCCL): tp=2 and attention_dp=2 x ffn_ep=2 give the greedy
tokens of one GPU, in f32 (so the order of a sum cannot flip a token) on the Triton kernels, the
EP experts included; both decode in CUDA graphs with their NCCL collectives captured (tp: all_reduce
/ all_gather; ep: all_gather + reduce_scatter, every replica replaying the same size). Run with `pytest -m gpu tests/test_gpu_distributed.py` (bench/gpu_check.sh)."""
from __future__ import annotations

import pytest
import torch

from nanoforge import LLM
from nanoforge.runtime.distributed_runner import DistributedRunner
from test_distributed import ENGINE, PROMPTS, ckpt, greedy  # noqa: F401 - ckpt is a fixture

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900),
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]
GPU = {**ENGINE, "device": "cuda", "num_blocks": 512}


@pytest.fixture(scope="module")
def one_gpu(ckpt):  # noqa: F811
    with LLM(ckpt, **GPU) as llm:
        assert llm.engine.runner.graphs is not None  # the reference replays CUDA graphs
        return [o.token_ids for o in llm.generate(PROMPTS, greedy())]


def _providers(llm: LLM) -> dict[str, str]:
    return {n.op: n.provider for _, n in llm.plan.module.nodes()}


@pytest.mark.parametrize("layout", [{"tp": 2}, {"attention_dp": 2, "ffn_ep": 2}], ids=["tp2", "dp2ep2"])
def test_two_gpus_generate_one_gpus_tokens(ckpt, one_gpu, layout):  # noqa: F811
    with LLM(ckpt, **layout, **GPU) as llm:
        runner = llm.engine.runner
        assert isinstance(runner, DistributedRunner) and torch.distributed.get_backend() == "nccl"
        got = [o.token_ids for o in llm.generate(PROMPTS, greedy())]
        print(layout, "same tokens as one GPU:", got == one_gpu, dict(llm.metrics()["batches"]), flush=True)
        ops = _providers(llm)
        assert ops["attention"] == "triton"
        if "ffn_ep" in layout:
            assert ops["grouped_experts"] == "triton" and ops["moe_dispatch"] == ops["moe_combine"] == "allgather"
        else:
            assert ops["moe"] == "triton" and "all_reduce" in ops
        assert llm.metrics()["batches"]["graph"] > 10  # decode steps replay graphs, the collectives inside
    assert got == one_gpu
