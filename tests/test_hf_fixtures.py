"""Tests of the HF reference fixtures (tests/hf_fixtures.py) themselves.

Besides "it builds, loads and runs", this file holds an independent from-scratch torch forward of
each architecture, written only from tests/HF_REFERENCE_NOTES.md and the on-disk key table, and checks
it against transformers: that is what makes the notes and the table trustworthy for the engine.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import hf_fixtures as hf
import mtp_fixtures

ARCHS = hf.ARCHS


# ------------------------------------------------------------------------------------ build / layout
@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_layout(arch, tiny_ckpt):
    d = tiny_ckpt(arch)
    for name in ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja"]:
        assert (d / name).is_file(), name
    shapes = hf.disk_shapes(d)
    expected = hf.expected_keys(arch)
    assert set(shapes) - set(expected) == set(), "undocumented keys on disk"
    assert set(expected) - set(shapes) == set(), "documented keys missing on disk"
    assert shapes == expected
    assert not any("rotary" in k or "inv_freq" in k for k in shapes)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == arch
    assert cfg["vocab_size"] == hf.tiny_config(arch).vocab_size
    total = sum(f.stat().st_size for f in hf.weight_files(d))
    assert total < 8e6, f"tiny checkpoint is {total / 1e6:.1f} MB"
    if arch == "deepseek_v3":
        index = json.loads((d / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(shapes)
        assert set(index["weight_map"].values()) == {f.name for f in hf.weight_files(d)}
        last = hf.weight_files(d)[-1].name
        L = cfg["num_hidden_layers"]
        for k, f in index["weight_map"].items():
            assert (f == last) == k.startswith(f"model.layers.{L}."), k
        assert cfg["num_nextn_predict_layers"] == 1
    else:
        assert [f.name for f in hf.weight_files(d)] == ["model.safetensors"]
        assert not (d / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_loads_every_weight(arch, tiny_ckpt):
    import transformers as tf

    d = tiny_ckpt(arch)
    kw = {"experts_implementation": "eager"} if arch in ("qwen3_moe", "deepseek_v3") else {}
    with hf._quiet_transformers():
        model, info = tf.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager",
                                                              output_loading_info=True, **kw)
    assert not info["missing_keys"]
    assert not info["mismatched_keys"]
    L = model.config.num_hidden_layers
    assert all(k.startswith(f"model.layers.{L}.") for k in info["unexpected_keys"])
    assert bool(info["unexpected_keys"]) == (arch == "deepseek_v3")
    sd = hf._read_all(d)
    assert torch.equal(model.model.embed_tokens.weight, sd["model.embed_tokens.weight"])
    if arch == "llama":
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_moe_layer_rule(hf_ref):
    q = hf_ref("qwen3_moe")
    kinds = [type(layer.mlp).__name__ for layer in q.model.layers]
    assert hf.moe_layers("qwen3_moe") == [1]
    assert [i for i, k in enumerate(kinds) if k.endswith("SparseMoeBlock")] == [1]
    d = hf_ref("deepseek_v3")
    kinds = [type(layer.mlp).__name__ for layer in d.model.layers]
    assert hf.moe_layers("deepseek_v3") == [1, 2]
    assert kinds == ["DeepseekV3MLP", "DeepseekV3MoE", "DeepseekV3MoE"]


# ------------------------------------------------------------------------------------ HF runs
@pytest.mark.parametrize("arch", ARCHS)
def test_hf_logits_and_greedy(arch, hf_ref):
    model = hf_ref(arch)
    V = model.config.vocab_size
    prompts = hf.random_prompts(V, [1, 6, 17], seed=3)
    assert [len(p) for p in prompts] == [1, 6, 17]
    assert prompts == hf.random_prompts(V, [1, 6, 17], seed=3)
    logits = hf.hf_last_logits(model, prompts)
    assert logits.shape == (3, V) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(hf.hf_all_logits(model, prompts[2])[-1], logits[2])

    ids, step_logits = hf.hf_greedy(model, prompts[1], 10, return_logits=True)
    assert len(ids) == 10 and all(0 <= t < V for t in ids)
    assert step_logits.shape == (10, V)
    assert ids == step_logits.argmax(-1).tolist()
    torch.testing.assert_close(step_logits[0], logits[1], rtol=1e-5, atol=1e-5)
    assert hf.hf_greedy(model, prompts[1], 0) == []
    assert len(set(hf.hf_greedy(model, prompts[2], 16))) > 4  # not a degenerate repeat loop


def test_greedy_matches_generate(hf_ref):
    """hf_greedy == model.generate(do_sample=False) with stopping on eos disabled."""
    model = hf_ref("qwen3")
    prompt = hf.random_prompts(model.config.vocab_size, [7], seed=11)[0]
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 7, dtype=torch.long),
                             max_new_tokens=12, min_new_tokens=12, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    gen = out[0, 7:].tolist()
    assert gen == hf.hf_greedy(model, prompt, 12)


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer(arch, tiny_ckpt):
    from transformers import AutoTokenizer

    d = tiny_ckpt(arch)
    tok = AutoTokenizer.from_pretrained(d)
    cfg = hf.tiny_config(arch)
    assert len(tok) == hf.TOKENIZER_VOCAB[arch] <= cfg.vocab_size
    assert [tok.convert_tokens_to_ids(t) for t in hf.SPECIAL_TOKENS] == [0, 1, 2]
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == cfg.eos_token_id == hf.IM_END_ID
    assert tok.bos_token_id == cfg.bos_token_id == hf.ENDOFTEXT_ID
    text = "Hello world! The quick brown fox, 42."
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and ids[0] not in (0, 1, 2)  # no BOS prepended
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                   tokenize=False)
    assert chat == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    enc = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    ids = enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc
    assert ids[0] == hf.IM_START_ID and hf.IM_END_ID in ids
    raw = json.loads((d / "tokenizer.json").read_text())
    assert {t["content"] for t in raw["added_tokens"] if t["special"]} == set(hf.SPECIAL_TOKENS)
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["eos_token_id"] == ([2, 0] if arch == "qwen3" else 2)


# ------------------------------------------------------------------------------------ variants
@pytest.mark.parametrize("arch", ARCHS)
def test_shards_and_legacy_config_same_model(arch, tiny_ckpt, hf_ref):
    sharded = tiny_ckpt(arch, shards=2)
    files = hf.weight_files(sharded)
    assert len(files) >= 2
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    assert hf.disk_shapes(sharded) == hf.expected_keys(arch)

    legacy = tiny_ckpt(arch, config_style="legacy")
    cfg = json.loads((legacy / "config.json").read_text())
    assert "rope_parameters" not in cfg and "rope_theta" in cfg
    if arch == "deepseek_v3":
        assert cfg["rope_scaling"]["type"] == "yarn" and "head_dim" not in cfg
    if arch == "qwen3_moe":
        assert cfg["num_experts"] == 6 and "num_local_experts" not in cfg

    prompts = hf.random_prompts(hf.tiny_config(arch).vocab_size, [5, 23], seed=5)
    ref = hf.hf_last_logits(hf_ref(arch), prompts)
    for d in (sharded, legacy):
        assert torch.equal(hf.hf_last_logits(hf.hf_model(d), prompts), ref), d.name


def test_seed_determinism(tiny_ckpt, tmp_path):
    a = hf._read_all(tiny_ckpt("qwen3_moe"))
    b = hf._read_all(hf.make_tiny_checkpoint("qwen3_moe", tmp_path / "again", seed=0))
    c = hf._read_all(hf.make_tiny_checkpoint("qwen3_moe", tmp_path / "other", seed=1))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_deepseek_bf16_and_router_bias(tiny_ckpt, hf_ref):
    from safetensors import safe_open

    d = tiny_ckpt("deepseek_v3", dtype=torch.bfloat16)
    dtypes = {}
    for f in hf.weight_files(d):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                dtypes[k] = h.get_slice(k).get_dtype()
    bias_keys = [k for k in dtypes if k.endswith("e_score_correction_bias")]
    assert sorted(bias_keys) == [f"model.layers.{i}.mlp.gate.e_score_correction_bias" for i in (1, 2, 3)]
    assert all(dtypes[k] == "F32" for k in bias_keys)
    assert all(v == "BF16" for k, v in dtypes.items() if k not in bias_keys)
    m = hf.hf_model(d, dtype=torch.bfloat16)
    assert m.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert m.model.layers[1].self_attn.q_a_proj.weight.dtype == torch.bfloat16
    assert torch.isfinite(hf.hf_last_logits(m, [[5, 6, 7, 8]])).all()

    sd = hf._read_all(tiny_ckpt("deepseek_v3"))
    fp32 = hf_ref("deepseek_v3")
    for i in (1, 2):
        b = sd[f"model.layers.{i}.mlp.gate.e_score_correction_bias"]
        assert b.abs().min() > 0 and b.std() > 0.02
        assert torch.equal(fp32.model.layers[i].mlp.gate.e_score_correction_bias, b)


def test_deepseek_mtp_reference(tiny_ckpt, hf_ref):
    model = hf_ref("deepseek_v3")
    mtp = mtp_fixtures.hf_mtp_model(model)
    sd = hf._read_all(tiny_ckpt("deepseek_v3"))
    layer = mtp.layers[0]
    assert torch.equal(layer.eh_proj.weight, sd["model.layers.3.eh_proj.weight"])
    assert torch.equal(layer.enorm.weight, sd["model.layers.3.enorm.weight"])
    assert torch.equal(layer.post_norm.weight, sd["model.layers.3.shared_head.norm.weight"])
    assert torch.equal(layer.mtp_block.mlp.experts.down_proj[3], sd["model.layers.3.mlp.experts.3.down_proj.weight"])
    prompt = hf.random_prompts(model.config.vocab_size, [9], seed=2)[0]
    nxt = hf.hf_greedy(model, prompt, 1)[0]
    lg = mtp_fixtures.hf_mtp_logits(model, mtp, prompt, nxt)
    assert lg.shape == (9, model.config.vocab_size) and torch.isfinite(lg).all()
    ref = _ref_mtp_logits(sd, hf.tiny_config("deepseek_v3"), prompt, nxt)
    torch.testing.assert_close(lg, ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------ from-scratch reference
# Written from HF_REFERENCE_NOTES.md only; reads weights by the documented on-disk keys.
def _rms(x, w, eps):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope_neox(x, cos, sin):  # x [T, h, D]; cos/sin [T, D/2]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None], sin[:, None]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def _rope_interleaved_deinterleave(x, cos, sin):  # HF apply_rotary_pos_emb_interleave
    x1, x2 = x[..., 0::2], x[..., 1::2]
    c, s = cos[:, None], sin[:, None]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def _inv_freq_default(theta, dim):
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)


def _yarn(rp, dim):
    """inv_freq [dim/2] and cos/sin factor of rope_type yarn (_compute_yarn_parameters)."""
    base, factor = rp["rope_theta"], rp["factor"]
    orig = rp["original_max_position_embeddings"]

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rp.get("attention_factor") is not None:
        attn_factor = rp["attention_factor"]
    elif rp.get("mscale") and rp.get("mscale_all_dim"):
        attn_factor = get_mscale(factor, rp["mscale"]) / get_mscale(factor, rp["mscale_all_dim"])
    else:
        attn_factor = get_mscale(factor)

    def corr_dim(rot):
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr_dim(rp.get("beta_fast") or 32)), 0)
    high = min(math.ceil(corr_dim(rp.get("beta_slow") or 1)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrap = 1 - ramp  # 1 -> keep the original frequency, 0 -> divide it by factor
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv = (1 / (factor * pos_freqs)) * (1 - extrap) + (1 / pos_freqs) * extrap
    return inv, attn_factor


def _cos_sin(inv_freq, pos, factor=1.0):
    f = pos[:, None].float() * inv_freq[None]
    return f.cos() * factor, f.sin() * factor


def _attend(q, k, v, scale):  # q [T, nh, D], k [S, nkv, D], v [S, nkv, Dv]; causal, S == T
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)  # kv head j -> q heads j*g .. j*g+g-1
    s = torch.einsum("thd,shd->hts", q, k) * scale
    T = q.shape[0]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hts,shd->thd", s.softmax(-1), v)


def _swiglu(x, W, p):
    return (torch.nn.functional.silu(x @ W[p + "gate_proj.weight"].T) * (x @ W[p + "up_proj.weight"].T)) @ W[p + "down_proj.weight"].T


def _experts(x, W, p, idx, w):  # idx, w [T, k]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            out[t] += w[t, j] * _swiglu(x[t:t + 1], W, f"{p}experts.{int(idx[t, j])}.")[0]
    return out


def _qwen3_moe_block(x, W, p, c):
    probs = (x @ W[p + "gate.weight"].T).float().softmax(-1)
    w, idx = probs.topk(c.num_experts_per_tok, -1)
    if c.norm_topk_prob:
        w = w / w.sum(-1, keepdim=True)
    return _experts(x, W, p, idx, w)


def _deepseek_moe_block(x, W, p, c):
    E, G = c.n_routed_experts, c.n_group
    s = torch.sigmoid(x.float() @ W[p + "gate.weight"].float().T)
    sb = s + W[p + "gate.e_score_correction_bias"]
    group_score = sb.view(-1, G, E // G).topk(2, -1).values.sum(-1)
    groups = group_score.topk(c.topk_group, -1).indices
    keep = torch.zeros_like(group_score, dtype=torch.bool).scatter(1, groups, True).repeat_interleave(E // G, 1)
    idx = sb.masked_fill(~keep, float("-inf")).topk(c.num_experts_per_tok, -1).indices
    w = s.gather(1, idx)
    if c.norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    w = w * c.routed_scaling_factor
    return _experts(x, W, p, idx, w) + _swiglu(x, W, p + "shared_experts.")


def _mla(x, W, p, c, pos):
    nh, dn, dr, dv, r = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
    T = x.shape[0]
    inv, af = _yarn(c.rope_parameters, dr)
    cos, sin = _cos_sin(inv, pos, af)
    q = (_rms(x @ W[p + "q_a_proj.weight"].T, W[p + "q_a_layernorm.weight"], c.rms_norm_eps)
         @ W[p + "q_b_proj.weight"].T).view(T, nh, dn + dr)
    q_nope, q_rope = q[..., :dn], _rope_interleaved_deinterleave(q[..., dn:], cos, sin)
    ckv = x @ W[p + "kv_a_proj_with_mqa.weight"].T
    latent = _rms(ckv[:, :r], W[p + "kv_a_layernorm.weight"], c.rms_norm_eps)  # [T, r]   (cached)
    k_rope = _rope_interleaved_deinterleave(ckv[:, None, r:], cos, sin)     # [T, 1, dr] (cached)
    rp = c.rope_parameters
    m = 0.1 * rp["mscale_all_dim"] * math.log(rp["factor"]) + 1.0
    scale = (dn + dr) ** -0.5 * m * m
    # naive (expanded) form
    kv = (latent @ W[p + "kv_b_proj.weight"].T).view(T, nh, dn + dv)
    k = torch.cat([kv[..., :dn], k_rope.expand(T, nh, dr)], -1)
    out = _attend(torch.cat([q_nope, q_rope], -1), k, kv[..., dn:], scale)
    # absorbed (latent) form: what an MLA decode kernel computes from the [latent | k_rope] cache
    Wkv = W[p + "kv_b_proj.weight"].view(nh, dn + dv, r)
    q_lat = torch.einsum("thd,hdr->thr", q_nope, Wkv[:, :dn])              # W_UK absorbed into q
    s = (torch.einsum("thr,sr->hts", q_lat, latent) + torch.einsum("thd,sd->hts", q_rope, k_rope[:, 0])) * scale
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    o_lat = torch.einsum("hts,sr->thr", s.softmax(-1), latent)
    out2 = torch.einsum("thr,hvr->thv", o_lat, Wkv[:, dn:])                 # W_UV absorbed into o
    torch.testing.assert_close(out, out2, rtol=1e-4, atol=1e-5)
    return out.reshape(T, nh * dv) @ W[p + "o_proj.weight"].T


def _gqa(x, W, p, c, arch, pos):
    T, D = x.shape[0], c.head_dim
    q = (x @ W[p + "q_proj.weight"].T).view(T, -1, D)
    k = (x @ W[p + "k_proj.weight"].T).view(T, -1, D)
    v = (x @ W[p + "v_proj.weight"].T).view(T, -1, D)
    if arch in ("qwen3", "qwen3_moe"):  # per-head RMSNorm over head_dim, before rope
        q, k = _rms(q, W[p + "q_norm.weight"], c.rms_norm_eps), _rms(k, W[p + "k_norm.weight"], c.rms_norm_eps)
    cos, sin = _cos_sin(_inv_freq_default(c.rope_parameters["rope_theta"], D), pos)
    out = _attend(_rope_neox(q, cos, sin), _rope_neox(k, cos, sin), v, D ** -0.5)
    return out.reshape(T, -1) @ W[p + "o_proj.weight"].T


def _layer(h, W, i, c, arch, pos):
    p = f"model.layers.{i}."
    x = _rms(h, W[p + "input_layernorm.weight"], c.rms_norm_eps)
    h = h + (_mla(x, W, p + "self_attn.", c, pos) if arch == "deepseek_v3" else _gqa(x, W, p + "self_attn.", c, arch, pos))
    x = _rms(h, W[p + "post_attention_layernorm.weight"], c.rms_norm_eps)
    if arch == "deepseek_v3" and i >= c.first_k_dense_replace:
        return h + _deepseek_moe_block(x, W, p + "mlp.", c)
    if arch == "qwen3_moe" and i in hf.moe_layers(arch, c):
        return h + _qwen3_moe_block(x, W, p + "mlp.", c)
    return h + _swiglu(x, W, p + "mlp.")


def _ref_hidden(W, c, arch, ids):
    pos = torch.arange(len(ids))
    h = W["model.embed_tokens.weight"][torch.tensor(ids)]
    for i in range(c.num_hidden_layers):
        h = _layer(h, W, i, c, arch, pos)
    return _rms(h, W["model.norm.weight"], c.rms_norm_eps)


def _ref_logits(W, c, arch, ids):
    head = W["model.embed_tokens.weight"] if c.tie_word_embeddings else W["lm_head.weight"]
    return _ref_hidden(W, c, arch, ids) @ head.T


def _ref_mtp_logits(W, c, prompt, next_token):
    L = c.num_hidden_layers
    p = f"model.layers.{L}."
    h = _ref_hidden(W, c, "deepseek_v3", prompt)                      # after model.norm
    toks = torch.tensor(list(prompt[1:]) + [next_token])
    e = W[p + "embed_tokens.weight"][toks]
    x = torch.cat([_rms(e, W[p + "enorm.weight"], c.rms_norm_eps), _rms(h, W[p + "hnorm.weight"], c.rms_norm_eps)], -1)
    x = x @ W[p + "eh_proj.weight"].T
    x = _layer(x, W, L, c, "deepseek_v3", torch.arange(1, len(toks) + 1))
    return _rms(x, W[p + "shared_head.norm.weight"], c.rms_norm_eps) @ W[p + "shared_head.head.weight"].T


@pytest.mark.parametrize("arch", ARCHS)
def test_from_scratch_reference_matches_hf(arch, tiny_ckpt, hf_ref):
    W = hf._read_all(tiny_ckpt(arch))
    c = hf.tiny_config(arch)
    model = hf_ref(arch)
    for prompt in hf.random_prompts(c.vocab_size, [1, 4, 29], seed=7):
        ref = _ref_logits(W, c, arch, prompt)
        torch.testing.assert_close(hf.hf_all_logits(model, prompt), ref, rtol=1e-4, atol=1e-4)
    # decode with HF's KV cache == full recompute of the reference at every step
    prompt = hf.random_prompts(c.vocab_size, [6], seed=8)[0]
    ids, step_logits = hf.hf_greedy(model, prompt, 6, return_logits=True)
    for j in range(6):
        ref = _ref_logits(W, c, arch, prompt + ids[:j])[-1]
        torch.testing.assert_close(step_logits[j], ref, rtol=1e-4, atol=1e-4)


def test_yarn_and_mla_scale_as_documented(hf_ref):
    m = hf_ref("deepseek_v3")
    c = m.config
    inv, af = _yarn(c.rope_parameters, c.qk_rope_head_dim)
    torch.testing.assert_close(m.model.rotary_emb.inv_freq, inv)
    assert m.model.rotary_emb.attention_scaling == pytest.approx(af) and af != pytest.approx(1.0)
    # the ramp is non-trivial: some frequencies kept, some interpolated, one blended
    base = _inv_freq_default(c.rope_parameters["rope_theta"], c.qk_rope_head_dim)
    ratio = (inv / base).tolist()
    assert ratio[0] == pytest.approx(1.0) and ratio[-1] == pytest.approx(1 / c.rope_parameters["factor"])
    assert any(1 / c.rope_parameters["factor"] < r < 1 for r in ratio)
    mall = 0.1 * 0.8 * math.log(4.0) + 1
    assert m.model.layers[0].self_attn.scaling == pytest.approx((16 + 8) ** -0.5 * mall**2)
