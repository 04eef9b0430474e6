"""plan_memory: the KV contract (`meta kv_contract`: per attention layer, one token's entry in each
pool tensor, in the model's dtype) and the MemoryPlan (`meta memory`): weight bytes, KV bytes per
token, peak activation bytes per token (values with the T dim alive at once) and the step size.

    gqa  ->  K and V: shapes [[kv_heads, head_dim], [kv_heads, head_dim]]
    mla  ->  the latent with the rope key: [[kv_lora_rank + qk_rope_head_dim]]
"""
from __future__ import annotations

import pytest
from irtext import MODEL, apply, ir, run

from nanoforge.errors import NanoForgeError
from nanoforge.facts import MemoryPlan, read
from nanoforge.ir.printer import format_module
from nanoforge.kv_contract import KVContract, KVLayer
from nanoforge.passes.plan_memory import Options

# params: 4 B x (64 + 32) = 384; KV: 4 B x (1x4 + 1x4) = 32 a token;
# activations: %0, %1 and %2 alive at the attention, 4 B x (8 + 4 + 8) = 80 a token
GQA = f"""
    module
    {MODEL}
    param $q.weight: f32[8,8] <- q.weight
    param $kv.weight: f32[4,8] <- kv.weight

    func forward(%x: f32[T,8]) {{
      %0: f32[T,8] = linear(%x, weight=$q.weight)  @model.layers.0.self_attn.q_proj
      %1: f32[T,4] = linear(%x, weight=$kv.weight)  @model.layers.0.self_attn.kv_proj
      %2: f32[T,8] = attention(%0, %1, %1) {{kind="gqa", layer=0, heads=2, kv_heads=1, head_dim=4, scale=0.5}}  @model.layers.0.self_attn
      return %2
    }}
"""

MLA = f"""
    module
    {MODEL.replace('"f32"', '"bf16"')}
    param $q.weight: bf16[12,8] <- q.weight
    param $kv_a.weight: bf16[10,8] <- kv_a.weight
    param $kv_b.weight: bf16[16,8] <- kv_b.weight

    func forward(%x: bf16[T,8]) {{
      %0: bf16[T,12] = linear(%x, weight=$q.weight)  @model.layers.0.self_attn.q_proj
      %1: bf16[T,10] = linear(%x, weight=$kv_a.weight)  @model.layers.0.self_attn.kv_a_proj
      %2: bf16[T,8], %3: bf16[T,2] = split(%1) {{sizes=[8, 2]}}  @model.layers.0.self_attn
      %4: bf16[T,8] = attention(%0, %2, %3, kv_b_proj=$kv_b.weight) {{kind="mla", layer=0, heads=2, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=4, kv_lora_rank=8, scale=0.4}}  @model.layers.0.self_attn
      return %4
    }}
"""

ROUNDTRIP = [("plan_memory", GQA, Options()), ("plan_memory", MLA, Options(block_size=64))]


def test_gqa_contract_and_memory_facts():
    assert run("plan_memory", GQA, Options()) == ir(f"""
        module
        meta kv_contract = {{"block_size": 16, "dtype": "f32", "layers": [{{"kind": "gqa", "layer": 0, "shapes": [[1, 4], [1, 4]], "source": "model.layers.0.self_attn"}}]}}
        meta memory = {{"activation_bytes_per_token": 80, "kv_bytes_per_token": 32, "max_num_batched_tokens": 2048, "param_bytes": 384}}
        {MODEL}
        param $q.weight: f32[8,8] <- q.weight
        param $kv.weight: f32[4,8] <- kv.weight

        func forward(%x: f32[T,8]) {{
          %0: f32[T,8] = linear(%x, weight=$q.weight)  @model.layers.0.self_attn.q_proj
          %1: f32[T,4] = linear(%x, weight=$kv.weight)  @model.layers.0.self_attn.kv_proj
          %2: f32[T,8] = attention(%0, %1, %1) {{kind="gqa", layer=0, heads=2, kv_heads=1, head_dim=4, scale=0.5}}  @model.layers.0.self_attn
          return %2
        }}
    """)


def test_gqa_facts_typed():
    module, changes = apply("plan_memory", GQA, Options(block_size=32, max_num_batched_tokens=512))
    assert changes == 1  # attention layers
    assert read(module, KVContract) == KVContract(32, "f32", (KVLayer(0, "gqa", ((1, 4), (1, 4)), "model.layers.0.self_attn"),))
    assert read(module, MemoryPlan) == MemoryPlan(param_bytes=384, kv_bytes_per_token=32,
                                                  activation_bytes_per_token=80, max_num_batched_tokens=512)


def test_mla_caches_the_latent_and_rope_key_in_the_model_dtype():
    """bf16: KV is 2 B x (8 + 2) = 20 a token."""
    module, _ = apply("plan_memory", MLA, Options(block_size=64))
    kv = read(module, KVContract)
    assert kv == KVContract(64, "bf16", (KVLayer(0, "mla", ((10,),), "model.layers.0.self_attn"),))
    assert kv.bytes_per_token() == read(module, MemoryPlan).kv_bytes_per_token == 20
    assert 'meta kv_contract = {"block_size": 64, "dtype": "bf16", "layers": [{"kind": "mla", "layer": 0, ' \
           '"shapes": [[10]], "source": "model.layers.0.self_attn"}]}\n' in format_module(module)


def test_layers_are_listed_by_their_layer_attr_not_node_order():
    text = f"""
        module
        {MODEL}

        func forward(%q: f32[T,8], %k: f32[T,8], %k1: f32[T,4]) {{
          %0: f32[T,8] = attention(%q, %k1, %k1) {{kind="gqa", layer=1, heads=2, kv_heads=1, head_dim=4, scale=0.5}}  @model.layers.1.self_attn
          %1: f32[T,8] = attention(%0, %k, %k) {{kind="gqa", layer=0, heads=2, kv_heads=2, head_dim=4, scale=0.5}}  @model.layers.0.self_attn
          return %1
        }}
    """
    module, changes = apply("plan_memory", text, Options())
    assert changes == 2
    kv = read(module, KVContract)
    assert [(layer.layer, layer.shapes) for layer in kv.layers] == [(0, ((2, 4), (2, 4))), (1, ((1, 4), (1, 4)))]
    assert kv.bytes_per_token() == 4 * (16 + 8)
    assert read(module, MemoryPlan).param_bytes == 0


def test_no_attention_no_kv():
    text = f"""
        module
        {MODEL}
        param $w.weight: f32[8,8] <- w.weight

        func forward(%x: f32[T,8]) {{
          %0: f32[T,8] = linear(%x, weight=$w.weight)  @proj
          return %0
        }}
    """
    module, changes = apply("plan_memory", text, Options())
    assert changes == 0
    assert read(module, KVContract).layers == ()
    assert read(module, MemoryPlan) == MemoryPlan(256, 0, 32, 2048)


def test_activation_peak_frees_a_value_after_its_last_reader():
    """%0 dies at %1, so the peak is %0 + %1 (64 B), not %0 + %1 + %2 (96 B)."""
    text = f"""
        module
        {MODEL}

        func forward(%x: f32[T,8]) {{
          %0: f32[T,8] = silu(%x)  @a
          %1: f32[T,8] = silu(%0)  @b
          %2: f32[T,8] = silu(%1)  @c
          return %2
        }}
    """
    module, _ = apply("plan_memory", text, Options())
    assert read(module, MemoryPlan).activation_bytes_per_token == 64


def test_only_values_on_the_token_dim_count_as_activations():
    """Surprising for expert parallelism: the Tg rows a rank's experts receive (moe_dispatch,
    grouped_experts) are not counted, nor are function inputs; only %0 (32 B a token) is."""
    text = f"""
        module
        {MODEL}
        param $router.weight: f32[4,8] <- router.weight
        param $experts.w_gate: f32[2,16,8] <- stack(experts.{{0..3}}.gate.weight) shard=d0:2@ep
        param $experts.w_up: f32[2,16,8] <- stack(experts.{{0..3}}.up.weight) shard=d0:2@ep
        param $experts.w_down: f32[2,8,16] <- stack(experts.{{0..3}}.down.weight) shard=d0:2@ep

        func forward(%x: f32[T,8]) {{
          %1: f32[Tg,8], %2: f32[Tg,2], %3: i64[Tg,2], %4: i64[P] = moe_dispatch(%x, router=$router.weight) {{num_experts=4, top_k=2, scoring="softmax", group="ep"}}  @mlp
          %5: f32[Tg,8] = grouped_experts(%1, %2, %3, w_gate=$experts.w_gate, w_up=$experts.w_up, w_down=$experts.w_down) {{num_experts=4, group="ep"}}  @mlp
          %0: f32[T,8] = moe_combine(%5, %4) {{group="ep"}}  @mlp
          return %0
        }}
    """
    module, _ = apply("plan_memory", text, Options())
    assert read(module, MemoryPlan).activation_bytes_per_token == 32


@pytest.mark.parametrize("block_size", [0, -16])
def test_block_size_must_be_positive(block_size):
    with pytest.raises(NanoForgeError) as e:
        apply("plan_memory", GQA, Options(block_size=block_size))
    assert str(e.value) == f"--block-size {block_size}: must be at least 1"


def test_needs_the_model_fact_for_the_kv_dtype():
    with pytest.raises(NanoForgeError, match="the module has no model"):
        apply("plan_memory", GQA.replace(MODEL, ""), Options())
