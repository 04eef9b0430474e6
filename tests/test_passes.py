"""Pass manager and passes: fusion counts, dumps and index, --disable-pass, --verify-each-pass on
every architecture, and a deliberately broken pass caught at the right HF module."""
from __future__ import annotations

from collections import Counter

import pytest

from hf_fixtures import ARCHS, moe_layers, tiny_config
from nanoforge.check.numeric import after_pass as numeric_check
from nanoforge.errors import NanoForgeError
from nanoforge.facts import MemoryPlan, read
from nanoforge.kv_contract import KVContract
from nanoforge.ir.graph import Module
from nanoforge.models import trace_model
from nanoforge.passes import PASSES, PIPELINES, Pass, PassContext, PassManager
from test_ir import config_dict


def run_pipeline(module: Module, **ctx) -> PassManager:
    pm = PassManager(PASSES, PIPELINES["default"], PassContext(**ctx))
    pm.run(module)
    return pm


@pytest.mark.parametrize("arch", ARCHS)
def test_verify_each_pass_holds(arch):
    module = trace_model(config_dict(arch), "f32")
    pm = run_pipeline(module, after_pass=numeric_check)
    assert [r.name for r in pm.records] == PIPELINES["default"]


@pytest.mark.parametrize("arch", ARCHS)
def test_fusion_counts(arch):
    cfg = tiny_config(arch)
    layers = cfg.num_hidden_layers
    module = trace_model(config_dict(arch), "f32")
    run_pipeline(module)
    ops = Counter(n.op for _, n in module.nodes())
    # every norm but the first layer's input norm follows a residual add
    assert ops["add_rms_norm"] == 2 * layers and ops["rms_norm"] == (1 if arch != "deepseek_v3" else 1 + 2 * layers)
    shared = len(moe_layers(arch)) if arch == "deepseek_v3" else 0
    assert ops["silu_mul"] == layers - len(moe_layers(arch)) + shared
    assert ops["qk_norm_rope"] == (layers if arch.startswith("qwen3") else 0)
    assert ops["silu"] == ops["mul"] == 0
    assert ops["moe"] == len(moe_layers(arch))


def test_dump_index_and_disable(tmp_path):
    module = trace_model(config_dict("qwen3"), "f32")
    run_pipeline(module, dump_dir=tmp_path, disabled={"fuse_elementwise"})
    index = (tmp_path / "index.txt").read_text()
    assert "fuse_elementwise" in index and "skipped" in index
    names = PIPELINES["default"]
    assert not (tmp_path / f"{names.index('fuse_elementwise') + 1:02d}_fuse_elementwise.ir").exists()
    assert "add_rms_norm" not in (tmp_path / f"{len(names):02d}_plan_memory.ir").read_text()


@pytest.mark.parametrize("arch", ARCHS)
def test_fuse_projections_one_gemm_per_input(arch):
    """q/k/v (or DeepSeek's q_a/kv_a) and gate/up of every dense MLP read one input through one
    cat param over the original checkpoint keys; the originals are gone from the params."""
    cfg = tiny_config(arch)
    module = trace_model(config_dict(arch), "f32")
    linears_before = sum(n.op == "linear" for _, n in module.nodes())
    run_pipeline(module)
    fused = {n: p for n, p in module.params.items() if p.layout == "cat"}
    layer0 = [p for n, p in fused.items() if n.startswith("model.layers.0.")]
    if arch == "deepseek_v3":
        assert {p.name for p in layer0} == {"model.layers.0.self_attn.q_a_proj_and_kv_a_proj_with_mqa.weight",
                                             "model.layers.0.mlp.gate_up_proj.weight"}
    else:
        assert {p.name for p in layer0} == {"model.layers.0.self_attn.q_k_v_proj.weight",
                                             "model.layers.0.mlp.gate_up_proj.weight"}
        qkv = module.params["model.layers.0.self_attn.q_k_v_proj.weight"]
        assert qkv.keys == [f"model.layers.0.self_attn.{x}_proj.weight" for x in "qkv"]
        head = cfg.head_dim if hasattr(cfg, "head_dim") and cfg.head_dim else cfg.hidden_size // cfg.num_attention_heads
        assert qkv.type.shape[0] == head * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    assert not any(k.endswith(".q_proj.weight") or k.endswith(".up_proj.weight") for k in module.params
                   if module.params[k].layout == "single")
    assert sum(n.op == "linear" for _, n in module.nodes()) < linears_before


def test_unknown_pass_is_named():
    with pytest.raises(NanoForgeError, match="unknown pass 'fuse_everything'"):
        PassManager(PASSES, PIPELINES["default"], PassContext(disabled={"fuse_everything"}))


def _break_layer1_mlp(module: Module, opts) -> int:
    """Test-only 'fusion' with a bug: swaps gate and up of one layer's silu_mul."""
    for _, node in module.nodes():
        if node.op == "silu_mul" and node.source == "model.layers.1.mlp":
            node.inputs.reverse()
            return 1
    return 0


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_broken_pass_is_caught_at_its_hf_module(arch):
    passes = dict(PASSES, break_mlp=Pass("break_mlp", _break_layer1_mlp, "test-only bug"))
    at = PIPELINES["default"].index("fuse_elementwise") + 1
    pipeline = PIPELINES["default"][:at] + ["break_mlp"] + PIPELINES["default"][at:]
    module = trace_model(config_dict(arch), "f32")
    with pytest.raises(NanoForgeError, match=r"pass break_mlp changed the numerics .* at model\.layers\.1\.mlp "):
        PassManager(passes, pipeline, PassContext(after_pass=numeric_check)).run(module)


def test_broken_pass_changing_attrs_is_caught():
    def bad_eps(module: Module, opts) -> int:
        node = next(n for _, n in module.nodes() if n.source == "model.layers.2.post_attention_layernorm")
        node.attrs["eps"] = 0.5
        return 1

    passes = dict(PASSES, bad_eps=Pass("bad_eps", bad_eps, "test-only bug"))
    module = trace_model(config_dict("qwen3_moe"), "f32")
    with pytest.raises(NanoForgeError, match=r"model\.layers\.2\.post_attention_layernorm"):
        PassManager(passes, ["verify", "fuse_elementwise", "bad_eps"], PassContext(after_pass=numeric_check)).run(module)


def test_pass_producing_invalid_ir_is_named():
    def drop_node(module: Module, opts) -> int:
        module.functions["forward"].nodes.pop(3)
        return 1

    passes = dict(PASSES, drop=Pass("drop", drop_node, "test-only bug"))
    module = trace_model(config_dict("llama"), "f32")
    with pytest.raises(NanoForgeError, match="pass drop produced invalid IR"):
        PassManager(passes, ["verify", "drop"], PassContext()).run(module)


def test_plan_memory_kv_contract():
    module = trace_model(config_dict("deepseek_v3"), "bf16")
    run_pipeline(module)
    kv = read(module, KVContract)
    cfg = tiny_config("deepseek_v3")
    assert [layer.layer for layer in kv.layers] == list(range(cfg.num_hidden_layers))
    assert kv.layers[0].shapes == ((cfg.kv_lora_rank + cfg.qk_rope_head_dim,),)
    assert read(module, MemoryPlan).kv_bytes_per_token == 2 * cfg.num_hidden_layers * (
        cfg.kv_lora_rank + cfg.qk_rope_head_dim)


@pytest.mark.parametrize("arch", ["qwen3_moe", "llama"])
def test_param_bytes_match_hf_parameter_count(arch):
    import transformers

    module = trace_model(config_dict(arch), "bf16")
    run_pipeline(module)
    hf = transformers.AutoModelForCausalLM.from_config(tiny_config(arch))
    assert read(module, MemoryPlan).param_bytes == 2 * sum(p.numel() for p in hf.parameters())
