"""Qwen3ForCausalLM: Llama-like, plus per-head RMSNorm of q and k before rope."""
from __future__ import annotations

from .common import CausalLM, Config, DecoderLayer, GatedMLP, attention, rope, rope_attrs
from .frontend import Linear, RMSNorm, Sym, TraceModule


class Qwen3Attention(TraceModule):
    def __init__(self, c: Config, layer: int):
        super().__init__()
        heads, kv_heads, hd, bias = c.num_attention_heads, c.num_key_value_heads, c.head_dim(), \
            c.get("attention_bias", False)
        self.q_proj = Linear(c.hidden_size, heads * hd, bias)
        self.k_proj = Linear(c.hidden_size, kv_heads * hd, bias)
        self.v_proj = Linear(c.hidden_size, kv_heads * hd, bias)
        self.o_proj = Linear(heads * hd, c.hidden_size, bias)
        self.q_norm = RMSNorm(hd, c.rms_norm_eps)
        self.k_norm = RMSNorm(hd, c.rms_norm_eps)
        self.rope = rope_attrs(c, heads, kv_heads, hd, hd, hd)
        self.attn = dict(kind="gqa", layer=layer, heads=heads, kv_heads=kv_heads, head_dim=hd, scale=hd ** -0.5)

    def forward(self, x: Sym, positions: Sym) -> Sym:
        q, k = rope(self.q_norm(self.q_proj(x)), self.k_norm(self.k_proj(x)), positions, self.rope)
        return self.o_proj(attention(q, k, self.v_proj(x), self.attn))


def build(c: Config) -> CausalLM:
    return CausalLM(c, lambda i: DecoderLayer(c, Qwen3Attention(c, i), GatedMLP(c.hidden_size, c.intermediate_size)))
