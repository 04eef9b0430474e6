"""shard_ep (attention_dp x ffn_ep): simulated ranks, each with its own requests, give the unsharded
logits; the rewrite, its param specs and the compile errors a user can hit."""
from __future__ import annotations

import pytest
import torch

from nanoforge.cli import main
from nanoforge.compiler import CompileOptions, compile_checkpoint
from nanoforge.errors import NanoForgeError
from nanoforge.models import trace_model
from nanoforge.models.checkpoint import open_checkpoint
from nanoforge.parallel.rank_view import collectives_per_step
from nanoforge.check.simulate import run_ranks_dp
from nanoforge.passes import shard_ep
from nanoforge.facts import ParallelLayout, layout_of, write
from test_ir import config_dict
from test_shard_tp import SIZES, ckpt  # noqa: F401 - the module-scoped checkpoint fixture

MOE_ARCHS = ["qwen3_moe", "deepseek_v3"]  # 8 and 16 experts: 2, 4 and 8 divide both


def compiled(path, n: int, verify: bool = False, exchange: str = "allgather"):
    """`exchange`: the EP dispatch/combine provider (allgather: the default; torch: all-to-all)."""
    return compile_checkpoint(path, CompileOptions(dtype="f32", attention_dp=n, ffn_ep=n, verify_each_pass=verify,
                                                   providers={"moe_dispatch": exchange, "moe_combine": exchange}
                                                   )).module


def prompts(n: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(n)
    return [torch.randint(0, vocab, (int(length),), generator=g).tolist() for length in torch.randint(1, 9, (n,),
                                                                                                       generator=g)]


@pytest.mark.parametrize("exchange", ["allgather", "torch"])
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_dp_ranks_with_their_own_requests_match_unsharded(arch, exchange, ckpt):  # noqa: F811
    path = ckpt(arch)
    ck = open_checkpoint(path)
    ref_module = compiled(path, 1)
    batch = prompts(5, SIZES[arch]["vocab_size"])  # 8 ranks: three of them idle (an empty batch)
    want = run_ranks_dp(ref_module, ck, batch)
    for n in (2, 4, 8):
        module = compiled(path, n, n == 4, exchange)  # --verify-each-pass: the numeric check's simulated ranks
        assert layout_of(module) == ParallelLayout(1, n, n)
        assert {node.provider for _, node in module.nodes() if node.op == "moe_dispatch"} == {exchange}
        got = run_ranks_dp(module, ck, batch)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item(),
                                   msg=lambda m: f"{arch} ep={n}: {m}")


def test_rewrite_and_specs():
    module = trace_model(config_dict("deepseek_v3"), "f32")
    experts = [n.attrs["num_experts"] for _, n in module.nodes() if n.op == "moe"]
    assert shard_ep.run(module, shard_ep.Options(4, 4)) == len(experts)
    ops = [n.op for _, n in module.nodes()]
    assert "moe" not in ops and ops.count("grouped_experts") == len(experts)
    assert collectives_per_step(module) == {"moe_dispatch": len(experts), "moe_combine": len(experts)}
    gate = module.params["model.layers.1.mlp.experts.gate_proj"]
    assert gate.shard == "d0:4@ep" and gate.type.shape[0] == experts[0] // 4
    assert module.params["model.layers.1.mlp.gate.weight"].shard is None  # the router stays whole
    assert module.params["model.layers.1.mlp.shared_experts.gate_proj.weight"].shard is None


@pytest.mark.parametrize("opts, message", [
    (shard_ep.Options(2, 4), "must be equal"),
    (shard_ep.Options(3, 3), "--ffn-ep 3 does not divide the 16 experts of model.layers.1.mlp"),
    (shard_ep.Options(0, 0), "must be >= 1"),
])
def test_bad_layouts_are_named(opts, message):
    with pytest.raises(NanoForgeError, match=message):
        shard_ep.run(trace_model(config_dict("deepseek_v3"), "f32"), opts)


def test_dense_model_and_tp_combination_are_refused(tmp_path, capsys):
    with pytest.raises(NanoForgeError, match="no MoE layers"):
        shard_ep.run(trace_model(config_dict("qwen3"), "f32"), shard_ep.Options(2, 2))
    module = trace_model(config_dict("qwen3_moe"), "f32")
    write(module, ParallelLayout(tp=2))
    with pytest.raises(NanoForgeError, match="--tp cannot be combined"):
        shard_ep.run(module, shard_ep.Options(2, 2))


def test_cli_compile_and_inspect(ckpt, tmp_path, capsys):  # noqa: F811
    plan = tmp_path / "plan"
    assert main(["compile", str(ckpt("qwen3_moe")), "-o", str(plan), "--attention-dp", "2", "--ffn-ep", "2",
                 "-q"]) == 0
    assert main(["inspect", str(plan)]) == 0
    out = capsys.readouterr().out
    assert "attention_dp=2 x ffn_ep=2: 2 ranks" in out and "moe_dispatch x" in out and "moe_combine x" in out
    assert main(["compile", str(ckpt("qwen3_moe")), "-o", str(tmp_path / "bad"), "--attention-dp", "2",
                 "--ffn-ep", "3", "-q"]) != 0
    assert "must be equal" in capsys.readouterr().err


def _a2a_worker(rank: int, port: int) -> None:
    import torch.distributed as dist

    from nanoforge.parallel.comm import TorchDistComm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        comm = TorchDistComm(ParallelLayout(1, 2, 2), rank)
        send = [1, 2] if rank == 0 else [3, 0]  # uneven, and one pair sends nothing
        x = torch.arange(sum(send) * 2, dtype=torch.float32).view(-1, 2) + 100 * rank
        got, recv = comm.all_to_all(x, "ep", send)
        assert recv == ([1, 3] if rank == 0 else [2, 0])
        want = torch.cat([torch.arange(2.).view(1, 2), torch.arange(6.).view(3, 2) + 100]) if rank == 0 else \
            torch.arange(2., 6.).view(2, 2)
        assert torch.equal(got, want), (rank, got)
        y = torch.arange(8, dtype=torch.float32).view(4, 2) * (rank + 1)  # reduce_scatter: sum, then my half
        assert torch.equal(comm.reduce_scatter(y, "ep"), (torch.arange(8.).view(4, 2) * 3)[2 * rank:2 * rank + 2])
    finally:
        dist.destroy_process_group()


def test_all_to_all_on_gloo_and_simulated_agree():
    """The dispatch exchange over two real gloo processes (uneven counts), and the same exchange
    between simulated ranks."""
    import threading

    import torch.multiprocessing as mp

    from nanoforge.parallel.comm import SimulatedComm, SimulatedHub
    from nanoforge.serving.sockets import free_tcp_port

    mp.spawn(_a2a_worker, args=(free_tcp_port(),), nprocs=2, join=True)
    layout, hub, out = ParallelLayout(1, 2, 2), SimulatedHub(2), {}

    def rank(r: int) -> None:
        send = [1, 2] if r == 0 else [3, 0]
        x = torch.arange(sum(send) * 2, dtype=torch.float32).view(-1, 2) + 100 * r
        out[r] = SimulatedComm(hub, r, layout).all_to_all(x, "ep", send)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert out[0][1] == [1, 3] and out[1][1] == [2, 0]
    assert torch.equal(out[1][0], torch.arange(2., 6.).view(2, 2))
