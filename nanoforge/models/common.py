"""Building blocks shared by the decoder-only families: config access, rope attrs, the
SwiGLU MLP, stacked MoE experts, the decoder layer and the causal-LM shell."""
from __future__ import annotations

from typing import Any, Callable

from ..errors import NanoForgeError
from .frontend import Embedding, LMHead, Linear, ModuleList, ParamSpec, RMSNorm, Sym, TraceModule, silu


class Config:
    """Attribute access to a HF config dict; a missing key is a one-line error naming it."""

    def __init__(self, data: dict[str, Any], where: str = "config.json"):
        object.__setattr__(self, "_data", data)
        object.__setattr__(self, "_where", where)

    def __getattr__(self, name: str) -> Any:
        if name in self._data and self._data[name] is not None:
            return self._data[name]
        arch = (self._data.get("architectures") or ["?"])[0]
        raise NanoForgeError(f"{self._where}: missing '{name}', which {arch} needs")

    def get(self, name: str, default: Any = None) -> Any:
        v = self._data.get(name)
        return default if v is None else v

    def head_dim(self) -> int:
        return int(self.get("head_dim") or self.hidden_size // self.num_attention_heads)


def rope_settings(c: Config) -> tuple[float, dict | None]:
    """(theta, scaling) from either `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`."""
    params = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or params
    theta = float(params.get("rope_theta", c.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ("linear", "llama3", "yarn"):
        raise NanoForgeError(f"config.json: unsupported rope scaling type {kind!r} (supported: linear, llama3, yarn)")
    out = {"type": kind}
    out.update({k: v for k, v in scaling.items() if k not in ("rope_type", "type", "rope_theta") and v is not None})
    if kind == "yarn" and "original_max_position_embeddings" not in out:
        out["original_max_position_embeddings"] = c.max_position_embeddings
    return theta, out


def rope_attrs(c: Config, heads: int, kv_heads: int, q_head_dim: int, k_head_dim: int, rotary_dim: int,
               style: str = "neox") -> dict[str, Any]:
    theta, scaling = rope_settings(c)
    attrs = dict(heads=heads, kv_heads=kv_heads, q_head_dim=q_head_dim, k_head_dim=k_head_dim,
                 rotary_dim=rotary_dim, style=style, theta=theta)
    if scaling:
        attrs["scaling"] = scaling
    return attrs


def rope(q: Sym, k: Sym, positions: Sym, attrs: dict[str, Any]) -> tuple[Sym, Sym]:
    return q.tracer.emit("rope", [q, k, positions], **attrs)


def attention(q: Sym, k: Sym, v: Sym, attrs: dict[str, Any], kv_b_proj: ParamSpec | None = None) -> Sym:
    return q.tracer.emit("attention", [q, k, v], {"kv_b_proj": kv_b_proj}, **attrs)


class GatedMLP(TraceModule):
    """down_proj(silu(gate_proj(x)) * up_proj(x)), the SwiGLU MLP of every family here."""

    def __init__(self, hidden: int, inter: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(hidden, inter, bias)
        self.up_proj = Linear(hidden, inter, bias)
        self.down_proj = Linear(inter, hidden, bias)

    def forward(self, x: Sym) -> Sym:
        return self.down_proj(silu(self.gate_proj(x)) * self.up_proj(x))


class StackedExperts(TraceModule):
    """Experts stored on disk as `experts.{i}.{gate,up,down}_proj.weight`, stacked per kind."""

    def __init__(self, num: int, hidden: int, inter: int):
        super().__init__()
        self.num = num
        self.gate_proj = ParamSpec((num, inter, hidden), layout="stack")
        self.up_proj = ParamSpec((num, inter, hidden), layout="stack")
        self.down_proj = ParamSpec((num, hidden, inter), layout="stack")

    def bind(self, prefix: str = "") -> "StackedExperts":
        super().bind(prefix)
        for kind in ("gate_proj", "up_proj", "down_proj"):
            getattr(self, kind).keys = [f"{prefix}.{i}.{kind}.weight" for i in range(self.num)]
        return self

    def params(self, router: ParamSpec, score_bias: ParamSpec | None = None) -> dict[str, ParamSpec | None]:
        return {"router": router, "w_gate": self.gate_proj, "w_up": self.up_proj, "w_down": self.down_proj,
                "score_bias": score_bias}


class DecoderLayer(TraceModule):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, c: Config, self_attn: TraceModule, mlp: TraceModule):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x: Sym, positions: Sym) -> Sym:
        x = x + self.self_attn(self.input_layernorm(x), positions)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(TraceModule):
    def __init__(self, c: Config, make_layer: Callable[[int], TraceModule]):
        super().__init__()
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size)
        self.layers = ModuleList([make_layer(i) for i in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, tokens: Sym, positions: Sym) -> Sym:
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, positions)
        return self.norm(x)


class CausalLM(TraceModule):
    def __init__(self, c: Config, make_layer: Callable[[int], TraceModule]):
        super().__init__()
        self.model = DecoderModel(c, make_layer)
        tied = c.get("tie_word_embeddings", False)
        self.lm_head = LMHead(self.model.embed_tokens.weight if tied else ParamSpec((c.vocab_size, c.hidden_size)))

    def forward(self, tokens: Sym, positions: Sym, rows: Sym) -> Sym:
        return self.lm_head(self.model(tokens, positions), rows)
