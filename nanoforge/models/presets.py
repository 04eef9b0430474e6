"""Real model configs (from their config.json) for benchmarks with random weights, where the
checkpoint itself is too big to fetch or to carry to the GPU machines."""
from __future__ import annotations

_QWEN3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
          "rms_norm_eps": 1e-6, "rope_theta": 1000000, "head_dim": 128, "torch_dtype": "bfloat16",
          "bos_token_id": 151643, "eos_token_id": 151645}

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
}
