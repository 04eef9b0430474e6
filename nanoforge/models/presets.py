"""Real model configs (from their config.json) for benchmarks with random weights, where the
checkpoint itself is too big to fetch or to carry to the GPU machines (or, for the CPU benchmark,
is not on the machine: the work does not depend on the weights' values)."""
from __future__ import annotations

_QWEN3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
          "rms_norm_eps": 1e-6, "rope_theta": 1000000, "head_dim": 128, "torch_dtype": "bfloat16",
          "bos_token_id": 151643, "eos_token_id": 151645}

_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False, "mlp_bias": False,
          "hidden_act": "silu", "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "bos_token_id": None,
          "eos_token_id": None}

# Issue 19's comparison, 8 layers of each at their real sizes (random weights): Qwen3.5-35B-A3B's text
# model (the pinned transformers' Qwen3_5MoeTextConfig defaults: 3 Gated DeltaNet layers, then one gated
# full-attention layer) against Qwen3-30B-A3B's config.json (attention in every layer), ~3B active each
_QWEN3_5_MOE = {"architectures": ["Qwen3_5MoeForCausalLM"], "model_type": "qwen3_5_moe_text",
                "hidden_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256,
                "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
                "linear_num_key_heads": 16, "linear_num_value_heads": 32, "moe_intermediate_size": 512,
                "shared_expert_intermediate_size": 512, "num_experts": 256, "num_experts_per_tok": 8,
                "vocab_size": 248320, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
                "rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": 0.25, "rope_type": "default"},
                "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": None, "eos_token_id": None}
_QWEN3_30B_A3B = {**_QWEN3, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
                  "intermediate_size": 6144, "num_attention_heads": 32, "num_key_value_heads": 4,
                  "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
                  "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 151936,
                  "max_position_embeddings": 40960, "tie_word_embeddings": False}

# Issue 21's benchmarks (bench/vision.py): Qwen3-VL-8B-Instruct's config.json, its vision tower at full size (the
# pinned transformers' Qwen3VLVisionConfig defaults but out_hidden_size, the 8B's text width 4096) and its text
# model cut to 2 layers (widths, vocab and special token ids kept): image pipelines at the real tower's cost
_QWEN3_VL_8B = {"architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
                "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
                "vision_end_token_id": 151653, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
                "text_config": {"model_type": "qwen3_vl_text", "hidden_size": 4096, "intermediate_size": 12288,
                                "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
                                "head_dim": 128, "hidden_act": "silu", "attention_bias": False, "rms_norm_eps": 1e-6,
                                "vocab_size": 151936, "max_position_embeddings": 262144,
                                "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0,
                                                    "mrope_section": [24, 20, 20], "mrope_interleaved": True},
                                "bos_token_id": 151643, "eos_token_id": 151645},
                "vision_config": {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304,
                                  "num_heads": 16, "hidden_act": "gelu_pytorch_tanh", "in_channels": 3,
                                  "patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2,
                                  "out_hidden_size": 4096, "num_position_embeddings": 2304,
                                  "deepstack_visual_indexes": [8, 16, 24]}}
# the tests' tiny Qwen3-VL (tests/test_qwen3_vl.py's sizes): the CPU smoke run of the same pipelines
_QWEN3_VL_TINY = {**_QWEN3_VL_8B, "image_token_id": 500, "video_token_id": 501, "vision_start_token_id": 498,
                  "vision_end_token_id": 499,
                  "text_config": {**_QWEN3_VL_8B["text_config"], "hidden_size": 64, "intermediate_size": 128,
                                  "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
                                  "head_dim": 16, "vocab_size": 512, "max_position_embeddings": 512,
                                  "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                      "mrope_section": [2, 3, 3], "mrope_interleaved": True},
                                  "bos_token_id": None, "eos_token_id": None},
                  "vision_config": {**_QWEN3_VL_8B["vision_config"], "depth": 3, "hidden_size": 32,
                                    "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                                    "num_position_embeddings": 16, "deepstack_visual_indexes": [0, 1]}}

PRESETS: dict[str, dict] = {
    "qwen3-0.6b": {**_QWEN3, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "vocab_size": 151936,
                   "max_position_embeddings": 40960, "tie_word_embeddings": True},
    "qwen3-8b": {**_QWEN3, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 151936,
                 "max_position_embeddings": 40960, "tie_word_embeddings": False},
    "qwen3-tiny": {**_QWEN3, "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 4096,
                   "max_position_embeddings": 4096, "tie_word_embeddings": True,
                   "bos_token_id": None, "eos_token_id": None},
    # SmolLM2-135M's config.json (HuggingFaceTB/SmolLM2-135M), the CPU benchmark's real-sized model
    "smollm2-135m": {**_LLAMA, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
                     "max_position_embeddings": 8192, "rope_theta": 100000.0, "tie_word_embeddings": True},
    # the tests' tiny Llama (tests/hf_fixtures.py) at hidden 128: a step is mostly host overhead
    "llama-tiny": {**_LLAMA, "hidden_size": 128, "intermediate_size": 320, "num_hidden_layers": 3,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 1024,
                   "max_position_embeddings": 1024, "rope_theta": 100000.0, "tie_word_embeddings": True},
    "qwen3.5-moe-8l": {**_QWEN3_5_MOE, "num_hidden_layers": 8,
                       "layer_types": ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3
                       + ["full_attention"]},
    "qwen3-30b-a3b-8l": {**_QWEN3_30B_A3B, "num_hidden_layers": 8},
    "qwen3-vl-8b-2l": {**_QWEN3_VL_8B, "text_config": {**_QWEN3_VL_8B["text_config"], "num_hidden_layers": 2}},
    "qwen3-vl-tiny": _QWEN3_VL_TINY,
}
