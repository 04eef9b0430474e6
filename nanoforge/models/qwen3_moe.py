"""Qwen3MoeForCausalLM: Qwen3 attention; softmax top-k MoE on every `decoder_sparse_step`-th
layer that is not in `mlp_only_layers`, dense SwiGLU elsewhere."""
from __future__ import annotations

from .common import CausalLM, Config, DecoderLayer, GatedMLP, StackedExperts
from .frontend import Linear, Sym, TraceModule
from .qwen3 import Qwen3Attention


def num_experts(c: Config) -> int:
    """Real checkpoints say `num_experts`; transformers 5 saves `num_local_experts`."""
    return int(c.get("num_experts") or c.get("num_local_experts", 0))


class Qwen3MoeSparseMoeBlock(TraceModule):
    def __init__(self, c: Config):
        super().__init__()
        self.gate = Linear(c.hidden_size, num_experts(c))
        self.experts = StackedExperts(num_experts(c), c.hidden_size, c.moe_intermediate_size)
        self.attrs = dict(num_experts=num_experts(c), top_k=c.num_experts_per_tok, scoring="softmax",
                          norm_topk_prob=bool(c.get("norm_topk_prob", False)))

    def forward(self, x: Sym) -> Sym:
        return x.tracer.emit("moe", [x], self.experts.params(self.gate.weight), **self.attrs)


def is_sparse(c: Config, layer: int) -> bool:
    return (layer not in (c.get("mlp_only_layers") or []) and num_experts(c) > 0
            and (layer + 1) % c.get("decoder_sparse_step", 1) == 0)


def build(c: Config) -> CausalLM:
    def layer(i: int) -> DecoderLayer:
        mlp = Qwen3MoeSparseMoeBlock(c) if is_sparse(c, i) else GatedMLP(c.hidden_size, c.intermediate_size)
        return DecoderLayer(c, Qwen3Attention(c, i), mlp)
    return CausalLM(c, layer)
