"""DeepseekV3ForCausalLM (also Kimi-K2): MLA attention with a low-rank q and a latent KV,
YaRN rope on a separate rope slice, sigmoid group-limited routing with a selection bias,
shared experts, and dense MLPs in the first `first_k_dense_replace` layers.

The checkpoint's MTP layer (`model.layers.{num_hidden_layers}...`) traces into a second IR function,
`draft`, when asked (`trace_model(..., draft=True)`): the building block of MTP speculation, whose
runtime is not built yet."""
from __future__ import annotations

from ..ir.rope import yarn_mscale
from .common import CausalLM, Config, DecoderLayer, GatedMLP, StackedExperts, attention, rope, rope_attrs, rope_settings
from .frontend import LMHead, Linear, ParamSpec, RMSNorm, Sym, TraceModule, concat, split

LORA_NORM_EPS = 1e-6  # HF builds q_a_layernorm / kv_a_layernorm with the default eps, not rms_norm_eps


class DeepseekV3Attention(TraceModule):
    def __init__(self, c: Config, layer: int):
        super().__init__()
        h, bias = c.num_attention_heads, c.get("attention_bias", False)
        nope, rope_d, vd, r = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
        self.q_lora = c.get("q_lora_rank")
        if self.q_lora:
            self.q_a_proj = Linear(c.hidden_size, self.q_lora, bias)
            self.q_a_layernorm = RMSNorm(self.q_lora, LORA_NORM_EPS)
            self.q_b_proj = Linear(self.q_lora, h * (nope + rope_d))
        else:
            self.q_proj = Linear(c.hidden_size, h * (nope + rope_d))
        self.kv_a_proj_with_mqa = Linear(c.hidden_size, r + rope_d, bias)
        self.kv_a_layernorm = RMSNorm(r, LORA_NORM_EPS)
        self.kv_b_proj = Linear(r, h * (nope + vd))
        self.o_proj = Linear(h * vd, c.hidden_size, bias)
        style = "interleaved" if c.get("rope_interleave", True) else "neox"
        self.rope = rope_attrs(c, h, 1, nope + rope_d, rope_d, rope_d, style)
        scale = (nope + rope_d) ** -0.5
        _, scaling = rope_settings(c)
        if scaling and scaling.get("mscale_all_dim"):
            scale *= yarn_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2
        self.split_sizes = [r, rope_d]
        self.attn = dict(kind="mla", layer=layer, heads=h, qk_nope_head_dim=nope, qk_rope_head_dim=rope_d,
                         v_head_dim=vd, kv_lora_rank=r, scale=scale)

    def forward(self, x: Sym, positions: Sym) -> Sym:
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        latent, k_rope = split(self.kv_a_proj_with_mqa(x), self.split_sizes)
        q, k_rope = rope(q, k_rope, positions, self.rope)
        out = attention(q, self.kv_a_layernorm(latent), k_rope, self.attn, kv_b_proj=self.kv_b_proj.weight)
        return self.o_proj(out)


class DeepseekV3TopkRouter(TraceModule):
    def __init__(self, c: Config):
        super().__init__()
        self.weight = ParamSpec((c.n_routed_experts, c.hidden_size))
        self.e_score_correction_bias = ParamSpec((c.n_routed_experts,), dtype="f32")


class DeepseekV3MoE(TraceModule):
    def __init__(self, c: Config):
        super().__init__()
        e = c.n_routed_experts
        self.gate = DeepseekV3TopkRouter(c)
        self.experts = StackedExperts(e, c.hidden_size, c.moe_intermediate_size)
        self.shared_experts = GatedMLP(c.hidden_size, c.moe_intermediate_size * c.get("n_shared_experts", 1)) \
            if c.get("n_shared_experts") else None
        self.attrs = dict(num_experts=e, top_k=c.num_experts_per_tok, scoring="sigmoid",
                          norm_topk_prob=bool(c.get("norm_topk_prob", True)), n_group=c.get("n_group", 1),
                          topk_group=c.get("topk_group", 1),
                          routed_scaling_factor=float(c.get("routed_scaling_factor", 1.0)))

    def forward(self, x: Sym) -> Sym:
        params = self.experts.params(self.gate.weight, self.gate.e_score_correction_bias)
        out = x.tracer.emit("moe", [x], params, **self.attrs)
        return out + self.shared_experts(x) if self.shared_experts else out


def _mlp(c: Config, i: int) -> TraceModule:
    sparse = c.get("n_routed_experts") and i >= c.get("first_k_dense_replace", 0) and i % c.get("moe_layer_freq", 1) == 0
    return DeepseekV3MoE(c) if sparse else GatedMLP(c.hidden_size, c.intermediate_size)


def build(c: Config) -> CausalLM:
    return CausalLM(c, lambda i: DecoderLayer(c, DeepseekV3Attention(c, i), _mlp(c, i)))


class SharedHead(TraceModule):
    def __init__(self, c: Config):
        super().__init__()
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class DeepseekV3MTP(DecoderLayer):
    """The multi-token-prediction layer: x = eh_proj([enorm(embed(t_{i+1})) | hnorm(h_i)]) through one
    more decoder layer (its own KV layer, index num_hidden_layers), then shared_head.norm; logits of the
    token after next through the main model's head, embedding shared with it too (as transformers'
    MtpModel does; the checkpoint's copies of both are left unread). Returns (logits, the normed state
    a next draft step chains on)."""

    def __init__(self, c: Config, main: CausalLM):
        L = c.num_hidden_layers
        super().__init__(c, DeepseekV3Attention(c, L), _mlp(c, L))
        self.prefix = f"model.layers.{L}"
        self.enorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hnorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.eh_proj = Linear(2 * c.hidden_size, c.hidden_size)
        self.shared_head = SharedHead(c)
        object.__setattr__(self, "embed", main.model.embed_tokens)  # shared, bound with the main model
        object.__setattr__(self, "head", LMHead(main.lm_head.weight))

    def forward(self, tokens: Sym, positions: Sym, hidden: Sym, rows: Sym) -> tuple[Sym, Sym]:
        x = self.eh_proj(concat(self.enorm(self.embed(tokens)), self.hnorm(hidden)))
        x = self.shared_head.norm(super().forward(x, positions))
        return self.head(x, rows), x


def build_mtp(c: Config, main: CausalLM) -> DeepseekV3MTP:
    return DeepseekV3MTP(c, main)
