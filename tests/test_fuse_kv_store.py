"""passes/fuse_kv_store.py: where rope / qk_norm_rope and a GQA attention both run on Triton, the rope
node writes the new K/V to the pool and the attention skips its store. Off by default (no gain timed
yet on a GPU); with it on: which plans get it, that the rewrite keeps every value (numeric check, Triton in its
interpreter on the CPU), and greedy tokens of a whole tiny model through the fused kernels."""
from __future__ import annotations

import dataclasses
import os
from collections import Counter

import pytest
import torch

from hf_fixtures import random_prompts, tiny_config
from nanoforge import LLM, SamplingParams
from nanoforge.check.numeric import after_pass as numeric_check
from nanoforge.facts import Target
from nanoforge.models import trace_model
from nanoforge.passes import PASSES, PIPELINES, PassContext, PassManager, fuse_kv_store, quantize_kv, select_kernels
from test_ir import config_dict

needs_interp = pytest.mark.skipif(not os.environ.get("TRITON_INTERPRET") and not torch.cuda.is_available(),
                                  reason="runs Triton kernels (interpreter on the CPU)")
pytest.importorskip("triton")
CUDA = Target(device="cuda")


def compiled(arch: str, target: Target = CUDA, kv_dtype: str = "auto", check=None, on: bool = True):
    module = trace_model(config_dict(arch), "f32")
    opts = {"select_kernels": select_kernels.Options(target), "quantize_kv": quantize_kv.Options(kv_dtype, target),
            "fuse_kv_store": fuse_kv_store.Options(on)}
    PassManager(PASSES, PIPELINES["default"], PassContext(options=opts, after_pass=check)).run(module)
    return module


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe", "llama", "deepseek_v3"])
def test_every_gqa_layer_fused_on_triton(arch):
    module = compiled(arch)
    ops = Counter(n.op for _, n in module.nodes())
    attn = [n for _, n in module.nodes() if n.op == "attention"]
    gqa = arch != "deepseek_v3"  # MLA's latent store is its own
    assert ops["qk_rope_store"] == (tiny_config(arch).num_hidden_layers if gqa else 0)
    assert ops["qk_norm_rope"] + ops["rope"] == (0 if gqa else ops["rope"])
    assert all(n.attrs.get("kv_stored", False) == gqa for n in attn)
    fused = [n for _, n in module.nodes() if n.op == "qk_rope_store"]
    assert all(n.provider == "triton" for n in fused)
    assert sorted(n.attrs["layer"] for n in fused) == sorted(n.attrs["layer"] for n in attn if gqa)
    if arch.startswith("qwen3"):  # the per-head norms travel with it
        assert all(set(n.params) == {"q_norm", "k_norm"} and "eps" in n.attrs for n in fused)


@pytest.mark.parametrize("target,kv_dtype", [(Target(device="cpu"), "auto"), (CUDA, "fp8")])
def test_left_alone_off_triton_and_with_fp8_kv(target, kv_dtype):
    """The CPU provider stores beside its own decode copies; FP8 KV quantizes in attention's store."""
    module = compiled("qwen3", target, kv_dtype)
    assert not any(n.op == "qk_rope_store" or n.attrs.get("kv_stored") for _, n in module.nodes())


def test_off_by_default():
    assert fuse_kv_store.Options().enabled is False
    module = trace_model(config_dict("qwen3"), "f32")
    PassManager(PASSES, PIPELINES["default"], PassContext(options={"select_kernels": select_kernels.Options(CUDA)})
                ).run(module)
    assert not any(n.op == "qk_rope_store" for _, n in module.nodes())


@needs_interp
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_numeric_check_holds(arch):
    """--verify-each-pass after the rewrite: every value (q, k and what attention reads from the pool)
    as before it, the Triton kernels run in the interpreter."""
    module = compiled(arch, check=numeric_check)
    assert any(n.op == "qk_rope_store" for _, n in module.nodes())


@pytest.fixture
def triton_attention_on_cpu(monkeypatch):
    """The Triton provider usable on the CPU target for rope and attention (the interpreter runs them)."""
    from nanoforge.codegen import providers as P

    real = P.BY_NAME["triton"]
    ops = frozenset({"rope", "qk_norm_rope", "qk_rope_store", "attention"})
    tri = dataclasses.replace(real, probe=lambda target: None, ops=ops)
    at = P.PROVIDERS.index(real)
    monkeypatch.setitem(P.BY_NAME, "triton", tri)
    P.PROVIDERS[at] = tri
    try:
        yield
    finally:
        P.PROVIDERS[at] = real


@needs_interp
@pytest.mark.timeout(300)
def test_greedy_tokens_through_the_fused_store(tiny_ckpt, triton_attention_on_cpu, monkeypatch):
    """Qwen3 (per-head norms, head dim 80): prompts longer than a step's chunk (mixed steps), one
    sharing a prompt's first block (prefix cache hits), then decode: the fused plan's tokens equal
    the plan's without the pass (llama's plain rope: test_numeric_check_holds)."""
    arch = "qwen3"
    path = tiny_ckpt(arch)
    first = random_prompts(tiny_config(arch).vocab_size, [5, 30], seed=5)
    batches = [first, [first[1][:16] + first[0]]]  # the second run's prompt starts with a cached block
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    opts = dict(progress=False, max_prefill_chunk=16, max_num_batched_tokens=24, block_size=16)
    plain = LLM(path, **opts)
    assert not any(n.op == "qk_rope_store" for _, n in plain.plan.module.nodes())  # off by default
    monkeypatch.setattr(fuse_kv_store, "ENABLED", True)  # as bench/knob_ab.py turns it on
    fused = LLM(path, **opts)
    assert sum(n.op == "qk_rope_store" for _, n in fused.plan.module.nodes()) == tiny_config(arch).num_hidden_layers
    for prompts in batches:
        want = [o.token_ids for o in plain.generate(prompts, greedy)]
        assert [o.token_ids for o in fused.generate(prompts, greedy)] == want
    assert fused.engine.stats()["prefix_cache_hits"] > 0  # the shared block was read, not recomputed


def test_llm_disable_passes(tiny_ckpt, tmp_path):
    """LLM(disable_passes=) skips passes as `compile --disable-pass` does; an unknown name or a plan dir
    (compiled already) is refused, naming it."""
    from nanoforge.compiler import CompileOptions, compile_checkpoint
    from nanoforge.errors import NanoForgeError

    path = tiny_ckpt("llama")
    llm = LLM(path, progress=False, disable_passes=["fuse_elementwise"])
    assert not any(n.op == "add_rms_norm" for _, n in llm.plan.module.nodes())
    with pytest.raises(NanoForgeError, match="fuse_everything"):
        LLM(path, progress=False, disable_passes=["fuse_everything"])
    compile_checkpoint(path, CompileOptions()).save(tmp_path / "plan")
    with pytest.raises(NanoForgeError, match="is a plan"):
        LLM(tmp_path / "plan", progress=False, disable_passes=["fuse_elementwise"])
