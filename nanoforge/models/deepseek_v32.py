"""DeepseekV32ForCausalLM and GlmMoeDsaForCausalLM (GLM-5): DeepSeek-V3's MLA and MoE plus DeepSeek
Sparse Attention (DSA). A lightning indexer (op `indexer`) scores every cached token for each query with
its own small multi-head projections and keeps the `index_topk` best; MLA then attends over those tokens
only (op `sparse_mla`). A query with at most `index_topk` tokens before it keeps them all: dense MLA.

As transformers computes them: the indexer's query comes from MLA's `q_resid` (q_a_layernorm output),
its key from the layer input through `wk` and a LayerNorm (weight and bias); rope on the first
`qk_rope_head_dim` dims (DeepSeek-V3.2: half-split, GLM-5: interleaved pairs); its keys are cached in
the model's dtype (transformers skips the reference code's FP8 scoring); `weights_proj` runs in f32.
The main MLA rope is always interleaved here, whatever `rope_interleave` says.

GLM-5's `indexer_types` may mark a layer "shared": it has no indexer and attends over the top-k of the
nearest layer before it that has one."""
from __future__ import annotations

from ..errors import NanoForgeError
from .common import CausalLM, Config, DecoderLayer, GatedMLP, rope, rope_settings
from .deepseek_v3 import DeepseekV3Attention, DeepseekV3MoE
from .frontend import Linear, ParamSpec, Sym, TraceModule, split

INDEXER_NORM_EPS = 1e-6  # transformers builds the indexer's k_norm (a LayerNorm) with this eps


class LayerNorm(TraceModule):
    """A LayerNorm's weight and bias, applied inside the indexer op."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = ParamSpec((dim,))
        self.bias = ParamSpec((dim,))


class F32Weight(TraceModule):
    """A projection transformers keeps in f32 whatever the model's dtype (`_keep_in_fp32_modules`)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = ParamSpec((out_features, in_features), dtype="f32")


class DsaIndexer(TraceModule):
    def __init__(self, c: Config, layer: int, style: str):
        super().__init__()
        h, d = int(c.index_n_heads), int(c.index_head_dim)
        self.wq_b = Linear(c.q_lora_rank, h * d)
        self.wk = Linear(c.hidden_size, d)
        self.k_norm = LayerNorm(d)
        self.weights_proj = F32Weight(c.hidden_size, h)
        theta, scaling = rope_settings(c)
        self.attrs = dict(layer=layer, heads=h, head_dim=d, rope_dim=int(c.qk_rope_head_dim), style=style,
                          theta=theta, topk=int(c.index_topk), scale=d ** -0.5, eps=INDEXER_NORM_EPS)
        if scaling:
            self.attrs["scaling"] = scaling

    def forward(self, x: Sym, q_resid: Sym, positions: Sym) -> Sym:
        params = {"weights_proj": self.weights_proj.weight, "k_norm": self.k_norm.weight,
                  "k_norm_bias": self.k_norm.bias}
        return x.tracer.emit("indexer", [x, self.wq_b(q_resid), self.wk(x), positions], params, **self.attrs)


class TopkCarry:
    """The latest indexer output while one model is traced: what a GLM-5 "shared" layer attends over."""

    def __init__(self) -> None:
        self.ids: Sym | None = None
        self.layer = -1


class DsaAttention(DeepseekV3Attention):
    def __init__(self, c: Config, layer: int, carry: TopkCarry, style: str, full: bool):
        super().__init__(c, layer)
        if not self.q_lora:
            raise NanoForgeError(f"config.json: {c.architectures[0]} needs q_lora_rank (its indexer reads q_resid)")
        self.rope["style"] = "interleaved"
        self.indexer = DsaIndexer(c, layer, style) if full else None
        object.__setattr__(self, "carry", carry)
        self.topk = int(c.index_topk)
        self.attn = {k: v for k, v in self.attn.items() if k != "kind"}

    def forward(self, x: Sym, positions: Sym) -> Sym:
        q_resid = self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_b_proj(q_resid)
        latent, k_rope = split(self.kv_a_proj_with_mqa(x), self.split_sizes)
        q, k_rope = rope(q, k_rope, positions, self.rope)
        layer = self.attn["layer"]
        if self.indexer is not None:
            self.carry.ids, self.carry.layer = self.indexer(x, q_resid, positions), layer
        elif self.carry.ids is None:
            raise NanoForgeError(f"config.json: layer {layer} shares the top-k of an earlier indexer "
                                 "(indexer_types 'shared'), but no layer before it has one")
        owner = "this layer's" if self.carry.layer == layer else f"layer {self.carry.layer}'s"
        selection = f"top-{self.topk} of {owner} indexer; dense MLA at <= {self.topk} tokens of context"
        out = x.tracer.emit("sparse_mla", [q, self.kv_a_layernorm(latent), k_rope, self.carry.ids],
                            {"kv_b_proj": self.kv_b_proj.weight}, **self.attn, topk=self.topk, selection=selection)
        return self.o_proj(out)


def indexer_types(c: Config) -> list[str]:
    """Per layer "full" (its own indexer) or "shared" (GLM-5), derived as transformers'
    GlmMoeDsaConfig does when config.json lists none; DeepSeek-V3.2 has an indexer in every layer."""
    n = int(c.num_hidden_layers)
    if c.get("indexer_types"):
        kinds = list(c.indexer_types)
    elif (pattern := c.get("index_topk_pattern")) is not None:
        kinds = [{"F": "full", "S": "shared"}.get(ch, ch) for ch in pattern] if isinstance(pattern, str) \
            else list(pattern)
    else:
        freq, offset = max(int(c.get("index_topk_freq", 1)), 1), int(c.get("index_skip_topk_offset", 2))
        kinds = ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(n)]
    if len(kinds) < n:
        raise NanoForgeError(f"config.json: indexer_types lists {len(kinds)} layers, the model has {n}")
    if bad := sorted(set(kinds) - {"full", "shared"}):
        raise NanoForgeError(f"config.json: indexer_types holds {bad}; expected 'full' or 'shared'")
    return kinds


def _mlp(c: Config, i: int) -> TraceModule:
    """MoE where `mlp_layer_types` says "sparse" (default: after the first `first_k_dense_replace` layers)."""
    kinds = c.get("mlp_layer_types")
    sparse = kinds[i] == "sparse" if kinds else i >= int(c.get("first_k_dense_replace", 3))
    return DeepseekV3MoE(c) if sparse else GatedMLP(c.hidden_size, c.intermediate_size)


def _build(c: Config, indexer_style: str, full: list[bool]) -> CausalLM:
    carry = TopkCarry()
    return CausalLM(c, lambda i: DecoderLayer(c, DsaAttention(c, i, carry, indexer_style, full[i]), _mlp(c, i)))


def build_v32(c: Config) -> CausalLM:
    return _build(c, "neox", [True] * int(c.num_hidden_layers))


def build_glm5(c: Config) -> CausalLM:
    return _build(c, "interleaved", [kind == "full" for kind in indexer_types(c)])
