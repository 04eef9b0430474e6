"""Block-FP8 checkpoints as DeepSeek-V3 and Kimi-K2 ship them (e4m3 weights, one f32 scale per
128x128 block): kept in FP8 and widened per block on the fly they give HF's greedy tokens on the
same weights dequantized to float32; widened at load (an explicit --dtype) too; every scheme we do
not run is refused by name, and no F8 tensor is ever read without its scales."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fp8_fixtures import (QUANT_CONFIG, dequantize_block_fp8, hf_fp8_model, make_fp8_checkpoint,
                          quantize_block_fp8)
from hf_fixtures import hf_greedy, random_prompts
from nanoforge import LLM, SamplingParams
from nanoforge.cli import main
from nanoforge.errors import NanoForgeError

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    root, made = tmp_path_factory.mktemp("fp8"), {}

    def get(name: str):
        if name not in made:
            made[name] = make_fp8_checkpoint(name, root / name)
        return made[name]

    return get


@pytest.mark.parametrize("name", ["deepseek_v3", "kimi_k2"])
def test_fp8_weights_give_hf_greedy_tokens(fp8_ckpt, name):
    ckpt = fp8_ckpt(name)
    hf = hf_fp8_model(ckpt)
    llm = LLM(ckpt, progress=False)
    m = llm.plan.module
    w = m.params["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"]  # 80 rows: one partial block
    assert (w.type.dtype, w.quant) == ("fp8_e4m3", "fp8_e4m3:128x128")
    assert m.params[f"{w.name}_scale_inv"].type.shape == (1, 2)
    assert m.params["model.layers.1.mlp.experts.gate_proj"].type.dtype == "fp8_e4m3"
    assert m.params["lm_head.weight"].type.dtype == "f32" and m.params["model.embed_tokens.weight"].quant is None
    fp8_linears = [n for _, n in m.nodes() if n.op == "linear" and "weight_scale_inv" in n.params]
    assert fp8_linears and all(n.attrs["fp8_block"] == [128, 128] for n in fp8_linears)
    prompts = random_prompts(1000, [5, 17, 40], seed=3)
    outs = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(hf, prompt, 12), f"{name}: prompt of {len(prompt)} tokens"


def test_explicit_dtype_widens_fp8_at_load_with_the_same_tokens(fp8_ckpt):
    ckpt = fp8_ckpt("deepseek_v3")
    kept, widened = LLM(ckpt, progress=False), LLM(ckpt, dtype="f32", progress=False)
    w = widened.plan.module.params["model.layers.0.mlp.gate_proj.weight"]
    assert (w.type.dtype, w.quant) == ("f32", "dequant:128x128")
    assert not any(p.type.dtype == "fp8_e4m3" for p in widened.plan.module.params.values())
    prompts = random_prompts(1000, [9, 30], seed=4)
    assert [o.token_ids for o in widened.generate(prompts, GREEDY)] == \
           [o.token_ids for o in kept.generate(prompts, GREEDY)]


def test_kimi_architecture_name_runs_the_same_model(fp8_ckpt, tmp_path):
    src = fp8_ckpt("kimi_k2")
    ckpt = shutil.copytree(src, tmp_path / "kimi")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(architectures=["KimiK2ForCausalLM"], model_type="kimi_k2")
    (ckpt / "config.json").write_text(json.dumps(cfg))
    prompt = random_prompts(1000, [11], seed=5)
    assert LLM(ckpt, progress=False).generate(prompt, GREEDY)[0].token_ids == \
        LLM(src, progress=False).generate(prompt, GREEDY)[0].token_ids


def test_quantize_fp8_on_a_plain_checkpoint(tiny_ckpt):
    """--quantize fp8 block-quantizes a bf16/f32 checkpoint at load: FP8 params, and logits within
    the rounding of e4m3 (3 mantissa bits) of the unquantized model's."""
    ckpt = tiny_ckpt("qwen3")
    plain, fp8 = LLM(ckpt, progress=False), LLM(ckpt, quantize="fp8", progress=False)
    assert fp8.plan.module.params["model.layers.0.mlp.down_proj.weight"].type.dtype == "fp8_e4m3"
    assert fp8.plan.module.params["lm_head.weight"].type.dtype == "f32"
    prompts = random_prompts(1001, [7, 20], seed=6)
    a, b = plain.last_logits(prompts), fp8.last_logits(prompts)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cos.min() > 0.99, cos
    assert not torch.equal(a, b)


def test_fp8_experts_on_simulated_expert_parallel_ranks(fp8_ckpt):
    """attention-DP 2 x FFN-EP 2 (all-gather exchange): each rank holds half the FP8 experts and their
    scales; the ranks' logits equal one rank's."""
    from nanoforge.check.simulate import run_ranks_dp
    from nanoforge.compiler import CompileOptions, compile_checkpoint
    from nanoforge.models.checkpoint import open_checkpoint

    ckpt = fp8_ckpt("deepseek_v3")
    ck = open_checkpoint(ckpt)
    one = compile_checkpoint(ckpt, CompileOptions()).module
    two = compile_checkpoint(ckpt, CompileOptions(attention_dp=2, ffn_ep=2, verify_each_pass=True)).module
    scale = two.params["model.layers.1.mlp.experts.up_proj_scale_inv"]
    assert scale.shard == "d0:2@ep" and scale.type.shape == (4, 2, 2)
    prompts = random_prompts(1000, [6, 3, 9], seed=7)
    want, got = run_ranks_dp(one, ck, prompts), run_ranks_dp(two, ck, prompts)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_inspect_shows_the_quantization(fp8_ckpt, tmp_path, capsys):
    plan = tmp_path / "plan"
    assert main(["compile", str(fp8_ckpt("deepseek_v3")), "-o", str(plan), "-q"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(plan)]) == 0
    out = capsys.readouterr().out
    assert "quantized    block-FP8 weights 128x128 x" in out and "FP8 tensors widened at load 128x128 x" in out


# -- what is refused ------------------------------------------------------------------------------
def _with_config(src, dst, **changes):
    ckpt = shutil.copytree(src, dst)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(changes)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    return ckpt


def _compile_fails(capsys, ckpt, out, *needles):
    assert main(["compile", str(ckpt), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for n in needles:
        assert n in err, err
    assert not out.exists()


@pytest.mark.parametrize("qc, needle", [
    ({"quant_method": "awq", "bits": 4}, "quant_method 'awq' is not supported"),
    ({"quant_method": "gptq", "bits": 4}, "quant_method 'gptq' is not supported"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized"}, "quant_method 'compressed-tensors'"),
    ({"quant_method": "mxfp4"}, "quant_method 'mxfp4' is not supported"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "fp8 without weight_block_size"),
    ({**QUANT_CONFIG, "weight_block_size": [64, 64]}, "weight_block_size [64, 64] is not supported"),
])
def test_unsupported_quantization_is_named(fp8_ckpt, tmp_path, capsys, qc, needle):
    ckpt = _with_config(fp8_ckpt("deepseek_v3"), tmp_path / "ck", quantization_config=qc)
    _compile_fails(capsys, ckpt, tmp_path / "plan", needle, "supported: fp8 with weight_block_size [128, 128]")


def test_f8_tensors_without_a_quantization_config_are_refused(fp8_ckpt, tmp_path, capsys):
    """Never again a silent cast of F8 values to bf16 with their scales ignored."""
    ckpt = _with_config(fp8_ckpt("deepseek_v3"), tmp_path / "ck", quantization_config=None)
    _compile_fails(capsys, ckpt, tmp_path / "plan", "is stored as F8_E4M3", "no quantization_config")


@pytest.mark.parametrize("change, needle", [
    ("drop", "has no tensor 'model.layers.0.self_attn.q_b_proj.weight_scale_inv'"),
    ("reshape", "tensor 'model.layers.0.self_attn.q_b_proj.weight_scale_inv' in model.safetensors is F32 [1, 1]"),
])
def test_missing_or_mis_shaped_scales_name_the_tensor(fp8_ckpt, tmp_path, capsys, change, needle):
    ckpt = shutil.copytree(fp8_ckpt("deepseek_v3"), tmp_path / "ck")
    tensors = load_file(ckpt / "model.safetensors")
    key = "model.layers.0.self_attn.q_b_proj.weight_scale_inv"  # q_b_proj is [192, 136]: 2 x 2 blocks
    if change == "drop":
        del tensors[key]
    else:
        tensors[key] = tensors[key][:1, :1].contiguous()
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    _compile_fails(capsys, ckpt, tmp_path / "plan", needle)


def test_tp_with_fp8_weights_is_refused_not_wrong(fp8_ckpt):
    with pytest.raises(NanoForgeError, match="--tp 2 with block-FP8 weights .* is not built yet"):
        LLM(fp8_ckpt("deepseek_v3"), tp=2, progress=False)


def test_w8a8_plans_quantize_activations_as_the_fp8_gemm_does(fp8_ckpt):
    """--fp8-activations dynamic (the default on CUDA): FP8 linears carry act_quant=128 and the
    torch provider runs the same W8A8 math as triton/fp8_gemm.py's reference; logits stay within
    e4m3 rounding of the weight-only path."""
    from nanoforge.kernels import torch_ref

    ckpt = fp8_ckpt("deepseek_v3")
    w8a8, w8 = LLM(ckpt, fp8_activations="dynamic", progress=False), LLM(ckpt, progress=False)
    linears = [n for _, n in w8a8.plan.module.nodes() if n.op == "linear" and "weight_scale_inv" in n.params]
    assert linears and all(n.attrs["act_quant"] == 128 for n in linears)
    assert not any("act_quant" in n.attrs for _, n in w8.plan.module.nodes())
    g = torch.Generator().manual_seed(8)
    x, w = torch.randn(7, 300, generator=g), torch.randn(200, 300, generator=g) / 17
    q, s = quantize_block_fp8(w)  # the fixture's quantizer, not nanoforge's
    xd = torch.empty_like(x)  # each token's 128-column groups through e4m3 at amax / 448, written out here
    for r in range(x.shape[0]):
        for c in range(0, x.shape[1], 128):
            scale = x[r, c:c + 128].abs().max() / 448.0
            xd[r, c:c + 128] = (x[r, c:c + 128] / scale).to(torch.float8_e4m3fn).float() * scale
    want = xd @ dequantize_block_fp8(q, s).T
    torch.testing.assert_close(torch_ref.linear(x, q, None, s, [128, 128], act_quant=128), want)
    prompts = random_prompts(1000, [9, 21], seed=9)
    a, b = w8a8.last_logits(prompts), w8.last_logits(prompts)
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.98 and not torch.equal(a, b)


def test_w8a8_experts_reference_math():
    """torch_ref's W8A8 expert (act_quant): x and silu(g) * u each rounded to e4m3 per token and 128
    columns with scale amax / 448, the block-FP8 weights widened; written out here from the format."""
    import torch.nn.functional as F

    from nanoforge.kernels import fp8, torch_ref

    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(3, 200, generator=g), [torch.randn(*s, generator=g) * 0.1 for s in ((1, 72, 200),) * 2 + ((1, 200, 72),)]
    q = [fp8.quantize(t, (128, 128)) for t in w]

    def qdq(t):  # per token, per 128 columns (the last group is the 72-column tail)
        out = torch.empty_like(t)
        for c in range(0, t.shape[1], 128):
            blk = t[:, c:c + 128]
            s = blk.abs().amax(1, keepdim=True) / 448
            out[:, c:c + 128] = (blk / s).to(torch.float8_e4m3fn).float() * s
        return out

    wide = [fp8.dequantize(v, s, (128, 128))[0] for v, s in q]
    want = F.linear(qdq(F.silu(F.linear(qdq(x), wide[0])) * F.linear(qdq(x), wide[1])), wide[2])
    attrs = {f"{k}_scale_inv": s for k, (_, s) in zip(("w_gate", "w_up", "w_down"), q)}
    got = torch_ref.grouped_experts(x, torch.ones(3, 1), torch.zeros(3, 1, dtype=torch.long), *(v for v, _ in q),
                                    fp8_block=[128, 128], act_quant=128, **attrs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
