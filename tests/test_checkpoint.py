"""Checkpoint opening and reading: safetensors dirs against the tensors written, GGUF against what
transformers itself builds from the same file (config and every dequantized, unpermuted weight)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from nanoforge.errors import NanoForgeError
from nanoforge.models.checkpoint import fingerprint_mismatches, open_checkpoint

SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


# --- a tiny sharded safetensors checkpoint ---------------------------------------------------------

def _tensors(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    one = {"model.embed_tokens.weight": torch.randn(32, 16, generator=g, dtype=torch.float32).to(torch.bfloat16),
           "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g),
           "model.layers.0.input_layernorm.weight": torch.randn(16, generator=g).to(torch.float16)}
    two = {"model.layers.0.mlp.down_proj.weight": torch.randn(16, 24, generator=g).to(torch.bfloat16),
           "model.norm.weight": torch.randn(16, generator=g),
           "model.positions": torch.arange(7, dtype=torch.int64)}
    return one, two


def _write_dir(d: Path, seed: int = 0, sharded: bool = True) -> dict[str, torch.Tensor]:
    d.mkdir(parents=True, exist_ok=True)
    one, two = _tensors(seed)
    if sharded:
        save_file(one, str(d / SHARD1))
        save_file(two, str(d / SHARD2))
        wm = {**{k: SHARD1 for k in one}, **{k: SHARD2 for k in two}}
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    else:
        save_file({**one, **two}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 16}))
    return {**one, **two}


@pytest.fixture
def tiny(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    d = tmp_path / "ckpt"
    return d, _write_dir(d)


def test_sharded_headers_and_values(tiny):
    d, saved = tiny
    ck = open_checkpoint(d)
    assert ck.kind == "hf" and ck.config["hidden_size"] == 16
    assert set(ck.tensors) == set(saved)
    st_names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}
    one, _ = _tensors()
    for k, t in saved.items():
        info = ck.tensors[k]
        assert info.shape == tuple(t.shape) and info.dtype == st_names[t.dtype]
        assert info.file == (SHARD1 if k in one else SHARD2)
    got = dict(ck.read(sorted(saved), progress=False))
    assert set(got) == set(saved)
    for k, t in saved.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
    cast = dict(ck.read(["model.embed_tokens.weight"], dtype=torch.float32, progress=False))
    assert torch.equal(cast["model.embed_tokens.weight"], saved["model.embed_tokens.weight"].float())


def test_read_opens_each_file_once(tiny, monkeypatch):
    import safetensors
    d, saved = tiny
    ck = open_checkpoint(d)
    opened = []
    real = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda p, **kw: (opened.append(Path(p).name), real(p, **kw))[1])
    keys = sorted(saved)  # alternates between the shards
    assert [k for k, _ in ck.read(keys, progress=False)] != []
    assert sorted(opened) == [SHARD1, SHARD2]


def test_single_file_without_index(tmp_path):
    saved = _write_dir(tmp_path, sharded=False)
    ck = open_checkpoint(tmp_path)
    assert {i.file for i in ck.tensors.values()} == {"model.safetensors"}
    got = dict(ck.read(list(saved), progress=False))
    assert all(torch.equal(got[k], t) for k, t in saved.items())


def test_fingerprint_stable_and_sensitive(tiny):
    d, _ = tiny
    fp = open_checkpoint(d).fingerprint()
    assert json.loads(json.dumps(fp)) == fp  # data only
    assert {f["name"] for f in fp["files"]} == {"config.json", SHARD1, SHARD2}
    assert fp == open_checkpoint(d).fingerprint()
    assert fingerprint_mismatches(fp, fp) == []

    _, two = _tensors(seed=1)
    two["model.norm.weight"] = torch.randn(20)  # a changed shard: other shape, so other size and header
    save_file(two, str(d / SHARD2))
    lines = fingerprint_mismatches(fp, open_checkpoint(d).fingerprint())
    assert len(lines) == 1 and lines[0].startswith(SHARD2 + ": size") and "!=" in lines[0]

    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 32}))
    lines = fingerprint_mismatches(fp, open_checkpoint(d).fingerprint())
    assert any(line.startswith("config.json:") for line in lines)
    gone = {**fp, "files": [f for f in fp["files"] if f["name"] != SHARD1]}
    assert fingerprint_mismatches(fp, gone) == [f"{SHARD1}: missing"]


def test_config_only_needs_no_weights(tiny):
    d, _ = tiny
    for p in d.glob("*.safetensors"):
        p.unlink()
    ck = open_checkpoint(d, config_only=True)
    assert ck.tensors == {} and ck.config["architectures"] == ["LlamaForCausalLM"]
    with pytest.raises(NanoForgeError, match=SHARD1):
        open_checkpoint(d)


def test_generation_config(tiny):
    d, _ = tiny
    assert open_checkpoint(d).generation_config() == {}
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    assert open_checkpoint(d).generation_config() == {"eos_token_id": [2, 3]}


# --- errors name the culprit -------------------------------------------------------------------

def _error(path, **kw) -> str:
    with pytest.raises(NanoForgeError) as e:
        open_checkpoint(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_and_bad_config(tiny, tmp_path):
    d, _ = tiny
    assert "nowhere" in _error(tmp_path / "nowhere")
    (d / "config.json").unlink()
    msg = _error(d)
    assert "config.json not found" in msg and str(d) in msg
    (d / "config.json").write_text("{not json")
    assert "config.json" in _error(d, config_only=True)


def test_index_naming_missing_shard(tiny):
    d, _ = tiny
    (d / SHARD2).unlink()
    assert SHARD2 in _error(d)


def test_index_disagreeing_with_shard(tiny):
    d, _ = tiny
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.norm.weight"] = SHARD1
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    assert "model.norm.weight" in _error(d)


def test_truncated_safetensors(tiny):
    d, _ = tiny
    p = d / SHARD2
    data = p.read_bytes()
    p.write_bytes(data[:-10])
    msg = _error(d)
    assert f"{SHARD2} is truncated" in msg and f"the file has {len(data) - 10} bytes" in msg
    p.write_bytes(data[:5])
    assert SHARD2 in _error(d)


def test_bad_headers(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    p = tmp_path / "model.safetensors"
    p.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    assert "model.safetensors" in _error(tmp_path) and "header length" in _error(tmp_path)
    p.write_bytes(struct.pack("<Q", 5) + b"{oops")
    assert "model.safetensors" in _error(tmp_path) and "JSON" in _error(tmp_path)
    header = json.dumps({"w": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 2]}}).encode()
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0")
    msg = _error(tmp_path)
    assert "model.safetensors" in msg and "'w'" in msg and "Q9" in msg


def test_read_unknown_key(tiny):
    d, _ = tiny
    with pytest.raises(NanoForgeError, match="no.such"):
        list(open_checkpoint(d).read(["no.such"], progress=False))


# --- GGUF: SmolLM2-135M-Instruct against transformers ------------------------------------------

@pytest.fixture(scope="module")
def smol(smollm2_gguf, smollm2_hf):
    """(our checkpoint, our tensors, HF model) for the real GGUF."""
    hf = smollm2_hf
    ck = open_checkpoint(smollm2_gguf)
    ours = dict(ck.read(list(ck.tensors), progress=False))
    return ck, ours, hf


def test_gguf_config_matches_hf(smol):
    ck, _, hf = smol
    c = hf.config
    assert type(hf).__name__ == "LlamaForCausalLM" and ck.config["architectures"] == ["LlamaForCausalLM"]
    for k in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "rms_norm_eps", "vocab_size", "max_position_embeddings",
              "tie_word_embeddings"):
        assert ck.config[k] == getattr(c, k), k
    assert ck.config["rope_theta"] == c.rope_parameters["rope_theta"]
    assert ck.config["torch_dtype"] == "float32"


def test_gguf_special_ids_from_metadata(smol):
    ck = smol[0]
    r = ck.gguf.reader  # gguf's own reader, not ours
    assert ck.config["bos_token_id"] == r.fields["tokenizer.ggml.bos_token_id"].contents() == 1
    assert ck.config["eos_token_id"] == r.fields["tokenizer.ggml.eos_token_id"].contents() == 2


def test_gguf_weights_match_hf(smol):
    ck, ours, hf = smol
    ref = hf.state_dict()
    assert ck.config["tie_word_embeddings"] and "lm_head.weight" not in ck.tensors
    assert set(ours) == set(ref) - {"lm_head.weight"}
    for k, t in ours.items():
        assert tuple(t.shape) == ck.tensors[k].shape == tuple(ref[k].shape), k
        assert t.dtype == torch.float32 and torch.equal(t, ref[k]), k


def test_gguf_tensor_infos(smol):
    from collections import Counter
    ck = smol[0]
    assert Counter(i.dtype for i in ck.tensors.values()) == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert ck.tensors["model.embed_tokens.weight"].dtype == "Q8_0"
    assert ck.tensors["model.layers.29.self_attn.k_proj.weight"].shape == (192, 576)
    assert {i.file for i in ck.tensors.values()} == {"SmolLM2-135M-Instruct.Q4_1.gguf"}


def test_gguf_fingerprint(smol, smollm2_gguf):
    fp = smol[0].fingerprint()
    assert fp["kind"] == "gguf" and [f["name"] for f in fp["files"]] == [smollm2_gguf.name]
    assert fp["files"][0]["size"] == smollm2_gguf.stat().st_size
    other = json.loads(json.dumps(fp))
    other["files"][0]["header_sha256"] = "0" * 64
    assert len(fingerprint_mismatches(fp, other)) == 1


# --- GGUF errors, on tiny files written with gguf's own writer ---------------------------------

def _write_gguf(path: Path, arch: str = "llama", tensors: dict | None = None):
    import gguf
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    for name, (arr, raw) in (tensors or {"token_embd.weight": (np.ones((4, 8), np.float32), None)}).items():
        w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_other_architecture(tmp_path):
    p = _write_gguf(tmp_path / "m.gguf", arch="qwen2")
    msg = _error(p)
    assert "qwen2" in msg and "m.gguf" in msg


def test_gguf_unsupported_quant_and_name(tmp_path):
    import gguf
    q8k = (np.zeros((8, 292), np.uint8), gguf.GGMLQuantizationType.Q8_K)
    p = _write_gguf(tmp_path / "q.gguf", tensors={"blk.0.attn_q.weight": q8k})
    ck = open_checkpoint(p)
    assert ck.tensors["model.layers.0.self_attn.q_proj.weight"].shape == (8, 256)
    with pytest.raises(NanoForgeError, match=r"blk\.0\.attn_q\.weight.*Q8_K"):
        list(ck.read(["model.layers.0.self_attn.q_proj.weight"], progress=False))
    p = _write_gguf(tmp_path / "n.gguf", tensors={"blk.0.mystery.weight": (np.ones(4, np.float32), None)})
    assert "blk.0.mystery.weight" in _error(p)


def test_gguf_truncated(tmp_path):
    p = _write_gguf(tmp_path / "t.gguf")
    p.write_bytes(p.read_bytes()[:-40])
    assert "t.gguf" in _error(p)
