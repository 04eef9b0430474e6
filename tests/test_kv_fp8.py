"""FP8 KV cache (`--kv-dtype fp8`, passes/quantize_kv.py) on CPU: the torch reference stores e4m3
entries with one scale per token and KV head and reads back exactly their dequantized values; every
architecture runs with its logits within a bound of the model-dtype KV run; batching, chunked
prefill, preemption and prefix caching keep outputs; the pool holds ~2x the tokens of bf16 KV;
PD moves values and scales; bad flags are one-line errors."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from hf_fixtures import ARCHS, random_prompts, tiny_config
from nanoforge import LLM, SamplingParams
from nanoforge.compiler import CompileOptions, compile_checkpoint
from nanoforge.errors import NanoForgeError
from nanoforge.kernels import fp8, torch_ref
from nanoforge.kernels.context import make_context
from nanoforge.models.presets import PRESETS
from nanoforge.models.random_checkpoint import RandomCheckpoint
from nanoforge.runtime.kv_transfer import gather_blocks, scatter_blocks
from test_shard_tp import ckpt  # noqa: F401 - tiny checkpoints whose sizes divide by the ranks

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
LENGTHS = [3, 17, 5, 40, 9, 1, 24, 12, 33, 7, 16, 2]


def _fp8_pool(num_blocks: int, bs: int, *entry: int, heads: int) -> tuple[torch.Tensor, ...]:
    """An FP8 pool layer of one tensor filled with garbage (NaN scales), which no read may touch."""
    values = torch.full((num_blocks, bs, *entry), float("nan")).to(fp8.FP8)
    return values, torch.full((num_blocks, bs, heads), float("nan"))


def _seqs():
    """A prefill chunk on a cached prefix, a fresh prompt and a decode row; shuffled blocks of 4."""
    return [(3, 9, [7, 2, 5]), (6, 6, [0, 4]), (1, 5, [3, 6])]


def test_reference_gqa_reads_back_the_dequantized_entries_it_stored():
    torch.manual_seed(0)
    h, kvh, d, bs = 4, 2, 16, 4
    seqs = _seqs()
    pool = [_fp8_pool(8, bs, kvh, d, heads=kvh)[:1] + _fp8_pool(8, bs, kvh, d, heads=kvh)[:1]
            + (torch.full((8, bs, kvh), float("nan")), torch.full((8, bs, kvh), float("nan")))]
    plain = [(torch.zeros(8, bs, kvh, d), torch.zeros(8, bs, kvh, d))]
    hist = {}  # earlier tokens of each sequence, stored first through the same op
    for i, (q_len, ctx_len, _) in enumerate(seqs):
        if ctx_len > q_len:
            hist[i] = ctx_len - q_len
    prev = [(n, n, seqs[i][2]) for i, n in hist.items()]
    ctxs = [make_context(p, bs, prev) for p in (pool, plain)]
    t = sum(n for n, _, _ in prev)
    k, v = torch.randn(t, kvh * d) * 3, torch.randn(t, kvh * d)
    kq, ks = fp8.quantize_kv(k.view(t, kvh, d))
    vq, vs = fp8.quantize_kv(v.view(t, kvh, d))
    kd, vd = fp8.dequantize_kv(kq, ks, torch.float32), fp8.dequantize_kv(vq, vs, torch.float32)
    a = dict(kind="gqa", layer=0, scale=d ** -0.5, heads=h, kv_heads=kvh, head_dim=d)
    q = torch.randn(t, h * d)
    torch_ref.attention(q, k, v, ctx=ctxs[0], **a)
    torch_ref.attention(q, kd.reshape(t, -1), vd.reshape(t, -1), ctx=ctxs[1], **a)
    t = sum(n for n, _, _ in seqs)
    k, v, q = torch.randn(t, kvh * d), torch.randn(t, kvh * d) * 0.1, torch.randn(t, h * d)
    kd = fp8.dequantize_kv(*fp8.quantize_kv(k.view(t, kvh, d)), torch.float32).reshape(t, -1)
    vd = fp8.dequantize_kv(*fp8.quantize_kv(v.view(t, kvh, d)), torch.float32).reshape(t, -1)
    got = torch_ref.attention(q, k, v, ctx=make_context(pool, bs, seqs), **a)
    want = torch_ref.attention(q, kd, vd, ctx=make_context(plain, bs, seqs), **a)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    flat = pool[0][2].view(-1, kvh)  # the scales of the stored rows are the entries' own
    slots = make_context(pool, bs, seqs).slot_mapping
    torch.testing.assert_close(flat[slots], fp8.quantize_kv(k.view(t, kvh, d))[1])


def test_reference_mla_quantizes_the_whole_entry_with_one_scale():
    torch.manual_seed(1)
    h, nope, rope_d, vd_, r, bs = 2, 8, 4, 8, 16, 4
    seqs = [(5, 5, [1, 3]), (1, 1, [0])]
    t = 6
    q, lat, kr = torch.randn(t, h * (nope + rope_d)), torch.randn(t, r), torch.randn(t, rope_d) * 0.01
    w = torch.randn(h * (nope + vd_), r) * 0.2
    a = dict(kind="mla", layer=0, scale=0.3, heads=h, qk_nope_head_dim=nope, qk_rope_head_dim=rope_d, v_head_dim=vd_)
    pool = [_fp8_pool(4, bs, r + rope_d, heads=1)]
    got = torch_ref.attention(q, lat, kr, ctx=make_context(pool, bs, seqs), kv_b_proj=w, **a)
    entry = fp8.dequantize_kv(*fp8.quantize_kv(torch.cat([lat, kr], -1)[:, None]), torch.float32)[:, 0]
    want = torch_ref.attention(q, entry[:, :r], entry[:, r:], ctx=make_context([(torch.zeros(4, bs, r + rope_d),)], bs,
                                                                                 seqs), kv_b_proj=w, **a)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _all_logits(llm: LLM, prompt: list[int]) -> torch.Tensor:
    r, n = llm.engine.runner, len(prompt)
    return r.run(prompt, [(n, n, list(range(-(-n // r.block_size))))], list(range(n)))


# relative RMS error of the logits vs model-dtype KV (tiny random models amplify the ~3.6% RMS error
# of one e4m3 entry through their layers, and MoE routing flips; a wrong scale or a missed dequantize
# is an error of order 1): bound on the mean over positions, and on position 0 (attention = V there)
BOUNDS = {"qwen3": 0.1, "qwen3_moe": 0.15, "deepseek_v3": 0.25, "llama": 0.25}


@pytest.mark.parametrize("arch", ARCHS)
def test_fp8_kv_logits_stay_close_to_model_dtype_kv(arch, tiny_ckpt):
    prompt = random_prompts(tiny_config(arch).vocab_size, [64], seed=5)[0]
    ref = _all_logits(LLM(tiny_ckpt(arch), progress=False), prompt)
    llm = LLM(tiny_ckpt(arch), progress=False, kv_dtype="fp8")
    assert {n.provider for _, n in llm.plan.module.nodes() if n.op == "attention"} == {"torch"}
    got = _all_logits(llm, prompt)
    rel = (got - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert 1e-4 < rel.mean() < BOUNDS[arch] and rel[0] < BOUNDS[arch], rel
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.7


@pytest.mark.parametrize("arch", ARCHS)
def test_fp8_kv_batching_chunking_preemption_and_prefix_cache_keep_outputs(arch, tiny_ckpt):
    prompts = random_prompts(tiny_config(arch).vocab_size, LENGTHS, seed=7)
    prompts.append(prompts[3][:32] + prompts[0])  # two cached blocks of the 40-token prompt
    alone = LLM(tiny_ckpt(arch), progress=False, kv_dtype="fp8", max_num_seqs=1, prefix_caching=False)
    want = [alone.generate([p], GREEDY)[0].token_ids for p in prompts]
    llm = LLM(tiny_ckpt(arch), progress=False, kv_dtype="fp8", num_blocks=12, max_prefill_chunk=16,
              max_num_batched_tokens=64)
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == want
    m = llm.metrics()
    assert m["preemptions"] > 0 and m["prefix_cache_hit_tokens"] >= 32
    assert m["kv_cache"]["dtype"] == "fp8_e4m3 + f32 scales" and m["kv_cache"]["tokens"] == 12 * 16
    eng = llm.engine
    eng.blocks.check_invariants([])
    assert eng.blocks.num_free == eng.blocks.num_blocks


def test_pool_holds_about_twice_the_tokens_of_bf16_kv():
    ck = RandomCheckpoint(PRESETS["qwen3-0.6b"], "qwen3-0.6b", "bf16")
    per_token = {kv: compile_checkpoint(ck.path, CompileOptions(dtype="bf16", kv_dtype=kv, config_only=True),
                                        ckpt=ck).memory.kv_bytes_per_token for kv in ("auto", "fp8")}
    # 28 layers x (K, V) x 8 KV heads x (128 values + one f32 scale)
    assert per_token == {"auto": 28 * 2 * 8 * 128 * 2, "fp8": 28 * 2 * 8 * (128 + 4)}
    assert per_token["auto"] / per_token["fp8"] > 1.9


def test_pd_moves_values_and_scales_and_decode_equals_one_engine(tiny_ckpt):
    ck = tiny_ckpt("qwen3")
    a = LLM(ck, progress=False, num_blocks=64, kv_dtype="fp8")
    b = LLM(ck, progress=False, num_blocks=64, kv_dtype="fp8")
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompt = random_prompts(tiny_config("qwen3").vocab_size, [37], seed=3)[0]
    want = a.generate([prompt], sp)[0].token_ids
    ea, eb = a.engine, b.engine
    seq = ea.add_request(prompt, sp)
    while not seq.num_output:
        ea.step()
    assert ea.park(seq) is None
    moved, _ = eb.add_migrated(seq.token_ids, seq.num_prompt, sp, seq.num_computed)
    bufs = gather_blocks(ea.runner.pool, seq.block_table)
    assert len(bufs) == 4 * len(ea.runner.pool)  # K, V and their scales, per layer
    n = scatter_blocks(eb.runner.pool, moved.block_table, bufs)
    layers, kvh, d = len(ea.runner.pool), ea.runner.pool[0][0].shape[2], ea.runner.pool[0][0].shape[3]
    assert n == 3 * 16 * layers * 2 * kvh * (d + 4)  # blocks x tokens x layers x (k, v) x heads x (e4m3 + f32 scale)
    eb.resume_migrated(moved, seq.num_computed)
    eb.run_until_done()
    assert moved.output_ids == want
    ea.release_parked(seq)
    assert b.plan.kv_contract.mismatches(LLM(ck, progress=False, num_blocks=8).plan.kv_contract)


def test_cli_compile_inspect_and_bad_flags(tiny_ckpt, tmp_path):
    ck, plan = str(tiny_ckpt("llama")), str(tmp_path / "plan")
    cli = [sys.executable, "-m", "nanoforge.cli"]
    done = subprocess.run(cli + ["compile", ck, "-o", plan, "--kv-dtype", "fp8", "--dump-dir", str(tmp_path / "d")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    shown = subprocess.run(cli + ["inspect", plan], capture_output=True, text=True).stdout
    assert "fp8_e4m3 + f32 scales:" in shown and "x f32's" in shown and "quantize_kv(" in shown
    dumps = sorted((tmp_path / "d").glob("*quantize_kv.ir"))
    assert dumps and 'kv_dtype="fp8_e4m3"' in dumps[0].read_text()
    bad = subprocess.run(cli + ["compile", ck, "-o", str(tmp_path / "p2"), "--kv-dtype", "int4"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --kv-dtype 'int4'")
    assert not (tmp_path / "p2").exists()
    with pytest.raises(NanoForgeError, match="--kv-dtype fp8 needs the quantize_kv pass"):
        compile_checkpoint(ck, CompileOptions(kv_dtype="fp8", disable_passes=["quantize_kv"]))
    # --index-kv-dtype (DeepSeek-V3.2 / GLM-5's indexer keys: tests/test_deepseek_v32.py) reaches the engine from
    # generate / serve, and a model without an indexer says so in one line naming the flag
    from nanoforge.cli import build_parser
    from nanoforge.serving.engine_flags import engine_options

    for cmd in (["generate", ck, "--prompt", "x"], ["serve", ck]):
        assert engine_options(build_parser().parse_args(cmd + ["--index-kv-dtype", "fp8"]))["index_kv_dtype"] == "fp8"
    for kv in ("auto", "fp8"):
        with pytest.raises(NanoForgeError, match=r"^--index-kv-dtype fp8: LlamaForCausalLM has no sparse-attention "
                                                 r"indexer \(DeepSeek-V3.2 / GLM-5 do\); use --kv-dtype fp8$"):
            LLM(ck, progress=False, kv_dtype=kv, index_kv_dtype="fp8")


def test_sharded_plans_with_fp8_kv_match_unsharded(ckpt):  # noqa: F811
    """TP (2 KV heads over 4 ranks: replicated in groups, each copy scaled alike) and attention-DP x
    FFN-EP with FP8 KV, as simulated ranks with --verify-each-pass, give the unsharded FP8 logits."""
    from nanoforge.check.recorded import run_recorded
    from nanoforge.check.simulate import run_ranks, run_ranks_dp
    from nanoforge.models.checkpoint import open_checkpoint
    from nanoforge.models.weights import load_params
    def module(path, **kw):
        return compile_checkpoint(path, CompileOptions(dtype="f32", kv_dtype="fp8", verify_each_pass=True, **kw)).module

    path = ckpt("qwen3")
    ck = open_checkpoint(path)
    ref = module(path)
    want = run_recorded(ref, "forward", load_params(ref, ck, progress=False))[ref.functions["forward"].outputs[0].name]
    tp4 = module(path, tp=4)
    assert all(n.attrs["kv_dtype"] == "fp8_e4m3" and n.attrs["kv_heads"] == 1 for _, n in tp4.nodes() if n.op == "attention")
    for values in run_ranks(tp4, ck):
        torch.testing.assert_close(values[tp4.functions["forward"].outputs[0].name], want, rtol=1e-4,
                                   atol=1e-4 * want.abs().max().item())
    path = ckpt("deepseek_v3")
    ck = open_checkpoint(path)
    prompts = [[5, 9, 200, 7], [3], [11, 12, 13, 14, 15, 16, 17]]
    want = run_ranks_dp(module(path), ck, prompts)
    got = run_ranks_dp(module(path, attention_dp=2, ffn_ep=2), ck, prompts)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.timeout(240)
def test_pd_engine_servers_with_fp8_kv(tiny_ckpt):
    """Two engine processes with FP8 KV behind the router (KV and scales moved host-staged over ZMQ)
    give one FP8 engine's greedy tokens; the router refuses to pair the FP8 prefill engine with a
    model-dtype-KV decode engine, naming the difference."""
    import asyncio

    from nanoforge.serving.engine_server import start_engine_server, wait_engine_ready
    from nanoforge.serving.protocol import GenerateRequest
    from nanoforge.serving.router import Router
    from nanoforge.serving.zmq_client import ZmqEngineClient

    ck = tiny_ckpt("qwen3")
    common = {"num_blocks": 128, "max_num_seqs": 8, "model_name": "tiny"}
    procs = {"prefill": start_engine_server(ck, role="prefill", kv_dtype="fp8", **common),
             "decode": start_engine_server(ck, role="decode", kv_dtype="fp8", **common),
             "plain": start_engine_server(ck, role="decode", **common)}
    try:
        prompts = random_prompts(tiny_config("qwen3").vocab_size, [37, 5, 20], seed=9)
        want = [o.token_ids for o in LLM(ck, progress=False, kv_dtype="fp8").generate(
            prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))]
        for proc, addr in procs.values():
            wait_engine_ready(proc, addr, timeout=120)

        async def main():
            router = await Router.connect([procs["prefill"][1]], [procs["decode"][1]])
            try:
                async def one(i, p):
                    return [t async for d in router.generate(GenerateRequest(
                        f"r{i}", p, {"temperature": 0, "max_tokens": 8, "ignore_eos": True})) for t in d.token_ids]
                outs = await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)])
                c = await ZmqEngineClient.connect(procs["decode"][1], timeout=5)
                try:
                    return outs, await c.stats()
                finally:
                    c.close()
            finally:
                router.close()

        got, decode = asyncio.run(main())
        assert got == want  # the KV (values and scales) was pulled, not recomputed:
        assert decode["kv_migrations"] == len(prompts) and decode["kv_migration_fallbacks"] == 0
        with pytest.raises(NanoForgeError, match="dtype: 'fp8_e4m3' vs 'f32'"):
            asyncio.run(Router.connect([procs["prefill"][1]], [procs["plain"][1]]))
    finally:
        for proc, _ in procs.values():
            proc.kill()
            proc.wait()
