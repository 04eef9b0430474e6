"""Architecture name (config.json `architectures[0]`) -> model builder, and tracing to IR."""
from __future__ import annotations

import time
from typing import Any, Callable, Collection

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
    "Qwen3NextForCausalLM": qwen3_5_moe.build_next,
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
    "Qwen3_5MoeForCausalLM": qwen3_5_moe.build_mtp,
    "Qwen3_5MoeForConditionalGeneration": qwen3_5_moe.build_mtp,
}
MTP_LAYER_KEYS = ("num_nextn_predict_layers", "mtp_num_hidden_layers")  # DeepSeek's name, Qwen3.5's
DTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def architecture_of(config: dict[str, Any]) -> str:
    archs = config.get("architectures") or []
    if not archs:
        raise NanoForgeError("config.json: no 'architectures' entry; supported: " + ", ".join(ARCHITECTURES))
    if archs[0] not in ARCHITECTURES:
        raise NanoForgeError(f"config.json: unsupported architecture {archs[0]!r}; supported: "
                             + ", ".join(ARCHITECTURES))
    return archs[0]


def mtp_layers(c: Config) -> int:
    """The MTP layers the config says the checkpoint ships (0: none)."""
    return max(int(c.get(k) or 0) for k in MTP_LAYER_KEYS)


def check_draft_weights(module: Module, keys: Collection[str]) -> None:
    """One line when the checkpoint ships none of its MTP layer's own tensors although its config counts
    the layer (transformers' save_pretrained drops `mtp.*` / DeepSeek's extra layer)."""
    own = {k for n in module.functions["draft"].nodes for p in n.params.values() for k in module.params[p].keys} - \
        {k for n in module.functions["forward"].nodes for p in n.params.values() for k in module.params[p].keys}
    if own and not own & set(keys):
        raise NanoForgeError(f"--speculative mtp: the config counts an MTP layer but the checkpoint has none of its "
                             f"tensors (no '{min(own)}'; a transformers re-save drops them): use the original weights")


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
        if not mtp_layers(c):
            raise NanoForgeError(f"--speculative mtp: this {arch} checkpoint has no MTP layer "
                                 f"(config.json {' / '.join(MTP_LAYER_KEYS)} is 0 or absent)")
        if arch not in DRAFTS:
            raise NanoForgeError(f"--speculative mtp: drafting with {arch}'s MTP layer is not built yet "
                                 f"(built for {', '.join(DRAFTS)}); use --speculative ngram")
        mtp = DRAFTS[arch](c, model)
    module = trace_forward(model, dtype, mtp, c.hidden_size)
    if arch in ENCODERS:
        ENCODERS[arch](module, model, dtype)
    write(module, ModelInfo(arch, dtype, c.vocab_size, c.hidden_size, c.num_hidden_layers,
                            int(c.get("max_position_embeddings", defaults.MAX_MODEL_LEN)),
                            str(config.get("model_type", "")), mtp_layers(c),
                            round((time.perf_counter() - start) * 1000, 1)))
    return module
