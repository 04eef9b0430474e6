"""IR text form: print -> parse -> print is identical for every architecture after every pass;
the parser and verifier reject broken IR with the line / node named."""
from __future__ import annotations

import pytest

from hf_fixtures import ARCHS, tiny_config
from nanoforge.errors import NanoForgeError
from nanoforge.ir.graph import TensorType
from nanoforge.ir.parser import parse_module
from nanoforge.ir.printer import compress_keys, expand_keys, format_module
from nanoforge.ir.verifier import verify_module
from nanoforge.models import trace_model
from nanoforge.passes import PASSES, PIPELINES, PassContext, PassManager


def config_dict(arch: str) -> dict:
    cfg = tiny_config(arch)
    d = cfg.to_dict()
    d["architectures"] = [{"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                           "deepseek_v3": "DeepseekV3ForCausalLM", "llama": "LlamaForCausalLM"}[arch]]
    return d


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_after_every_pass(arch, tmp_path):
    module = trace_model(config_dict(arch), "f32")
    PassManager(PASSES, PIPELINES["default"], PassContext(dump_dir=tmp_path)).run(module)
    dumps = sorted(tmp_path.glob("*.ir"))
    assert [d.name for d in dumps] == [f"{i:02d}_{n}.ir" for i, n in enumerate(["input"] + PIPELINES["default"])]
    for dump in dumps:
        text = dump.read_text()
        parsed = parse_module(text)
        verify_module(parsed)
        assert format_module(parsed) == text, dump.name


def test_stacked_keys_compress_and_expand():
    keys = [f"model.layers.1.mlp.experts.{i}.up_proj.weight" for i in range(6)]
    text = compress_keys(keys)
    assert text == "model.layers.1.mlp.experts.{0..5}.up_proj.weight"
    assert expand_keys(text) == keys
    odd = ["a.weight", "b.weight"]
    assert expand_keys(compress_keys(odd)) == odd


def test_every_node_has_its_hf_source():
    module = trace_model(config_dict("deepseek_v3"), "f32")
    sources = {n.source for _, n in module.nodes()}
    assert "" not in sources
    assert "model.layers.1.self_attn" in sources and "model.layers.1.mlp" in sources
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa" in sources


def test_parse_error_names_the_line():
    text = format_module(trace_model(config_dict("llama"), "f32"))
    lines = text.splitlines()
    bad = next(i for i, line in enumerate(lines) if "= linear(" in line)
    lines[bad] = lines[bad].replace("linear(%", "linear(%999")
    with pytest.raises(NanoForgeError, match=rf"IR line {bad + 1}: %999\d* used before it is defined"):
        parse_module("\n".join(lines))


def test_verifier_catches_wrong_shape_and_names_source():
    module = trace_model(config_dict("qwen3"), "f32")
    node = next(n for _, n in module.nodes() if n.source == "model.layers.1.mlp.up_proj")
    node.outputs[0].type = TensorType("f32", ("T", 7))
    with pytest.raises(NanoForgeError, match=r"inferred .*model\.layers\.1\.mlp\.up_proj"):
        verify_module(module)


def test_verifier_catches_unknown_param():
    module = trace_model(config_dict("qwen3"), "f32")
    node = next(n for _, n in module.nodes() if n.op == "linear")
    node.params["weight"] = "no.such.weight"
    with pytest.raises(NanoForgeError, match=r"unknown param \$no\.such\.weight"):
        verify_module(module)
