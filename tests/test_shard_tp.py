"""Tensor parallelism: shard_tp on tiny Qwen3, Qwen3-MoE and DeepSeek-V3 checkpoints whose sizes
divide by 8, run as simulated ranks (threads, emulated collectives, each rank loading only its
slices from the safetensors files) against the unsharded plan; shard specs round-trip through the
IR text; non-dividing sizes are one-line compile errors; `inspect --rank`."""
from __future__ import annotations

import math

import pytest
import torch

from hf_fixtures import _randomize_extras, _quiet_transformers, tiny_config
from nanoforge.cli import main
from nanoforge.compiler import CompileOptions, compile_checkpoint
from nanoforge.errors import NanoForgeError
from nanoforge.ir.graph import Module
from nanoforge.ir.parser import parse_module
from nanoforge.ir.printer import format_module
from nanoforge.models import trace_model
from nanoforge.models.checkpoint import open_checkpoint
from nanoforge.parallel.shard_spec import format_spec, key_slices, parse_spec
from nanoforge.check.simulate import run_ranks
from nanoforge.passes import PASSES, PIPELINES, Pass, PassContext, PassManager
from nanoforge.check.recorded import run_recorded
from nanoforge.plan import read_plan
from nanoforge.serving.sockets import free_tcp_port
from nanoforge.models.weights import load_params
from nanoforge.check.numeric import after_pass as numeric_check
from nanoforge.facts import ParallelLayout, layout_of, read
from nanoforge.kv_contract import KVContract
from nanoforge.passes import shard_tp
from test_ir import config_dict

# sizes that divide by 8; qwen3 has 2 kv heads, fewer than tp 4 and 8 (replicated in groups)
SIZES = {
    "qwen3": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=16),
    "qwen3_moe": dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                      num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8, head_dim=16,
                      num_local_experts=8, num_experts_per_tok=2, mlp_only_layers=[]),
    "deepseek_v3": dict(vocab_size=1024, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8,
                        intermediate_size=128, moe_intermediate_size=32, num_nextn_predict_layers=0),
}


def sized_config(arch: str, **kw) -> dict:
    d = config_dict(arch)
    d.update(SIZES[arch], **kw)
    return d


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    import transformers as tf

    cache = {}

    def get(arch: str):
        if arch not in cache:
            d = {**tiny_config(arch).to_dict(), **SIZES[arch]}
            d.pop("layer_types", None)  # derived from num_hidden_layers again
            cfg = type(tiny_config(arch)).from_dict(d)
            torch.manual_seed(0)
            with _quiet_transformers():
                model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
            _randomize_extras(model, 0)
            out = tmp_path_factory.mktemp(arch)
            with _quiet_transformers():
                model.save_pretrained(out, safe_serialization=True)
            cache[arch] = out
        return cache[arch]

    return get


def compiled(path, tp: int, verify: bool = False) -> Module:
    return compile_checkpoint(path, CompileOptions(dtype="f32", tp=tp, verify_each_pass=verify)).module


@pytest.mark.parametrize("arch", list(SIZES))
def test_simulated_ranks_match_unsharded_logits(arch, ckpt):
    path = ckpt(arch)
    ck = open_checkpoint(path)
    ref_module = compiled(path, 1)
    ref = run_recorded(ref_module, "forward", load_params(ref_module, ck, progress=False))
    want = ref[ref_module.functions["forward"].outputs[0].name]
    assert want.shape == (2, SIZES[arch]["vocab_size"])
    for tp in (2, 4, 8):
        module = compiled(path, tp, verify=tp == 8)  # --verify-each-pass: simulated ranks on random weights
        assert layout_of(module) == ParallelLayout(tp=tp)
        out = module.functions["forward"].outputs[0].name
        for rank, values in enumerate(run_ranks(module, ck)):
            torch.testing.assert_close(values[out], want, rtol=1e-5, atol=1e-5 * want.abs().max().item(),
                                       msg=lambda m: f"{arch} tp={tp} rank {rank}: {m}")


def test_kv_heads_fewer_than_ranks_are_replicated(ckpt):
    module = compiled(ckpt("qwen3"), 8)
    attn = [n for _, n in module.nodes() if n.op == "attention"]
    assert all(n.attrs["heads"] == 1 and n.attrs["kv_heads"] == 1 for n in attn)
    qkv = module.params["model.layers.0.self_attn.q_k_v_proj.weight"]
    assert qkv.shard == "d0:8,2,2@tp" and qkv.type.shape == (16 + 16 + 16, 64)
    assert read(module, KVContract).layers[0].shapes == ((1, 16), (1, 16))


def test_collectives_and_specs(ckpt):
    module = compiled(ckpt("deepseek_v3"), 4)
    fn = module.functions["forward"]
    ops = [n.op for n in fn.nodes]
    # embed + per layer o_proj and mlp (routed + shared experts summed first: one all_reduce)
    assert ops.count("all_reduce") == 1 + 2 * 2 and ops.count("all_gather") == 1 and ops[-1] == "all_gather"
    p = module.params
    assert p["model.layers.1.mlp.experts.gate_proj"].shard == "d1:4@tp"
    assert p["model.layers.1.mlp.experts.down_proj"].shard == "d2:4@tp"
    assert p["model.layers.1.mlp.gate.weight"].shard is None  # router replicated
    assert p["model.layers.0.self_attn.kv_b_proj.weight"].shard == "d0:4@tp"
    assert p["model.layers.0.self_attn.q_a_proj_and_kv_a_proj_with_mqa.weight"].shard is None  # latent replicated
    assert p["model.embed_tokens.weight"].type.shape == (256, 128)


def test_plan_round_trips_with_shard_specs(ckpt, tmp_path):
    module = compiled(ckpt("qwen3_moe"), 4)
    text = format_module(module)
    assert "shard=d0:4@tp" in text and "shard=d1:4@tp" in text and 'vocab_parallel="tp"' in text
    parsed = parse_module(text)
    assert format_module(parsed) == text
    assert {n: p.shard for n, p in parsed.params.items()} == {n: p.shard for n, p in module.params.items()}
    plan = compile_checkpoint(ckpt("qwen3_moe"), CompileOptions(dtype="f32", tp=4))
    plan.save(tmp_path / "plan")
    assert format_module(read_plan(tmp_path / "plan").module) == format_module(plan.module)


@pytest.mark.parametrize("change, tp, message", [
    ({}, 3, "--tp 3 does not divide the 8 attention heads of model.layers.0.self_attn"),
    ({"num_attention_heads": 12, "num_key_value_heads": 3}, 4, "--tp 4 does not divide the 3 kv heads"),
    ({"intermediate_size": 100}, 8, "--tp 8 does not divide the intermediate size 100 of model.layers.0.mlp.down_proj"),
    ({"vocab_size": 1001}, 2, "--tp 2 does not divide the vocab size 1001 of model.embed_tokens"),
])
def test_sizes_that_do_not_divide_are_named(change, tp, message):
    module = trace_model(sized_config("qwen3", **change), "f32")
    with pytest.raises(NanoForgeError, match=message.replace(".", r"\.")):
        PASSES["shard_tp"].run(module, shard_tp.Options(tp))


def test_moe_intermediate_that_does_not_divide(ckpt, tmp_path, capsys):
    module = trace_model(sized_config("qwen3_moe", moe_intermediate_size=36), "f32")
    message = r"--tp 8 does not divide the moe intermediate size 36 of model\.layers\.1\.mlp"
    with pytest.raises(NanoForgeError, match=message):
        PASSES["shard_tp"].run(module, shard_tp.Options(8))
    assert main(["compile", str(ckpt("qwen3")), "-o", str(tmp_path / "p"), "--tp", "16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --tp 16 does not divide the 8 attention heads of model.layers.0.self_attn"
    assert not (tmp_path / "p").exists()


def test_tp1_is_a_noop():
    module = trace_model(sized_config("qwen3"), "f32")
    before = format_module(module)
    assert PASSES["shard_tp"].run(module, shard_tp.Options(1)) == 0 and format_module(module) == before


def test_each_rank_reads_only_its_slice(ckpt):
    path = ckpt("qwen3_moe")  # kv heads == 8: every sharded tensor splits into tp equal parts
    ck, tp = open_checkpoint(path), 4
    module = compiled(path, tp)
    requests = []
    real = ck.read_slices
    ck.read_slices = lambda reqs, progress=True: (requests.extend(reqs), real(reqs, progress))[1]
    sharded = {n for n, p in module.params.items() if p.shard}
    for rank in range(tp):
        requests.clear()
        params = load_params(module, ck, progress=False, rank=rank)
        for name, t in params.items():
            assert tuple(t.shape) == tuple(module.params[name].type.shape), name
        sharded_keys = {k for n in sharded for k in module.params[n].keys}
        assert any(k in sharded_keys for k, _ in requests)  # the loader reads through ck.read_slices
        assert all(sl is not None for k, sl in requests if k in sharded_keys)  # never a whole sharded tensor
        local = sum(params[n].numel() for n in sharded)
        whole = sum(math.prod(ck.tensors[k].shape) for n in sharded for k in module.params[n].keys)
        assert local * tp == whole  # a rank holds 1/tp of every sharded tensor
    # the unsharded weights, cut as rank 2 cuts them
    whole_down = load_params(compiled(path, 1), ck, progress=False)["model.layers.0.mlp.down_proj.weight"]
    down = load_params(module, ck, progress=False, rank=2)["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(down, whole_down[:, 64:96])


def test_verify_each_pass_catches_a_broken_sharding(ckpt):
    def broken(module: Module, opts: dict) -> int:
        n = PASSES["shard_tp"].run(module, opts)
        fn = module.functions["forward"]
        ar = next(x for x in fn.nodes if x.op == "all_reduce" and x.source == "model.layers.1.mlp.down_proj")
        ar.op, ar.attrs = "silu", {}  # drops the sum over ranks
        return n

    passes = dict(PASSES, shard_tp=Pass("shard_tp", broken, "test-only bug", shard_tp.Options))
    module = trace_model(sized_config("qwen3"), "f32")
    ctx = PassContext(options={"shard_tp": shard_tp.Options(2)}, after_pass=numeric_check)
    with pytest.raises(NanoForgeError, match=r"pass shard_tp changed the numerics of forward: first divergence at "
                                             r"model\.layers\.1\.mlp\.down_proj .* on 2 simulated ranks"):
        PassManager(passes, PIPELINES["default"], ctx).run(module)


def test_inspect_rank(ckpt, tmp_path, capsys):
    plan = tmp_path / "plan"
    assert main(["compile", str(ckpt("qwen3")), "-o", str(plan), "--tp", "4", "-q"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(plan)]) == 0
    out = capsys.readouterr().out
    assert "parallel     tp=4: 4 ranks; per step 6 collectives (all_gather x1, all_reduce x5)" in out
    assert "per rank     weights" in out
    assert main(["inspect", str(plan), "--rank", "3"]) == 0
    out = capsys.readouterr().out
    assert "rank 3 of 4: tp 3 of 4" in out and "func forward(" in out
    assert "<- lm_head.weight [1024, 64] [768:1024, :]  65,536 B" in out
    assert "<- model.layers.0.self_attn.k_proj.weight [32, 64] [16:32, :]" in out  # kv head 1 of 2
    assert main(["inspect", str(plan), "--rank", "4"]) == 2
    assert capsys.readouterr().err.strip() == "error: --rank 4: the plan has 4 ranks (0..3)"


def test_shard_spec_api():
    from nanoforge.ir.graph import Param, TensorType

    spec = parse_spec("d0:4,2,2@tp")
    assert (spec.dim, spec.counts, spec.group, str(spec)) == (0, [4, 2, 2], "tp", "d0:4,2,2@tp")
    assert format_spec(1, 8, "ep") == "d1:8@ep"
    for bad in ("d0:4", "x0:4@tp", "d0:0@tp", "d0:4@pp"):
        with pytest.raises(ValueError):
            parse_spec(bad)
    cat = Param("qkv", TensorType("f32", (48, 8)), ["q", "k", "v"], "cat", "d0:4,2,2@tp")
    assert key_slices(cat, parse_spec(cat.shard), 1, (32, 8), 3, 4) == (slice(16, 32), slice(None))
    experts = Param("w", TensorType("f32", (2, 4, 8)), [f"e{i}" for i in range(8)], "stack", "d0:4@ep")
    spec = parse_spec(experts.shard)
    held = [key_slices(experts, spec, i, (4, 8), 1, 4) is not None for i in range(8)]
    assert held == [False, False, True, True] + [False] * 4  # rank 1 of 4 holds experts 2 and 3
    inner = Param("w", TensorType("f32", (8, 2, 8)), [f"e{i}" for i in range(8)], "stack", "d1:4@tp")
    assert key_slices(inner, parse_spec(inner.shard), 5, (8, 8), 2, 4) == (slice(4, 6), slice(None))
    layout = ParallelLayout(tp=2, attention_dp=2, ffn_ep=4)
    assert layout.rank_in_group("tp", 3) == (1, 2) and layout.rank_in_group("dp", 3) == (1, 2)
    assert layout.rank_in_group("ep", 3) == (3, 4)


def test_torch_dist_comm_on_gloo():
    """TorchDistComm over two real gloo processes: sums and gathers in rank order."""
    import torch.multiprocessing as mp

    mp.spawn(_gloo_worker, args=(2, free_tcp_port()), nprocs=2, join=True)


def _gloo_worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    from nanoforge.parallel.comm import TorchDistComm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        comm = TorchDistComm(ParallelLayout(tp=world), rank)
        assert comm.group_position("tp") == (rank, world)
        x = torch.full((2, 3), float(rank + 1))
        assert torch.equal(comm.all_reduce(x.clone(), "tp"), torch.full((2, 3), 3.0))
        gathered = torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)], -1)
        assert torch.equal(comm.all_gather(x, "tp", -1), gathered)
        assert torch.equal(comm.all_reduce(x.clone(), "ep"), x)  # a group of one
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_embed_providers_agree():
    """Both embed providers give this rank's rows and zeros for ids another rank holds."""
    from types import SimpleNamespace

    from nanoforge.kernels import torch_ref
    from nanoforge.kernels.triton import elementwise

    local = torch.randn(10, 8)  # rank 1 of 4 holds ids 10..19
    tokens = torch.tensor([0, 9, 10, 19, 20, 39])
    ctx = SimpleNamespace(comm=SimpleNamespace(group_position=lambda group: (1, 4)))
    want = torch.zeros(6, 8)
    want[2], want[3] = local[0], local[9]
    for embed in (torch_ref.embed, elementwise.embed):
        assert torch.equal(embed(tokens, local, vocab_parallel="tp", ctx=ctx), want)


def test_random_checkpoint_slices_match_whole_tensors():
    from nanoforge.models.random_checkpoint import RandomCheckpoint

    rc = RandomCheckpoint(sized_config("qwen3"), "tiny", "f32")
    key = "model.layers.1.mlp.down_proj.weight"
    whole = dict(rc.read([key], progress=False))[key]
    (_, part), = rc.read_slices([(key, (slice(None), slice(32, 64)))], progress=False)
    assert torch.equal(part, whole[:, 32:64])


def test_gguf_cannot_be_sharded(smollm2_gguf, tmp_path, capsys):
    assert main(["compile", str(smollm2_gguf), "-o", str(tmp_path / "p"), "--tp", "3", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "needs a safetensors checkpoint" in err and "\n" not in err
