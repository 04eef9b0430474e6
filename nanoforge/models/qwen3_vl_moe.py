"""Qwen3VLMoeForConditionalGeneration: Qwen3-VL (models/qwen3_vl.py: vision tower as `encode`, MRoPE,
deepstack) whose decoder layers take Qwen3-MoE's sparse block (models/qwen3_moe.py) where
`is_sparse` says, dense SwiGLU elsewhere.

Its router always renormalises the top-k weights (Qwen3VLMoeTextTopKRouter has no `norm_topk_prob`
switch), so the text config says so. Experts are stored fused on disk (`mlp.experts.gate_up_proj`,
`mlp.experts.down_proj`, in either of two orientations); the checkpoint reader shows them as per-expert
keys (models/fused_experts.py), so `StackedExperts` binds them like Qwen3-MoE's."""
from __future__ import annotations

from typing import Any

from .common import Config, GatedMLP
from .frontend import TraceModule
from .qwen3_moe import Qwen3MoeSparseMoeBlock, is_sparse
from .qwen3_vl import Qwen3VLForConditionalGeneration
from .qwen3_vl import build as vl_build
from .qwen3_vl import text_config_of as vl_text_config_of


def moe_mlp(c: Config, layer: int) -> TraceModule:
    return Qwen3MoeSparseMoeBlock(c) if is_sparse(c, layer) else GatedMLP(c.hidden_size, c.intermediate_size)


def build(c: Config) -> Qwen3VLForConditionalGeneration:
    return vl_build(c, moe_mlp)


def text_config_of(config: dict[str, Any]) -> dict[str, Any]:
    return {**vl_text_config_of(config), "norm_topk_prob": True}
