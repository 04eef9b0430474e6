"""Tiny block-FP8 checkpoints as DeepSeek-V3 / Kimi-K2 ship them, and HF's reference on them.

`make_fp8_checkpoint(name, dir)` builds a tiny random DeepseekV3 model with HF (dims chosen so that
most linears have several 128-blocks and a partial edge block), block-quantizes every linear weight
of the decoder layers to e4m3 with one f32 `<key>_scale_inv` per 128x128 block (the quantizer is
written here, independent of nanoforge), writes them as F8_E4M3 safetensors and adds DeepSeek's
`quantization_config` to config.json. Beside it, `<dir>-dequantized` holds the same model with each
weight dequantized here (block by block, in float32), and `hf_fp8_model(dir)` is HF's model on that
copy: the reference nanoforge's greedy tokens must equal.

Why not HF's own FP8 loader (`FineGrainedFP8Config(dequantize=True)`): transformers 5.17 derives the
block size as rows // scale_rows, so a weight with a partial edge block (DeepSeek-V3's
kv_a_proj_with_mqa is 576 rows: 4.5 blocks) is either refused or scaled with the wrong blocks
(136 rows with 2 scale rows become two 68-row blocks). The checkpoints' own convention (DeepSeek's
`weight_dequant`) is 128-row blocks with a partial last one."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hf_fixtures import INIT_STD, TOKENIZER_VOCAB, _quiet_transformers, hf_model, make_tokenizer

BLOCK = 128
QUANTIZED = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QUANT_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def fp8_config(name: str):
    """DeepSeek-V3-shaped (dims across 128-blocks) or Kimi-K2-shaped (its routing constants: one
    group, top-1 group, routed_scaling_factor 2.827, experts scaled down from 384); deepseek_v3_flash
    has the shapes DeepGEMM and FlashMLA take (bf16, latent 512, rope 64, dims in 128s) and routes
    every token to every expert, so its bf16 runs on different kernels stay comparable."""
    import transformers as tf

    common = dict(vocab_size=1000, hidden_size=160, intermediate_size=288, moe_intermediate_size=144,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=136,
                  kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, first_k_dense_replace=1,
                  n_shared_experts=1, norm_topk_prob=True, rope_interleave=True, rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=INIT_STD, bos_token_id=998,
                  eos_token_id=999, pad_token_id=None, hidden_act="silu", attention_bias=False,
                  num_nextn_predict_layers=0, torch_dtype="float32")
    if name == "deepseek_v3":
        return tf.DeepseekV3Config(n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                                   max_position_embeddings=512,
                                   routed_scaling_factor=2.5, rope_parameters={
                                       "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                       "original_max_position_embeddings": 128, "mscale": 1.0,
                                       "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}, **common)
    if name == "deepseek_v3_flash":  # the kernels' own shapes: latent 512 + rope 64, GEMM dims in 128s, bf16
        flash = {**common, **dict(hidden_size=256, intermediate_size=384, moe_intermediate_size=256, q_lora_rank=256,
                                  kv_lora_rank=512, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64)}
        # every token takes every expert: no routing choice for another kernel's rounding to flip
        return tf.DeepseekV3Config(n_routed_experts=4, num_experts_per_tok=4, n_group=1, topk_group=1,
                                   max_position_embeddings=512, routed_scaling_factor=2.5, **flash)
    if name == "kimi_k2":
        return tf.DeepseekV3Config(n_routed_experts=12, num_experts_per_tok=4, n_group=1, topk_group=1,
                                   routed_scaling_factor=2.827, max_position_embeddings=2048, rope_parameters={
                                       "rope_type": "yarn", "rope_theta": 50000.0, "factor": 32.0,
                                       "original_max_position_embeddings": 64, "mscale": 1.0,
                                       "mscale_all_dim": 1.0, "beta_fast": 1, "beta_slow": 1}, **common)
    raise ValueError(name)


def quantize_block_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, f32 scale_inv per 128x128 block, partial edge blocks included)."""
    rows, cols = w.shape
    nr, nc = -(-rows // BLOCK), -(-cols // BLOCK)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    s = torch.empty(nr, nc, dtype=torch.float32)
    for i in range(nr):
        for j in range(nc):
            blk = w[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK].float()
            s[i, j] = blk.abs().max().clamp(min=1e-12) / 448.0
            q[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] = (blk / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


def dequantize_block_fp8(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    out = q.to(torch.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            out[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] *= s[i, j]
    return out


def make_fp8_checkpoint(name: str, out_dir: Path, seed: int = 0) -> Path:
    import transformers as tf

    out_dir = Path(out_dir)
    plain = out_dir.with_name(out_dir.name + "-plain")
    config = fp8_config(name)
    torch.manual_seed(seed)
    with _quiet_transformers():
        model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        for mod in model.modules():  # norms near 1, a nonzero routing bias: as hf_fixtures does
            if type(mod).__name__.endswith("RMSNorm"):
                mod.weight.data = 1 + 0.1 * torch.randn_like(mod.weight)
            b = getattr(mod, "e_score_correction_bias", None)
            if isinstance(b, torch.Tensor):
                b.data = 0.1 * torch.randn_like(b)
        model.generation_config = tf.GenerationConfig(bos_token_id=998, eos_token_id=999, pad_token_id=998)
        model.save_pretrained(plain, safe_serialization=True)
    make_tokenizer(TOKENIZER_VOCAB["deepseek_v3"]).save_pretrained(plain)
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.copytree(plain, out_dir, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    tensors = {}
    for f in sorted(plain.glob("*.safetensors")):
        tensors.update(load_file(f))
    out, widened = {}, {}
    for key, t in tensors.items():
        if key.startswith("model.layers.") and key.endswith(".weight") and t.dim() == 2 \
                and any(f".{m}." in key for m in QUANTIZED):
            out[key], out[f"{key}_scale_inv"] = quantize_block_fp8(t)
            widened[key] = dequantize_block_fp8(out[key], out[f"{key}_scale_inv"])
        else:
            out[key] = widened[key] = t.contiguous()
    save_file(out, out_dir / "model.safetensors", metadata={"format": "pt"})
    for stale in plain.glob("*.safetensors"):
        stale.unlink()
    save_file(widened, plain / "model.safetensors", metadata={"format": "pt"})
    (plain / "model.safetensors.index.json").unlink(missing_ok=True)
    shutil.rmtree(dequantized_dir(out_dir), ignore_errors=True)
    plain.rename(dequantized_dir(out_dir))
    cfg = json.loads((out_dir / "config.json").read_text())
    cfg["quantization_config"] = QUANT_CONFIG
    if name == "deepseek_v3_flash":
        cfg.update({k: "bfloat16" for k in ("torch_dtype", "dtype") if k in cfg} or {"torch_dtype": "bfloat16"})
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    return out_dir


def dequantized_dir(ckpt_dir: Path) -> Path:
    return Path(ckpt_dir).with_name(Path(ckpt_dir).name + "-dequantized")


def hf_fp8_model(ckpt_dir: Path):
    """HF's model on the checkpoint's weights dequantized to float32 (see the module docstring)."""
    return hf_model(dequantized_dir(ckpt_dir))
