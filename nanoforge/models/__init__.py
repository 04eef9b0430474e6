"""Architecture name (config.json `architectures[0]`) -> model builder, and tracing to IR."""
from __future__ import annotations

import time
from typing import Any, Callable

from .. import defaults
from ..errors import NanoForgeError
from ..facts import ModelInfo, write
from ..ir.graph import Module
from . import deepseek_v3, deepseek_v32, llama, qwen3, qwen3_5_moe, qwen3_moe, qwen3_vl, qwen3_vl_moe
from .common import Config
from .frontend import TraceModule, trace_forward

ARCHITECTURES: dict[str, Callable[[Config], TraceModule]] = {
    "LlamaForCausalLM": llama.build,
    "Qwen3ForCausalLM": qwen3.build,
    "Qwen3MoeForCausalLM": qwen3_moe.build,
    "DeepseekV3ForCausalLM": deepseek_v3.build,
    "KimiK2ForCausalLM": deepseek_v3.build,
    "DeepseekV32ForCausalLM": deepseek_v32.build_v32,
    "GlmMoeDsaForCausalLM": deepseek_v32.build_glm5,
    "Qwen3_5MoeForCausalLM": qwen3_5_moe.build,
    "Qwen3_5MoeForConditionalGeneration": qwen3_5_moe.build_conditional,
    "Qwen3VLForConditionalGeneration": qwen3_vl.build,
    "Qwen3VLMoeForConditionalGeneration": qwen3_vl_moe.build,
}
TEXT_CONFIGS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {  # a multimodal config's text part
    "Qwen3_5MoeForConditionalGeneration": qwen3_5_moe.text_config_of,
    "Qwen3VLForConditionalGeneration": qwen3_vl.text_config_of,
    "Qwen3VLMoeForConditionalGeneration": qwen3_vl_moe.text_config_of,
}
ENCODERS: dict[str, Callable[[Module, Any, str], None]] = {  # traces the vision tower into `encode`
    "Qwen3VLForConditionalGeneration": qwen3_vl.trace_encode,
    "Qwen3VLMoeForConditionalGeneration": qwen3_vl.trace_encode,
}
DRAFTS: dict[str, Callable[[Config, TraceModule], TraceModule]] = {  # the checkpoint's MTP layer
    "DeepseekV3ForCausalLM": deepseek_v3.build_mtp,
    "KimiK2ForCausalLM": deepseek_v3.build_mtp,
}
DTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def architecture_of(config: dict[str, Any]) -> str:
    archs = config.get("architectures") or []
    if not archs:
        raise NanoForgeError("config.json: no 'architectures' entry; supported: " + ", ".join(ARCHITECTURES))
    if archs[0] not in ARCHITECTURES:
        raise NanoForgeError(f"config.json: unsupported architecture {archs[0]!r}; supported: "
                             + ", ".join(ARCHITECTURES))
    return archs[0]


def trace_model(config: dict[str, Any], dtype: str = "bf16", draft: bool = False) -> Module:
    """Build the architecture's model from its HF config and trace it into an IR module; with `draft`,
    also the checkpoint's MTP layer into a `draft` function."""
    arch = architecture_of(config)
    if dtype not in DTYPES.values():
        raise NanoForgeError(f"--dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES.values())}")
    c = Config(TEXT_CONFIGS[arch](config) if arch in TEXT_CONFIGS else config)
    start = time.perf_counter()
    model = ARCHITECTURES[arch](c)
    mtp = None
    if draft:
        if not int(c.get("num_nextn_predict_layers") or 0):
            raise NanoForgeError(f"--speculative mtp: this {arch} checkpoint has no MTP layer "
                                 "(config.json num_nextn_predict_layers is 0 or absent)")
        if arch not in DRAFTS:
            raise NanoForgeError(f"--speculative mtp: drafting with {arch}'s MTP layer is not built yet "
                                 f"(built for {', '.join(DRAFTS)}); use --speculative ngram")
        mtp = DRAFTS[arch](c, model)
    module = trace_forward(model, dtype, mtp, c.hidden_size)
    if arch in ENCODERS:
        ENCODERS[arch](module, model, dtype)
    write(module, ModelInfo(arch, dtype, c.vocab_size, c.hidden_size, c.num_hidden_layers,
                            int(c.get("max_position_embeddings", defaults.MAX_MODEL_LEN)),
                            str(config.get("model_type", "")), int(c.get("num_nextn_predict_layers") or 0),
                            round((time.perf_counter() - start) * 1000, 1)))
    return module
