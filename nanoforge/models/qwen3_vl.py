"""Qwen3VLForConditionalGeneration: a Qwen3 language model (`model.language_model.`, config under
`text_config`) with interleaved multimodal rope, plus the vision tower (`model.visual.`, `vision_config`)
traced as its own function `encode`.

`encode(pixels, grid)`: patch embedding (a Conv3d over (C, t, p, p) patches), the learned position table
resampled to each image's grid, ViT blocks (LayerNorm, fused qkv, 2-D rotary attention within each image,
tanh-GELU MLP), then the 2x2 patch merger; the deepstack mergers read the hidden state after the blocks
`deepstack_visual_indexes` name. Outputs: the merged embeddings, then one deepstack feature per index.

`forward` is Qwen3's, except that the image placeholder rows take the encoder's embeddings after the token
embedding (`vision_embed`), decoder layer i < len(deepstack) adds deepstack feature i to them after the
layer (`deepstack_add`), and rope is `mrope` over (t, h, w) positions. The runtime hands both in through the
batch context (runtime/vision_runner.py), so a text-only batch runs the same function as plain Qwen3.
"""
from __future__ import annotations

from typing import Any, Callable

from ..errors import NanoForgeError
from ..ir.graph import Module, TensorType
from .common import Config, DecoderLayer, GatedMLP, attention
from .frontend import Embedding, LMHead, Linear, ModuleList, ParamSpec, RMSNorm, Sym, TraceModule, Tracer
from .qwen3 import Qwen3Attention


def mrope_section(c: Config) -> list[int]:
    return list((c.get("rope_parameters") or {}).get("mrope_section") or c.get("rope_scaling", {}).get(
        "mrope_section") or [24, 20, 20])


class Qwen3VLTextAttention(Qwen3Attention):
    def __init__(self, c: Config, layer: int):
        super().__init__(c, layer)
        self.rope = dict(self.rope, mrope_section=mrope_section(c))

    def forward(self, x: Sym, positions: Sym) -> Sym:
        q, k = x.tracer.emit("mrope", [self.q_norm(self.q_proj(x)), self.k_norm(self.k_proj(x)), positions],
                             **self.rope)
        return self.o_proj(attention(q, k, self.v_proj(x), self.attn))


MakeMLP = Callable[[Config, int], TraceModule]  # (text config, layer) -> the layer's MLP


def dense_mlp(c: Config, layer: int) -> TraceModule:
    return GatedMLP(c.hidden_size, c.intermediate_size)


class Qwen3VLTextModel(TraceModule):
    """`make_mlp` picks each layer's MLP: dense here, sparse MoE for Qwen3-VL-MoE (models/qwen3_vl_moe.py)."""

    def __init__(self, c: Config, deepstack: int, make_mlp: MakeMLP = dense_mlp):
        super().__init__()
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size)
        self.layers = ModuleList([DecoderLayer(c, Qwen3VLTextAttention(c, i), make_mlp(c, i))
                                  for i in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.deepstack = deepstack

    def forward(self, tokens: Sym, positions: Sym) -> Sym:
        x = tokens.tracer.emit("vision_embed", [self.embed_tokens(tokens)])
        for i, layer in enumerate(self.layers):
            x = layer(x, positions)
            if i < self.deepstack:
                x = x.tracer.emit("deepstack_add", [x], level=i)
        return self.norm(x)


class LayerNorm(TraceModule):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = ParamSpec((dim,))
        self.bias = ParamSpec((dim,))
        self.eps = eps

    def forward(self, x: Sym) -> Sym:
        return x.tracer.emit("layer_norm", [x], {"weight": self.weight, "bias": self.bias}, eps=self.eps)


def gelu(x: Sym, approximate: str) -> Sym:
    return x.tracer.emit("gelu", [x], approximate=approximate)


GELU = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}


class Qwen3VLVisionMLP(TraceModule):
    def __init__(self, v: Config):
        super().__init__()
        if v.hidden_act not in GELU:
            raise NanoForgeError(f"config.json: vision_config.hidden_act {v.hidden_act!r} is not supported "
                                 f"({', '.join(GELU)})")
        self.linear_fc1 = Linear(v.hidden_size, v.intermediate_size, bias=True)
        self.linear_fc2 = Linear(v.intermediate_size, v.hidden_size, bias=True)
        self.act = GELU[v.hidden_act]

    def forward(self, x: Sym) -> Sym:
        return self.linear_fc2(gelu(self.linear_fc1(x), self.act))


class Qwen3VLVisionAttention(TraceModule):
    def __init__(self, v: Config):
        super().__init__()
        h = v.hidden_size
        self.qkv = Linear(h, 3 * h, bias=True)
        self.proj = Linear(h, h, bias=True)
        theta = float((v.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        self.attrs = dict(heads=v.num_heads, head_dim=h // v.num_heads, theta=theta, merge=v.spatial_merge_size)

    def forward(self, x: Sym, grid: Sym) -> Sym:
        return self.proj(x.tracer.emit("vision_attention", [self.qkv(x), grid], **self.attrs))


class Qwen3VLVisionBlock(TraceModule):
    def __init__(self, v: Config):
        super().__init__()
        self.norm1 = LayerNorm(v.hidden_size)
        self.norm2 = LayerNorm(v.hidden_size)
        self.attn = Qwen3VLVisionAttention(v)
        self.mlp = Qwen3VLVisionMLP(v)

    def forward(self, x: Sym, grid: Sym) -> Sym:
        x = x + self.attn(self.norm1(x), grid)
        return x + self.mlp(self.norm2(x))


class Qwen3VLVisionPatchMerger(TraceModule):
    """LayerNorm (before the 2x2 shuffle, or after it for the deepstack mergers), fc1, exact GELU, fc2."""

    def __init__(self, v: Config, postshuffle: bool):
        super().__init__()
        self.factor = v.spatial_merge_size ** 2
        wide = v.hidden_size * self.factor
        self.norm = LayerNorm(wide if postshuffle else v.hidden_size)
        self.linear_fc1 = Linear(wide, wide, bias=True)
        self.linear_fc2 = Linear(wide, v.out_hidden_size, bias=True)
        self.postshuffle = postshuffle

    def forward(self, x: Sym) -> Sym:
        merge = lambda y: y.tracer.emit("merge_patches", [y], factor=self.factor)  # noqa: E731
        x = self.norm(merge(x)) if self.postshuffle else merge(self.norm(x))
        return self.linear_fc2(gelu(self.linear_fc1(x), "none"))


class PatchEmbed(TraceModule):
    def __init__(self, v: Config):
        super().__init__()
        self.proj = TraceModule()
        self.proj.weight = ParamSpec((v.hidden_size, v.get("in_channels", 3), v.temporal_patch_size, v.patch_size,
                                      v.patch_size))
        self.proj.bias = ParamSpec((v.hidden_size,))

    def forward(self, pixels: Sym) -> Sym:
        return pixels.tracer.emit("patch_embed", [pixels], {"weight": self.proj.weight, "bias": self.proj.bias})


class Qwen3VLVisionModel(TraceModule):
    def __init__(self, v: Config):
        super().__init__()
        self.patch_embed = PatchEmbed(v)
        self.pos_embed = TraceModule()
        self.pos_embed.weight = ParamSpec((v.num_position_embeddings, v.hidden_size))
        self.blocks = ModuleList([Qwen3VLVisionBlock(v) for _ in range(v.depth)])
        self.merger = Qwen3VLVisionPatchMerger(v, postshuffle=False)
        self.indexes = [int(i) for i in v.get("deepstack_visual_indexes", [])]
        self.deepstack_merger_list = ModuleList([Qwen3VLVisionPatchMerger(v, postshuffle=True) for _ in self.indexes])
        self.merge = v.spatial_merge_size

    def forward(self, pixels: Sym, grid: Sym) -> tuple[Sym, ...]:
        x = self.patch_embed(pixels)
        x = x.tracer.emit("vision_pos_embed", [x, grid], {"weight": self.pos_embed.weight}, merge=self.merge)
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, grid)
            if i in self.indexes:
                deepstack.append(self.deepstack_merger_list.items[self.indexes.index(i)](x))
        return (self.merger(x), *deepstack)


class Qwen3VLModel(TraceModule):
    def __init__(self, c: Config, v: Config, make_mlp: MakeMLP = dense_mlp):
        super().__init__()
        self.visual = Qwen3VLVisionModel(v)
        self.language_model = Qwen3VLTextModel(c, len(self.visual.indexes), make_mlp)


class Qwen3VLForConditionalGeneration(TraceModule):
    def __init__(self, c: Config, v: Config, make_mlp: MakeMLP = dense_mlp):
        super().__init__()
        self.model = Qwen3VLModel(c, v, make_mlp)
        tied = c.get("tie_word_embeddings", False)
        self.lm_head = LMHead(self.model.language_model.embed_tokens.weight if tied
                              else ParamSpec((c.vocab_size, c.hidden_size)))
        self.pixel_width = v.get("in_channels", 3) * v.temporal_patch_size * v.patch_size ** 2

    def forward(self, tokens: Sym, positions: Sym, rows: Sym) -> Sym:
        return self.lm_head(self.model.language_model(tokens, positions), rows)


def build(c: Config, make_mlp: MakeMLP = dense_mlp) -> Qwen3VLForConditionalGeneration:
    vision = c.get("vision_config")
    if not isinstance(vision, dict):
        arch = (c.get("architectures") or ["Qwen3VLForConditionalGeneration"])[0]
        raise NanoForgeError(f"config.json: {arch} needs a 'vision_config' object")
    return Qwen3VLForConditionalGeneration(c, Config(vision, "config.json vision_config"), make_mlp)


def trace_encode(module: Module, model: Qwen3VLForConditionalGeneration, dtype: str) -> None:
    """Trace the (already bound) vision tower into the module's `encode` function."""
    tracer = Tracer(dtype)
    tracer.module = module
    tracer._next = sum(len(n.outputs) for f in module.functions.values() for n in f.nodes)
    pixels, grid = tracer.begin("encode", {"pixels": TensorType(dtype, ("P", model.pixel_width)),
                                           "grid": TensorType("i64", ("I", 3))})
    tracer.end(*model.model.visual(pixels, grid))


def text_config_of(config: dict[str, Any]) -> dict[str, Any]:
    """`text_config` plus the top-level keys the model reads (architectures, tied head, vision_config)."""
    text = config.get("text_config")
    if not isinstance(text, dict):
        arch = (config.get("architectures") or ["Qwen3VLForConditionalGeneration"])[0]
        raise NanoForgeError(f"config.json: {arch} needs a 'text_config' object")
    top = {k: config[k] for k in ("architectures", "tie_word_embeddings", "vision_config", "image_token_id",
                                  "vision_start_token_id") if k in config}
    return {**text, **top}
