"""DeepSeek-V3.2 and GLM-5 (issue 20): the lightning indexer + top-k sparse MLA, traced into the IR
(ops `indexer`, `sparse_mla`), the indexer's keys paged beside MLA's entries in the KV contract, and
the torch reference against transformers. Tiny random checkpoints (save_pretrained) with `index_topk`
well below the prompts, so most queries attend to a real top-k subset: batched prompts with chunked
prefill give HF's greedy tokens, and a dense variant of the same weights does not (so the comparison
sees the selection); prefix caching and a PD move of the blocks change nothing, with the indexer's keys
in the model's dtype or (`--index-kv-dtype fp8`) in FP8 beside model-dtype latents."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from hf_fixtures import _quiet_transformers, make_tokenizer, random_prompts
from nanoforge import LLM, SamplingParams
from nanoforge.errors import NanoForgeError
from nanoforge.ir.parser import parse_module
from nanoforge.ir.printer import format_module
from nanoforge.kernels import dsa_ref
from nanoforge.kernels.context import allocate_pool, make_context
from nanoforge.kv_contract import KVContract, KVLayer
from nanoforge.models import trace_model
from nanoforge.runtime.kv_transfer import gather_blocks, scatter_blocks

pytestmark = pytest.mark.timeout(120)
VOCAB = 1000
TOPK = {"deepseek_v32": 8, "glm_moe_dsa": 6}
LENGTHS = [5, 13, 29, 40]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops: OpenMP threads spin-waiting on a busy 2-core box made this file 5-15x slower (the
    same reason tests/test_bench_deepseek_layers.py runs with OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(arch: str, **over):
    """`over`: config fields to change (tests/test_gpu_dsa_libs.py: the dims the GPU libraries take)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=192, moe_intermediate_size=48,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32,
                  qk_nope_head_dim=16, qk_rope_head_dim=8, first_k_dense_replace=1, routed_scaling_factor=2.5,
                  n_shared_experts=1, norm_topk_prob=True, index_topk=TOPK[arch], index_head_dim=16,
                  index_n_heads=8, max_position_embeddings=512, bos_token_id=0, eos_token_id=2, pad_token_id=None,
                  initializer_range=0.12, tie_word_embeddings=False)
    common.update(over)
    if arch == "deepseek_v32":  # YaRN: the indexer's rope carries the attention factor too
        return tf.DeepseekV32Config(
            v_head_dim=16, n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                             "original_max_position_embeddings": 128, "mscale": 1.0, "mscale_all_dim": 0.8,
                             "beta_fast": 32, "beta_slow": 1}, **common)
    return tf.GlmMoeDsaConfig(  # layer 1 reuses layer 0's top-k ("shared"), v_head_dim != qk_nope_head_dim
        v_head_dim=24, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1, rms_norm_eps=1e-5,
        indexer_types=["full", "shared", "full"], rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        **common)


def make_checkpoint(arch: str, out: Path, seed: int = 0, **over) -> Path:
    """Seeded random weights as HF initialises them (std 0.12), every norm weight (RMSNorm and the
    indexer's LayerNorm) 1 + 0.1 randn, LayerNorm biases and router score biases 0.1 randn."""
    import transformers as tf

    torch.manual_seed(seed)
    with _quiet_transformers():
        model = tf.AutoModelForCausalLM.from_config(tiny_config(arch, **over), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if type(mod).__name__.endswith("RMSNorm") or isinstance(mod, torch.nn.LayerNorm):
                mod.weight.copy_(1 + 0.1 * torch.randn(mod.weight.shape, generator=g))
            for extra in ("bias", "e_score_correction_bias"):
                b = getattr(mod, extra, None)
                if isinstance(b, torch.Tensor) and (extra != "bias" or isinstance(mod, torch.nn.LayerNorm)):
                    b.copy_(0.1 * torch.randn(b.shape, generator=g))
    with _quiet_transformers():
        model.save_pretrained(out)
    make_tokenizer(VOCAB).save_pretrained(out)
    return out


def with_config(src: Path, out: Path, **change) -> Path:
    """The same weights (linked) under a changed config.json."""
    out.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            os.symlink(f, out / f.name)
    (out / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()), **change}))
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("dsa")
    return {arch: make_checkpoint(arch, root / arch) for arch in TOPK}


def hf_model(path: Path):
    import transformers as tf

    with _quiet_transformers():
        return tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                                       experts_implementation="eager").eval()


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    from transformers import DynamicCache

    cache, ids, out = DynamicCache(config=model.config), torch.tensor([prompt]), []
    with torch.inference_mode():
        for _ in range(n):
            out.append(int(model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1].argmax()))
            ids = torch.tensor([[out[-1]]])
    return out


def test_trace_ops_kv_contract_and_ir_round_trip(ckpts):
    for arch, indexed in (("deepseek_v32", [0, 1, 2]), ("glm_moe_dsa", [0, 2])):
        llm = LLM(ckpts[arch], progress=False)
        nodes = [n for _, n in llm.plan.module.nodes()]
        idx = [n for n in nodes if n.op == "indexer"]
        sparse = [n for n in nodes if n.op == "sparse_mla"]
        assert [n.attrs["layer"] for n in idx] == indexed and len(sparse) == 3
        assert not any(n.op == "attention" for n in nodes)
        assert idx[0].source.endswith("layers.0.self_attn.indexer") and idx[0].outputs[0].type.dtype == "i32"
        k = TOPK[arch]
        assert sparse[0].attrs["selection"] == f"top-{k} of this layer's indexer; dense MLA at <= {k} tokens of context"
        if arch == "glm_moe_dsa":  # the shared layer attends over layer 0's selection, and has no indexer cache
            assert sparse[1].inputs[3] is idx[0].outputs[0] and "layer 0's indexer" in sparse[1].attrs["selection"]
            assert idx[0].attrs["style"] == "interleaved"
        else:
            assert idx[0].attrs["style"] == "neox" and idx[0].attrs["scaling"]["type"] == "yarn"
        entry = (32 + 8,)
        want = tuple(KVLayer(i, "dsa" if i in indexed else "mla", (entry, (16,)) if i in indexed else (entry,),
                             f"model.layers.{i}.self_attn") for i in range(3))
        contract = llm.plan.kv_contract
        assert contract.layers == want and contract.dtype == "f32"
        assert contract.bytes_per_token() == 4 * (3 * 40 + 16 * len(indexed))
        assert KVContract.from_json(contract.to_json()) == contract
        text = format_module(llm.plan.module)
        assert format_module(parse_module(text)) == text


def test_config_errors_are_one_line(ckpts):
    glm = json.loads((ckpts["glm_moe_dsa"] / "config.json").read_text())
    for change, match in (({"indexer_types": ["shared", "full", "full"]}, "layer 0 shares the top-k of an earlier"),
                          ({"indexer_types": ["full", "sparse", "full"]}, r"indexer_types holds \['sparse'\]"),
                          ({"indexer_types": ["full"]}, "indexer_types lists 1 layers, the model has 3"),
                          ({"q_lora_rank": None}, "needs q_lora_rank")):
        with pytest.raises(NanoForgeError, match=match):
            trace_model({**glm, **change}, "f32")
    with pytest.raises(NanoForgeError, match="--tp 2: sparse attention .* is not split over ranks yet"):
        LLM(ckpts["glm_moe_dsa"], progress=False, tp=2)
    pattern = {k: v for k, v in glm.items() if k != "indexer_types"}  # derived as transformers does
    kinds = lambda cfg: [n.attrs["layer"] for _, n in trace_model(cfg, "f32").nodes() if n.op == "indexer"]  # noqa
    assert kinds({**pattern, "index_topk_pattern": "FSF"}) == [0, 2]
    assert kinds({**pattern, "index_topk_freq": 2, "index_skip_topk_offset": 1}) == [0, 2]


@pytest.mark.parametrize("arch", list(TOPK))
def test_batched_chunked_greedy_equals_hf_and_dense_does_not(arch, ckpts, tmp_path):
    prompts = random_prompts(VOCAB, LENGTHS, seed=2)
    hf = hf_model(ckpts[arch])
    want = [hf_greedy(hf, p, GREEDY.max_tokens) for p in prompts]
    llm = LLM(ckpts[arch], progress=False, max_prefill_chunk=8, max_num_batched_tokens=24)
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == want
    llm.engine.blocks.check_invariants([])
    assert llm.metrics()["steps"] > len(LENGTHS) + GREEDY.max_tokens  # prompts went in chunks
    # logits of the whole batch at once
    ref = torch.stack([hf(input_ids=torch.tensor([p])).logits[0, -1] for p in prompts]).detach()
    got = llm.last_logits(prompts)
    assert ((got - ref).abs().max() / ref.abs().max()) < 1e-4
    # the same weights with a top-k above every context (dense MLA) give other logits past top-k tokens
    dense = LLM(with_config(ckpts[arch], tmp_path / "dense", index_topk=4096), progress=False).last_logits(prompts)
    rel = (dense - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert rel[0] < 1e-4 and (rel[1:] > 0.05).all(), rel  # 5 tokens <= top-k: dense already


@pytest.mark.parametrize("index_kv", ["auto", "fp8"])
@pytest.mark.parametrize("arch", list(TOPK))
def test_prefix_caching_on_equals_off(arch, index_kv, ckpts):
    base = random_prompts(VOCAB, [40, 7, 11], seed=4)
    prompts = [base[0], base[0][:33] + base[1], base[0][:17] + base[2]]
    sp, runs = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), {}
    for on in (True, False):
        llm = LLM(ckpts[arch], progress=False, prefix_caching=on, max_prefill_chunk=16, index_kv_dtype=index_kv)
        outs = [llm.generate([p], sp)[0] for p in prompts]  # one after another: later ones find blocks
        runs[on] = [o.token_ids for o in outs]
        assert [o.num_cached_tokens for o in outs] == ([0, 32, 16] if on else [0, 0, 0])
    assert runs[True] == runs[False]


@pytest.mark.parametrize("index_kv", ["auto", "fp8"])
def test_pd_move_of_entries_and_indexer_keys_equals_one_engine(index_kv, ckpts):
    ck = ckpts["glm_moe_dsa"]
    a, b = (LLM(ck, progress=False, num_blocks=32, index_kv_dtype=index_kv) for _ in range(2))
    prompt = random_prompts(VOCAB, [37], seed=3)[0]
    want = a.generate([prompt], GREEDY)[0].token_ids
    ea, eb = a.engine, b.engine
    seq = ea.add_request(prompt, GREEDY)
    while not seq.num_output:
        ea.step()
    assert ea.park(seq) is None
    moved, _ = eb.add_migrated(seq.token_ids, seq.num_prompt, GREEDY, seq.num_computed)
    bufs = gather_blocks(ea.runner.pool, seq.block_table)
    if index_kv == "auto":
        assert len(bufs) == 5  # layers 0 and 2: entry + indexer keys; the shared layer 1: entry
        assert scatter_blocks(eb.runner.pool, moved.block_table, bufs) == 3 * 16 * 4 * (3 * 40 + 2 * 16)
    else:  # layers 0 and 2 add their keys' scales: f32 entries, e4m3 keys, f32 scales
        assert len(bufs) == 7
        assert scatter_blocks(eb.runner.pool, moved.block_table, bufs) == 3 * 16 * (4 * 3 * 40 + 2 * (16 + 4))
        assert "scale_dtype: None vs 'f32'" in LLM(ck, progress=False, num_blocks=8).plan.kv_contract.mismatches(
            a.plan.kv_contract)  # a router refuses to pair it with a model-dtype-keys engine
    eb.resume_migrated(moved, seq.num_computed)
    eb.run_until_done()
    assert moved.output_ids == want
    ea.release_parked(seq)


def test_fp8_kv_scales_both_caches_and_equals_rounded_values(ckpts, monkeypatch):
    """--kv-dtype fp8: the MLA entries and the indexer keys are stored as e4m3 with an f32 scale per token;
    the logits equal the model-dtype pool's with every stored value rounded through FP8 the same way
    (and differ from the unrounded ones). Rounding alone moves these tiny models' logits by 5-100%: an
    index key off by 3% flips which tokens make the top-k."""
    from nanoforge.kernels import fp8

    ck = ckpts["deepseek_v32"]
    llm = LLM(ck, progress=False, kv_dtype="fp8")
    contract = llm.plan.kv_contract
    assert contract.scale_dtype == "f32" and all(layer.scale_shapes == ((1,), (1,)) for layer in contract.layers)
    assert {n.attrs.get("kv_dtype") for _, n in llm.plan.module.nodes() if n.op in ("indexer", "sparse_mla")} \
        == {"fp8_e4m3"}
    assert llm.engine.runner.pool[0][0].dtype == llm.engine.runner.pool[0][1].dtype == torch.float8_e4m3fn
    prompts = random_prompts(VOCAB, [13, 40], seed=5)
    got = llm.last_logits(prompts)
    plain = LLM(ck, progress=False).last_logits(prompts)
    store = dsa_ref.store

    def rounded(cache, slots, values, scale):
        q, s = fp8.quantize_kv(values[:, None, :])
        store(cache, slots, fp8.dequantize_kv(q, s, values.dtype)[:, 0], scale)

    monkeypatch.setattr(dsa_ref, "store", rounded)
    want = LLM(ck, progress=False).last_logits(prompts)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert ((got - plain).norm(dim=-1) / plain.norm(dim=-1)).min() > 1e-3


def test_fp8_indexer_keys_beside_model_dtype_latents(ckpts, tmp_path, monkeypatch, capsys):
    """--index-kv-dtype fp8: the indexer's keys in e4m3 with an f32 scale per token, MLA's latents in the
    model's dtype (f32 here): the dump, inspect and the contract say so and the plan round-trips; the logits
    equal the model-dtype pool's with only the indexer keys rounded through FP8 the same way; contexts within
    index_topk are dense (no key is read), so their greedy tokens equal HF's. (Past index_topk the rounding
    may flip which tokens make the top-k: tokens need not equal HF's there.)"""
    from nanoforge import cli
    from nanoforge.kernels import fp8

    ck, plan_dir, dumps = ckpts["deepseek_v32"], tmp_path / "plan", tmp_path / "dumps"
    assert cli.main(["compile", str(ck), "-o", str(plan_dir), "--index-kv-dtype", "fp8", "--dump-dir", str(dumps),
                     "-q"]) == 0
    (dump,) = dumps.glob("*quantize_kv.ir")
    lines = dump.read_text().splitlines()
    assert sum('= indexer(' in x and 'kv_dtype="fp8_e4m3", kv_scale="per token"' in x for x in lines) == 3
    assert sum('= sparse_mla(' in x for x in lines) == 3 and not any('= sparse_mla(' in x and "kv_dtype" in x
                                                                    for x in lines)
    capsys.readouterr()
    assert cli.main(["inspect", str(plan_dir)]) == 0
    assert "KV 540 B/token (block 16, f32, indexer keys fp8_e4m3 + f32 scales: " in capsys.readouterr().out
    assert cli.main(["compile", str(ck), "-o", str(tmp_path / "bad"), "--index-kv-dtype", "int4"]) == 2
    assert "error: --index-kv-dtype 'int4': choose auto" in capsys.readouterr().err
    llm, fresh = LLM(plan_dir, progress=False, index_kv_dtype="fp8"), LLM(ck, progress=False, index_kv_dtype="fp8")
    contract = llm.plan.kv_contract
    assert contract == fresh.plan.kv_contract and KVContract.from_json(contract.to_json()) == contract
    assert contract.layers == tuple(KVLayer(i, "dsa", ((40,), (16,)), f"model.layers.{i}.self_attn", ((1,),),
                                            ("f32", "fp8_e4m3")) for i in range(3))
    assert contract.dtype == "f32" and contract.scale_dtype == "f32" and contract.index_dtype() == "fp8_e4m3"
    assert contract.bytes_per_token() == 3 * (4 * 40 + 16 + 4)
    assert [t.dtype for t in llm.engine.runner.pool[0]] == [torch.float32, torch.float8_e4m3fn, torch.float32]
    assert llm.metrics()["kv_cache"]["dtype"] == "f32, indexer keys fp8_e4m3 + f32 scales"
    plain = LLM(ck, progress=False)
    with pytest.raises(NanoForgeError, match="--index-kv-dtype fp8: .* is a plan with f32 indexer keys; recompile"):
        plain.plan.save(tmp_path / "plain")
        LLM(tmp_path / "plain", progress=False, index_kv_dtype="fp8")
    short = random_prompts(VOCAB, [3, 4], seed=7)  # + 5 tokens: every step's context <= index_topk 8
    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    hf = hf_model(ck)
    assert [o.token_ids for o in llm.generate(short, sp)] == [hf_greedy(hf, p, 5) for p in short]
    prompts = random_prompts(VOCAB, [13, 40], seed=5)
    got, unrounded = llm.last_logits(prompts), plain.last_logits(prompts)
    store = dsa_ref.store

    def rounded_keys(cache, slots, values, scale):
        if values.shape[-1] == 16:  # the indexer's keys (MLA's entries are 40 wide)
            q, s = fp8.quantize_kv(values[:, None, :])
            values = fp8.dequantize_kv(q, s, values.dtype)[:, 0]
        store(cache, slots, values, scale)

    monkeypatch.setattr(dsa_ref, "store", rounded_keys)
    torch.testing.assert_close(got, LLM(ck, progress=False).last_logits(prompts), rtol=1e-5, atol=1e-5)
    assert ((got - unrounded).norm(dim=-1) / unrounded.norm(dim=-1)).max() > 1e-3  # the rounding shows


def test_block_fp8_checkpoint_as_shipped_gives_hf_tokens_on_its_dequantized_weights(ckpts, tmp_path):
    """Every 2-D decoder weight block-quantized to e4m3 (the indexer's wq_b / wk and kv_b_proj too, as the
    real checkpoints ship them; weights_proj and norms stay high precision): FP8 linears, kv_b_proj widened
    at load; HF runs the same weights dequantized."""
    from safetensors.torch import load_file, save_file

    from fp8_fixtures import QUANT_CONFIG, dequantize_block_fp8, quantize_block_fp8

    src = ckpts["glm_moe_dsa"]
    fp8_dir, wide_dir = with_config(src, tmp_path / "fp8", quantization_config=QUANT_CONFIG), tmp_path / "wide"
    wide_dir.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            os.symlink(f, wide_dir / f.name)
    out, wide = {}, {}
    for key, t in load_file(src / "model.safetensors").items():
        if key.startswith("model.layers.") and t.dim() == 2 and "weights_proj" not in key and ".gate." not in key:
            out[key], out[f"{key}_scale_inv"] = quantize_block_fp8(t)
            wide[key] = dequantize_block_fp8(out[key], out[f"{key}_scale_inv"])
        else:
            out[key] = wide[key] = t
    (fp8_dir / "model.safetensors").unlink()
    save_file(out, fp8_dir / "model.safetensors", metadata={"format": "pt"})
    save_file(wide, wide_dir / "model.safetensors", metadata={"format": "pt"})
    llm = LLM(fp8_dir, progress=False)
    quant = {n: p.quant for n, p in llm.plan.module.params.items() if p.quant}
    assert quant["model.layers.0.self_attn.kv_b_proj.weight"] == "dequant:128x128"
    assert any("indexer.wq_b" in n and q.startswith("fp8_e4m3") for n, q in quant.items())
    prompts = random_prompts(VOCAB, [13, 40], seed=6)
    hf = hf_model(wide_dir)
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == [hf_greedy(hf, p, GREEDY.max_tokens)
                                                                    for p in prompts]


def test_indexer_matches_hf_module_over_a_paged_cache():
    """The reference indexer, fed a cached prefix then a chunk through a shuffled block table, picks the
    same tokens as transformers' DeepseekV32Indexer / GlmMoeDsaIndexer on the whole sequence."""
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32Indexer, DeepseekV32RotaryEmbedding
    from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import GlmMoeDsaIndexer

    torch.manual_seed(0)
    for arch, cls, style in (("deepseek_v32", DeepseekV32Indexer, "neox"), ("glm_moe_dsa", GlmMoeDsaIndexer,
                                                                             "interleaved")):
        c = tiny_config(arch)
        mod = cls(c, 0).eval()
        for p in mod.parameters():
            torch.nn.init.normal_(p, std=0.3)
        n, first, bs = 45, 30, 4
        x, q_resid = torch.randn(1, n, c.hidden_size), torch.randn(1, n, c.q_lora_rank)
        pos = torch.arange(n)[None]
        mask = torch.full((n, n), float("-inf")).triu(1)[None]
        with torch.no_grad():
            want = mod(x, q_resid, DeepseekV32RotaryEmbedding(c)(x, pos), mask, pos).long()[0]
        scaling = {"type": "yarn", **{k: v for k, v in c.rope_parameters.items() if k not in ("rope_type", "rope_theta")}} \
            if c.rope_parameters["rope_type"] == "yarn" else None
        kw = dict(layer=0, heads=c.index_n_heads, head_dim=c.index_head_dim, rope_dim=c.qk_rope_head_dim, style=style,
                  theta=c.rope_parameters["rope_theta"], scaling=scaling, topk=c.index_topk,
                  scale=c.index_head_dim ** -0.5, eps=1e-6)
        contract = KVContract(bs, "f32", (KVLayer(0, "dsa", ((40,), (c.index_head_dim,))),))
        pool = allocate_pool(contract, 16)
        blocks = torch.randperm(16)[: -(-n // bs)].tolist()
        got = []
        for start, end in ((0, first), (first, n)):  # the prefix, then a chunk over the cached prefix
            ctx = make_context(pool, bs, [(end - start, end, blocks)])
            with torch.no_grad():
                got.append(dsa_ref.indexer(x[0, start:end], mod.wq_b(q_resid[0, start:end]), mod.wk(x[0, start:end]),
                                           pos[0, start:end], mod.weights_proj.weight, mod.k_norm.weight,
                                           mod.k_norm.bias, ctx=ctx, **kw).long())
        got = torch.cat(got)
        k = c.index_topk
        for i in range(n):
            mine = set(got[i].tolist()) - {-1}
            assert mine == {t for t in want[i].tolist() if t <= i}, i
            assert len(mine) == min(k, i + 1)


@pytest.mark.parametrize("index_kv", ["auto", "fp8"])
@pytest.mark.parametrize("arch", list(TOPK))
def test_cuda_plan_runs_indexer_and_sparse_mla_on_triton_with_graphs(arch, index_kv, ckpts):
    """A --device cuda plan (compiled here, no GPU needed) runs both DSA ops on the Triton kernels and plans
    decode graphs: nothing in it syncs with the host (the indexer's rope frequencies are cached on the device)."""
    from nanoforge.compiler import CompileOptions, compile_checkpoint

    plan = compile_checkpoint(ckpts[arch], CompileOptions(device="cuda", index_kv_dtype=index_kv))
    assert plan.kv_contract.index_dtype() == ("fp8_e4m3" if index_kv == "fp8" else "f32")
    assert {n.provider for _, n in plan.module.nodes() if n.op in ("indexer", "sparse_mla")} == {"triton"}
    assert plan.cuda_graphs.reason is None and plan.cuda_graphs.sizes
