"""Qwen3_5MoeForCausalLM and the text model of Qwen3_5MoeForConditionalGeneration (weights under
`model.language_model.`, config under `text_config`; the vision tower is not traced).

A hybrid: `layer_types` (else every `full_attention_interval`-th layer) says which layers are Gated
DeltaNet (`linear_attn`: one `gdn` node between its linears, keeping per-sequence state) and which
are gated full attention (`self_attn`: q_proj gives a query and a sigmoid gate per head, (1 + w)
q/k norms, rope on the first `partial_rotary_factor` of each head). Every layer's MLP is a softmax
top-k MoE with normalised weights plus a sigmoid-gated shared expert. Every RMSNorm but the GDN's
gated one scales by (1 + weight). Attention layers number the KV pool 0.., GDN layers the state pool 0..
Text only: positions are 1-D, which makes the multimodal rope (mrope) plain rope. The checkpoint's MTP
layer (`mtp.*`, see Qwen3_5MoeMTP) traces into the `draft` function when asked.

Qwen3NextForCausalLM (build_next) is the same model but for three things: its checkpoint fuses the GDN
input projections (`in_proj_qkvz`, `in_proj_ba`, read as Qwen3.5's four by models/fused_gdn.py), some
layers may have a dense SwiGLU MLP (`mlp_only_layers` / `decoder_sparse_step`, Qwen2-MoE's rule), and the
router's `norm_topk_prob` is configurable. The rest (norms, gated attention, partial rope, the gated
delta rule, the sigmoid-gated shared expert) is the same code in transformers (Qwen3.5-MoE's classes
derive from Qwen3-Next's).
"""
from __future__ import annotations

from typing import Any, Callable

from ..errors import NanoForgeError
from .common import Config, GatedMLP, StackedExperts, attention, rope_attrs
from .frontend import Embedding, LMHead, Linear, ModuleList, ParamSpec, Sym, TraceModule, concat

LAYER_TYPES = ("linear_attention", "full_attention")


def layer_types(c: Config) -> list[str]:
    """The config's `layer_types`, else transformers' default: every `full_attention_interval`-th
    layer (default 4) is full attention, the others linear."""
    types = c.get("layer_types")
    if types is None:
        every = int(c.get("full_attention_interval", 4))
        types = ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(c.num_hidden_layers)]
    if len(types) != c.num_hidden_layers or any(t not in LAYER_TYPES for t in types):
        raise NanoForgeError(f"config.json: layer_types {types} must name {c.num_hidden_layers} layers, each one of "
                             f"{', '.join(LAYER_TYPES)}")
    return list(types)


class OffsetRMSNorm(TraceModule):
    """Qwen3_5MoeRMSNorm: x / rms(x) * (1 + weight) in f32 (optionally per `group`-wide slice)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = ParamSpec((dim,))
        self.eps = float(eps)

    def forward(self, x: Sym) -> Sym:
        return x.tracer.emit("offset_rms_norm", [x], {"weight": self.weight}, eps=self.eps)


class WeightOnly(TraceModule):
    """A submodule read only for its weight (conv1d, the GDN's gated norm, q_norm / k_norm)."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.weight = ParamSpec(shape)


class Qwen3_5MoeGatedDeltaNet(TraceModule):
    def __init__(self, c: Config, index: int):
        super().__init__()
        hk, hv = c.linear_num_key_heads, c.linear_num_value_heads
        dk, dv, kern, h = c.linear_key_head_dim, c.linear_value_head_dim, c.linear_conv_kernel_dim, c.hidden_size
        conv = 2 * hk * dk + hv * dv
        self.in_proj_qkv = Linear(h, conv)
        self.in_proj_z = Linear(h, hv * dv)
        self.in_proj_b = Linear(h, hv)
        self.in_proj_a = Linear(h, hv)
        self.conv1d = WeightOnly((conv, 1, kern))
        self.dt_bias = ParamSpec((hv,))
        self.A_log = ParamSpec((hv,))
        self.norm = WeightOnly((dv,))
        self.out_proj = Linear(hv * dv, h)
        self.attrs = dict(layer=index, k_heads=hk, v_heads=hv, k_head_dim=dk, v_head_dim=dv, conv_kernel=kern,
                          eps=float(c.rms_norm_eps))

    def forward(self, x: Sym, positions: Sym) -> Sym:
        params = {"conv": self.conv1d.weight, "dt_bias": self.dt_bias, "A_log": self.A_log, "norm": self.norm.weight}
        core = x.tracer.emit("gdn", [self.in_proj_qkv(x), self.in_proj_z(x), self.in_proj_b(x), self.in_proj_a(x)],
                             params, **self.attrs)
        return self.out_proj(core)


def partial_rotary_factor(c: Config) -> float:
    return float((c.get("rope_parameters") or {}).get("partial_rotary_factor", c.get("partial_rotary_factor", 0.25)))


class Qwen3_5MoeAttention(TraceModule):
    def __init__(self, c: Config, index: int):
        super().__init__()
        heads, kv_heads, hd, bias = c.num_attention_heads, c.num_key_value_heads, c.head_dim(), \
            c.get("attention_bias", False)
        self.q_proj = Linear(c.hidden_size, heads * hd * 2, bias)
        self.k_proj = Linear(c.hidden_size, kv_heads * hd, bias)
        self.v_proj = Linear(c.hidden_size, kv_heads * hd, bias)
        self.o_proj = Linear(heads * hd, c.hidden_size, bias)
        self.q_norm = WeightOnly((hd,))
        self.k_norm = WeightOnly((hd,))
        rotary = int(hd * partial_rotary_factor(c))
        self.prep = dict(eps=float(c.rms_norm_eps), **rope_attrs(c, heads, kv_heads, hd, hd, rotary))
        self.attn = dict(kind="gqa", layer=index, heads=heads, kv_heads=kv_heads, head_dim=hd, scale=hd ** -0.5)

    def forward(self, x: Sym, positions: Sym) -> Sym:
        q, k, gate = x.tracer.emit("gated_qk_norm_rope", [self.q_proj(x), self.k_proj(x), positions],
                                   {"q_norm": self.q_norm.weight, "k_norm": self.k_norm.weight}, **self.prep)
        out = attention(q, k, self.v_proj(x), self.attn)
        return self.o_proj(out.tracer.emit("sigmoid_mul", [out, gate]))


class Qwen3_5MoeSparseMoeBlock(TraceModule):
    def __init__(self, c: Config, norm_topk_prob: bool = True):
        super().__init__()
        e = int(c.num_experts)
        self.gate = WeightOnly((e, c.hidden_size))
        self.experts = StackedExperts(e, c.hidden_size, c.moe_intermediate_size)
        self.shared_expert = GatedMLP(c.hidden_size, c.shared_expert_intermediate_size)
        self.shared_expert_gate = Linear(c.hidden_size, 1)
        self.attrs = dict(num_experts=e, top_k=c.num_experts_per_tok, scoring="softmax",
                          norm_topk_prob=norm_topk_prob)

    def forward(self, x: Sym) -> Sym:
        routed = x.tracer.emit("moe", [x], self.experts.params(self.gate.weight), **self.attrs)
        shared = x.tracer.emit("sigmoid_mul", [self.shared_expert(x), self.shared_expert_gate(x)])
        return routed + shared


class Qwen3_5MoeDecoderLayer(TraceModule):
    def __init__(self, c: Config, kind: str, index: int, mlp: TraceModule | None = None):
        super().__init__()
        if kind == "linear_attention":
            self.linear_attn = Qwen3_5MoeGatedDeltaNet(c, index)
        else:
            self.self_attn = Qwen3_5MoeAttention(c, index)
        self.kind = kind
        self.mlp = mlp if mlp is not None else Qwen3_5MoeSparseMoeBlock(c)
        self.input_layernorm = OffsetRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = OffsetRMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x: Sym, positions: Sym) -> Sym:
        mixer = self.linear_attn if self.kind == "linear_attention" else self.self_attn
        x = x + mixer(self.input_layernorm(x), positions)
        return x + self.mlp(self.post_attention_layernorm(x))


MakeMlp = Callable[[int], TraceModule]  # layer number -> its MLP


def qwen3_next_mlps(c: Config) -> MakeMlp:
    """Qwen3-Next's MLP of each layer (Qwen3NextDecoderLayer): a MoE block unless the layer is in
    `mlp_only_layers`, the config has no experts, or it is not every `decoder_sparse_step`-th layer;
    then a SwiGLU MLP of `intermediate_size`."""
    step, only = c.get("decoder_sparse_step", 1), c.get("mlp_only_layers", [])
    if not isinstance(step, int) or step < 1:
        raise NanoForgeError(f"config.json: decoder_sparse_step {step!r} must be a positive integer")
    if not isinstance(only, list) or not all(isinstance(i, int) for i in only):
        raise NanoForgeError(f"config.json: mlp_only_layers {only!r} must be a list of layer numbers")
    norm = bool(c.get("norm_topk_prob", True))

    def make(i: int) -> TraceModule:
        if i not in only and int(c.get("num_experts", 0)) > 0 and (i + 1) % step == 0:
            return Qwen3_5MoeSparseMoeBlock(c, norm)
        return GatedMLP(c.hidden_size, c.intermediate_size)
    return make


class Qwen3_5MoeTextModel(TraceModule):
    def __init__(self, c: Config, make_mlp: MakeMlp | None = None):
        super().__init__()
        types = layer_types(c)
        index = [types[:i].count(t) for i, t in enumerate(types)]  # KV-pool / state-pool number of each layer
        mlps = [make_mlp(i) if make_mlp else None for i in range(len(types))]
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size)
        self.layers = ModuleList([Qwen3_5MoeDecoderLayer(c, t, n, m) for t, n, m in zip(types, index, mlps)])
        self.norm = OffsetRMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, tokens: Sym, positions: Sym) -> Sym:
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, positions)
        return self.norm(x)


class Qwen3_5MoeModel(TraceModule):
    """The conditional-generation checkpoint's `model`: only its `language_model` is traced."""

    def __init__(self, c: Config):
        super().__init__()
        self.language_model = Qwen3_5MoeTextModel(c)

    def forward(self, tokens: Sym, positions: Sym) -> Sym:
        return self.language_model(tokens, positions)


class Qwen3_5MoeForCausalLM(TraceModule):
    def __init__(self, c: Config, model: TraceModule, embed: Embedding):
        super().__init__()
        self.model = model
        tied = c.get("tie_word_embeddings", False)
        self.lm_head = LMHead(embed.weight if tied else ParamSpec((c.vocab_size, c.hidden_size)))

    def forward(self, tokens: Sym, positions: Sym, rows: Sym) -> Sym:
        return self.lm_head(self.model(tokens, positions), rows)


def build(c: Config) -> Qwen3_5MoeForCausalLM:
    text = Qwen3_5MoeTextModel(c)
    return Qwen3_5MoeForCausalLM(c, text, text.embed_tokens)


def build_next(c: Config) -> Qwen3_5MoeForCausalLM:
    """Qwen3NextForCausalLM: the Qwen3.5-MoE text model with Qwen3-Next's MLP rules (module docstring)."""
    text = Qwen3_5MoeTextModel(c, qwen3_next_mlps(c))
    return Qwen3_5MoeForCausalLM(c, text, text.embed_tokens)


def build_conditional(c: Config) -> Qwen3_5MoeForCausalLM:
    """Qwen3_5MoeForConditionalGeneration's text path; `c` is text_config_of's flattened config."""
    model = Qwen3_5MoeModel(c)
    return Qwen3_5MoeForCausalLM(c, model, model.language_model.embed_tokens)


def text_config_of(config: dict[str, Any]) -> dict[str, Any]:
    """A conditional-generation config.json's `text_config`, with the top-level keys the text path reads."""
    text = config.get("text_config")
    if not isinstance(text, dict):
        raise NanoForgeError("config.json: Qwen3_5MoeForConditionalGeneration needs a 'text_config' object")
    top = {k: config[k] for k in ("architectures", "tie_word_embeddings") if k in config}
    return {**text, **top}


class Qwen3_5MoeMTP(TraceModule):
    """The multi-token-prediction layer of Qwen3.5 checkpoints (Qwen3-Next's has the same form), which
    transformers does not load (`_keys_to_ignore_on_load_unexpected = [r"^mtp.*"]`), so there is no HF reference for it. For
    position i it reads the target's final hidden state h_i (the input of lm_head, after model.norm) and
    the token t_{i+1}, and predicts t_{i+2}:

        x = fc([pre_fc_norm_embedding(embed(t_{i+1})) | pre_fc_norm_hidden(h_i)])     fc: [H, 2H], no bias
        x = mtp.norm(layers.0(x))        layers.0: a full-attention decoder layer with its MoE MLP
        logits = lm_head(x)              embed_tokens and lm_head shared with the main model

    Keys: mtp.fc.weight, mtp.pre_fc_norm_{embedding,hidden}.weight, mtp.layers.0.<the names of a
    model.layers.N full-attention layer>, mtp.norm.weight, at the top level in both the causal-LM and the
    conditional-generation checkpoints. Every norm is the (1 + w) RMSNorm. The attention layer takes the
    next KV-pool index after the model's attention layers; its rope positions are the target's (row i at
    position i). Confirmed against vLLM's qwen3_5_mtp.py / qwen3_next_mtp.py (Qwen3_5MultiTokenPredictor:
    the concat order [embedding | hidden], fc without bias, one `full_attention` Qwen3_5DecoderLayer per
    mtp_num_hidden_layers, Qwen3_5RMSNorm = (1 + w), the `mtp.` key remap and the shared embedding and head)
    and the public config.json files (`mtp_num_hidden_layers: 1`, `mtp_use_dedicated_embeddings: false`).
    Returns (logits, the normed state a next draft step chains on)."""

    def __init__(self, c: Config, main: Qwen3_5MoeForCausalLM, embed: Embedding):
        super().__init__()
        layers = int(c.get("mtp_num_hidden_layers", 0))
        if layers != 1:
            raise NanoForgeError(f"--speculative mtp: mtp_num_hidden_layers {layers}: drafting is built for one MTP "
                                 "layer (chained on itself), as Qwen3.5 checkpoints ship")
        if c.get("mtp_use_dedicated_embeddings", False):
            raise NanoForgeError("--speculative mtp: mtp_use_dedicated_embeddings is true; drafting is built for an MTP "
                                 "layer that shares the model's embedding")
        self.prefix = "mtp"
        h, eps = c.hidden_size, c.rms_norm_eps
        self.fc = Linear(2 * h, h)
        self.pre_fc_norm_embedding = OffsetRMSNorm(h, eps)
        self.pre_fc_norm_hidden = OffsetRMSNorm(h, eps)
        self.layers = ModuleList([Qwen3_5MoeDecoderLayer(c, "full_attention", layer_types(c).count("full_attention"))])
        self.norm = OffsetRMSNorm(h, eps)
        object.__setattr__(self, "embed", embed)  # shared, bound with the main model
        object.__setattr__(self, "head", LMHead(main.lm_head.weight))

    def forward(self, tokens: Sym, positions: Sym, hidden: Sym, rows: Sym) -> tuple[Sym, Sym]:
        x = self.fc(concat(self.pre_fc_norm_embedding(self.embed(tokens)), self.pre_fc_norm_hidden(hidden)))
        for layer in self.layers:
            x = layer(x, positions)
        x = self.norm(x)
        return self.head(x, rows), x


def build_mtp(c: Config, main: Qwen3_5MoeForCausalLM) -> Qwen3_5MoeMTP:
    text = main.model if isinstance(main.model, Qwen3_5MoeTextModel) else main.model.language_model
    return Qwen3_5MoeMTP(c, main, text.embed_tokens)
