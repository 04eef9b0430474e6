"""quantize_kv (`compile --kv-dtype fp8`): every attention node says its KV is stored in e4m3 and how
it is scaled (kv_dtype, kv_scale), visibly in the dump; plan_memory then writes a contract whose
pool holds e4m3 values and an f32 scale per token and KV head (GQA) or per token (MLA)."""
from __future__ import annotations

import pytest
from irtext import apply, run

from nanoforge.errors import NanoForgeError
from nanoforge.facts import Target, read
from nanoforge.kv_contract import KVContract, KVLayer
from nanoforge.passes import PASSES, plan_memory
from nanoforge.passes.quantize_kv import Options

from .test_plan_memory import GQA, MLA

FP8 = Options("fp8")
ROUNDTRIP = [("quantize_kv", GQA, FP8), ("quantize_kv", MLA, FP8)]


def test_attention_nodes_say_their_kv_is_fp8_in_the_dump():
    out = run("quantize_kv", GQA, FP8)
    assert 'kind="gqa", layer=0, heads=2, kv_heads=1, head_dim=4, scale=0.5, kv_dtype="fp8_e4m3", ' \
           'kv_scale="per token and kv head"}' in out
    assert 'kv_dtype="fp8_e4m3", kv_scale="per token"}' in run("quantize_kv", MLA, FP8)


def test_auto_changes_nothing():
    module, changes = apply("quantize_kv", GQA, Options("auto"))
    assert changes == 0 and all("kv_dtype" not in n.attrs for _, n in module.nodes())


def test_contract_holds_fp8_values_and_f32_scales():
    gqa, _ = apply("quantize_kv", GQA, FP8)
    PASSES["plan_memory"].run(gqa, plan_memory.Options())
    kv = read(gqa, KVContract)
    assert kv == KVContract(16, "fp8_e4m3", (KVLayer(0, "gqa", ((1, 4), (1, 4)), "model.layers.0.self_attn",
                                                     ((1,), (1,))),), "f32")
    assert kv.bytes_per_token() == 2 * 4 + 2 * 4  # 1 B values, 4 B scales (f32 model: 32 B unquantized)
    mla, _ = apply("quantize_kv", MLA, FP8)
    PASSES["plan_memory"].run(mla, plan_memory.Options(block_size=64))
    kv = read(mla, KVContract)
    assert kv.layers[0].shapes == ((10,),) and kv.layers[0].scale_shapes == ((1,),)
    assert kv.bytes_per_token() == 10 + 4
    assert kv.to_json()["scale_dtype"] == "f32" and KVContract.from_json(kv.to_json()) == kv


def test_fp8_and_model_dtype_contracts_do_not_match():
    plain, _ = apply("plan_memory", GQA, plan_memory.Options())
    fp8, _ = apply("quantize_kv", GQA, FP8)
    PASSES["plan_memory"].run(fp8, plan_memory.Options())
    diff = read(plain, KVContract).mismatches(read(fp8, KVContract))
    assert diff[:2] == ["dtype: 'f32' vs 'fp8_e4m3'", "scale_dtype: None vs 'f32'"]


@pytest.mark.parametrize("flag, target, msg", [
    ("int8", Target(), "--kv-dtype 'int8': choose auto"),
    ("fp8", Target("cuda", capability="sm80"), "--kv-dtype fp8: needs a GPU with FP8 support (sm89 or newer); this one is sm80"),
])
def test_bad_requests_are_one_line_errors(flag, target, msg):
    with pytest.raises(NanoForgeError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        apply("quantize_kv", GQA, Options(flag, target))


def test_index_kv_dtype_needs_an_indexer():
    """--index-kv-dtype fp8 (DSA indexer keys only; tests/test_deepseek_v32.py runs it): one-line errors."""
    for flag, msg in (("fp8", "--index-kv-dtype fp8: TinyForCausalLM has no sparse-attention indexer"),
                      ("e5m2", "--index-kv-dtype 'e5m2': choose auto (as --kv-dtype) or fp8")):
        opts = Options("auto", Target(), flag)
        with pytest.raises(NanoForgeError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            apply("quantize_kv", GQA, opts)
    assert apply("quantize_kv", GQA, Options("auto", Target(), "auto"))[1] == 0


def test_fp8_on_hopper_and_cpu_targets():
    for target in (Target("cuda", capability="sm90"), Target("cpu")):
        assert apply("quantize_kv", GQA, Options("fp8", target))[1] == 1
