"""Tiny random Qwen3.5-MoE checkpoints (hybrid: Gated DeltaNet + gated attention + MoE) and the HF
reference for them, in the style of tests/hf_fixtures.py (transformers==5.17.0):

    ckpt = make_qwen3_5_checkpoint(tmp_dir)                      # Qwen3_5MoeForCausalLM, save_pretrained
    ckpt = make_qwen3_5_checkpoint(tmp_dir, conditional=True)    # Qwen3_5MoeForConditionalGeneration
    model = hf_qwen3_5(ckpt)                                     # eager attention and experts, f32
    ids = hf_fixtures.hf_greedy(model, prompt, 8)                # HF's own hybrid cache

Tiny config: hidden 64, vocab 500, 6 layers `linear, linear, full, linear, linear, full` (4 GDN, 2
attention); attention 4 heads / 2 KV heads of 32, partial rotary 0.25 (8 dims rotated, the first of
each head), q_proj with a gate per head; GDN 2 key heads / 4 value heads (each key head serves 2) of
16, conv kernel 4; MoE 6 experts top-2 of width 32 plus a shared expert of 48 gated by sigmoid.

On disk (save_pretrained un-fuses the experts, as for qwen3_moe; conditional: every `model.` key under
`model.language_model.`, the tiny vision tower under `model.visual.`, config under `text_config`)::

    model.layers.{i}.linear_attn.in_proj_qkv.weight [2*Hk*Dk + Hv*Dv, H]   rows [q | k | v]
    model.layers.{i}.linear_attn.in_proj_z.weight   [Hv*Dv, H]
    model.layers.{i}.linear_attn.in_proj_{b,a}.weight [Hv, H]
    model.layers.{i}.linear_attn.conv1d.weight      [2*Hk*Dk + Hv*Dv, 1, K]
    model.layers.{i}.linear_attn.{dt_bias,A_log}    [Hv]
    model.layers.{i}.linear_attn.norm.weight        [Dv]     gated RMSNorm, plain gain
    model.layers.{i}.linear_attn.out_proj.weight    [H, Hv*Dv]
    model.layers.{i}.self_attn.q_proj.weight        [nh*2*D, H]   per head [query D | gate D]
    model.layers.{i}.self_attn.{k,v}_proj.weight, o_proj.weight, q_norm.weight, k_norm.weight
    model.layers.{i}.mlp.gate.weight [E, H], mlp.experts.{e}.{gate,up,down}_proj.weight,
    model.layers.{i}.mlp.shared_expert.{gate,up,down}_proj.weight, mlp.shared_expert_gate.weight [1, H]

Weights: normal(0, 0.12) as hf_fixtures (so greedy runs do not fall into loops), every (1 + w)
RMSNorm weight 0.1 * randn (a gain of 1 + 0.1 * randn), the GDN's gated norm 1 + 0.1 * randn, A_log and
dt_bias as HF initialises them (seeded).
"""
from __future__ import annotations

from pathlib import Path

import torch

from hf_fixtures import ENDOFTEXT_ID, IM_END_ID, INIT_STD, NORM_WEIGHT_STD, _quiet_transformers, make_tokenizer

VOCAB = 500
LAYER_TYPES = ["linear_attention", "linear_attention", "full_attention"] * 2


def tiny_text_config():
    import transformers as tf

    return tf.Qwen3_5MoeTextConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=len(LAYER_TYPES), layer_types=LAYER_TYPES,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
        linear_num_value_heads=4, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, max_position_embeddings=1024, rms_norm_eps=1e-6,
        tie_word_embeddings=False, initializer_range=INIT_STD, hidden_act="silu", attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        bos_token_id=ENDOFTEXT_ID, eos_token_id=IM_END_ID, pad_token_id=None,
    )


def _randomize_norms(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 1_000_003)
    with torch.no_grad():
        for _, mod in model.named_modules():
            name = type(mod).__name__
            if name.endswith("RMSNormGated"):
                mod.weight.copy_(1.0 + NORM_WEIGHT_STD * torch.randn(mod.weight.shape, generator=g))
            elif name.endswith("RMSNorm"):  # gain (1 + weight)
                mod.weight.copy_(NORM_WEIGHT_STD * torch.randn(mod.weight.shape, generator=g))


def make_qwen3_5_checkpoint(out_dir: Path, seed: int = 0, conditional: bool = False) -> Path:
    """The tiny model (seeded), written with save_pretrained plus a tokenizer; returns out_dir."""
    import transformers as tf

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    text = tiny_text_config()
    with _quiet_transformers():
        if conditional:
            vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
            model = tf.Qwen3_5MoeForConditionalGeneration(tf.Qwen3_5MoeConfig(text_config=text.to_dict(),
                                                                               vision_config=vision))
        else:
            model = tf.AutoModelForCausalLM.from_config(text, dtype=torch.float32)
    return _save(model, out_dir, seed)


def _save(model, out_dir: Path, seed: int) -> Path:
    """Random norm gains (HF initialises them to 0 / 1), the chat ids, then the checkpoint and tokenizer."""
    import transformers as tf

    model.eval()
    _randomize_norms(model, seed)
    model.generation_config = tf.GenerationConfig(bos_token_id=ENDOFTEXT_ID, eos_token_id=IM_END_ID,
                                                  pad_token_id=ENDOFTEXT_ID)
    with _quiet_transformers():
        model.save_pretrained(out_dir, safe_serialization=True)
    make_tokenizer(VOCAB).save_pretrained(out_dir)
    return out_dir


def hf_qwen3_5(ckpt_dir: Path, conditional: bool = False):
    """The checkpoint in transformers, eager attention and experts (the plain code of modeling_*.py)."""
    import transformers as tf

    cls = tf.Qwen3_5MoeForConditionalGeneration if conditional else tf.AutoModelForCausalLM
    with _quiet_transformers():
        model = cls.from_pretrained(ckpt_dir, dtype=torch.float32, attn_implementation="eager",
                                    experts_implementation="eager")
    return model.eval()


def add_mtp_layer(ckpt_dir: Path, seed: int = 0) -> Path:
    """Give the checkpoint at `ckpt_dir` (in place) the MTP layer real Qwen3.5 checkpoints ship and
    transformers drops (see models/qwen3_5_moe.Qwen3_5MoeMTP): config `mtp_num_hidden_layers: 1` and random
    `mtp.*` tensors in model.safetensors. `mtp.layers.0` copies the key names and shapes of the first
    full-attention layer; matrices normal(0, INIT_STD), every (1 + w) norm weight NORM_WEIGHT_STD * randn."""
    import json

    from safetensors.torch import load_file, save_file

    ckpt_dir = Path(ckpt_dir)
    config_path = ckpt_dir / "config.json"
    config = json.loads(config_path.read_text())
    text = config.get("text_config", config)
    text["mtp_num_hidden_layers"] = 1
    config_path.write_text(json.dumps(config, indent=2))
    files = sorted(ckpt_dir.glob("*.safetensors"))
    assert len(files) == 1, "the tiny checkpoints are one safetensors file"
    tensors = load_file(str(files[0]))
    g = torch.Generator().manual_seed(seed + 3_000_017)

    def rand(shape) -> torch.Tensor:
        return (NORM_WEIGHT_STD if len(shape) == 1 else INIT_STD) * torch.randn(shape, generator=g)

    full = text["layer_types"].index("full_attention")
    src = next(f"{p}layers.{full}." for p in ("model.", "model.language_model.") if f"{p}layers.{full}.mlp.gate.weight"
               in tensors)
    h = text["hidden_size"]
    for k in sorted(tensors):
        if k.startswith(src):
            tensors["mtp.layers.0." + k[len(src):]] = rand(tuple(tensors[k].shape))
    tensors["mtp.fc.weight"] = rand((h, 2 * h))
    for name in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        tensors[f"mtp.{name}.weight"] = rand((h,))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(files[0]), metadata={"format": "pt"})
    return ckpt_dir


# --- Qwen3-Next: the same layer types, fused GDN projections, some dense MLPs ----------------------

NEXT_DENSE = [1, 5]  # mlp_only_layers: one GDN layer and one attention layer get a SwiGLU MLP of width 40


def make_qwen3_next_checkpoint(out_dir: Path, seed: int = 0) -> Path:
    """A tiny Qwen3NextForCausalLM (seeded; save_pretrained plus a tokenizer): the Qwen3.5 sizes above, with
    `mlp_only_layers` NEXT_DENSE and `norm_topk_prob` false (Qwen3.5 always renormalises). On disk each GDN
    layer has `linear_attn.in_proj_qkvz.weight` [Hk * (2 Dk + 2 r Dv), H] and `in_proj_ba.weight` [2 Hv, H]
    grouped by key head (r = 2 value heads per key head); returns out_dir."""
    import transformers as tf

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    base = tiny_text_config().to_dict()
    keep = ("vocab_size", "hidden_size", "num_hidden_layers", "layer_types", "num_attention_heads",
            "num_key_value_heads", "head_dim", "linear_conv_kernel_dim", "linear_key_head_dim",
            "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads", "num_experts",
            "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
            "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "initializer_range", "hidden_act",
            "attention_bias", "rope_parameters", "bos_token_id", "eos_token_id", "pad_token_id")
    config = tf.Qwen3NextConfig(**{k: base[k] for k in keep}, intermediate_size=40, mlp_only_layers=NEXT_DENSE,
                                decoder_sparse_step=1, norm_topk_prob=False)
    with _quiet_transformers():
        model = tf.Qwen3NextForCausalLM(config).to(torch.float32)
    return _save(model, out_dir, seed)
