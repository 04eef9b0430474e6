"""The layer-level op set: signature, required attrs and output types of every op.

The verifier and the tracing frontend both infer output types here, so a pass that builds a
node with the wrong shape is caught at the node, not three layers later in a kernel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .graph import TensorType

Types = list[TensorType]
Infer = Callable[[Types, dict[str, TensorType], dict[str, Any]], Types]
GROUPS = ("tp", "ep", "dp")  # parallel groups of collectives (parallel/shard_spec.py: which ranks)


class OpTypeError(ValueError):
    """Raised by an infer function when a node's operands do not fit its op."""


@dataclass(frozen=True)
class OpDef:
    name: str
    inputs: tuple[str, ...]  # input names, for docs and arity checks
    params: tuple[str, ...] = ()  # required param slots
    optional_params: tuple[str, ...] = ()
    attrs: tuple[str, ...] = ()  # required attrs
    infer: Infer | None = None
    needs_ctx: bool = False  # the kernel reads the batch context (KV cache, block tables)
    doc: str = ""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise OpTypeError(msg)


def _last(t: TensorType) -> int:
    return int(t.shape[-1])


def _same(i: Types, p, a) -> Types:
    _check(len({t.shape for t in i}) == 1, f"operand shapes differ: {', '.join(map(str, i))}")
    return [i[0]]


def _embed(i: Types, p, a) -> Types:
    _check(i[0].dtype in ("i32", "i64") and len(i[0].shape) == 1, f"tokens must be int[T], got {i[0]}")
    group = a.get("vocab_parallel")
    _check(group in (None,) + GROUPS, f"embed: unknown vocab_parallel group {group!r}")
    w = p["weight"]
    return [TensorType(w.dtype, (i[0].shape[0], w.shape[1]))]


FP8 = "fp8_e4m3"


def _fp8_scales(op: str, p: dict[str, TensorType], a: dict[str, Any], slots: tuple[str, ...]) -> None:
    """A weight stored in FP8 blocks comes with its f32 scales (slot `<slot>_scale_inv`, one per
    fp8_block rows x columns, partial edge blocks included); a high-precision weight with none."""
    for slot in slots:
        w, s = p[slot], p.get(f"{slot}_scale_inv")
        if w.dtype != FP8:
            _check(s is None, f"{op}: {slot}_scale_inv given for a {w.dtype} {slot}")
            continue
        block = a.get("fp8_block")
        _check(isinstance(block, list) and len(block) == 2, f"{op}: an fp8 {slot} needs attr fp8_block=[rows, cols]")
        _check(s is not None, f"{op}: fp8 {slot} {w} without {slot}_scale_inv")
        *lead, rows, cols = (int(d) for d in w.shape)
        want = (*lead, -(-rows // block[0]), -(-cols // block[1]))
        _check(s.dtype == "f32" and tuple(int(d) for d in s.shape) == want,
               f"{op}: {slot}_scale_inv {s} vs f32{list(want)} for {w} in {block[0]}x{block[1]} blocks")


def _linear(i: Types, p, a) -> Types:
    x, w = i[0], p["weight"]
    _check(len(w.shape) == 2 and _last(x) == int(w.shape[1]), f"linear: input {x} vs weight {w}")
    _fp8_scales("linear", p, a, ("weight",))
    if "bias" in p:
        _check(p["bias"].shape == (w.shape[0],), f"linear: bias {p['bias']} vs weight {w}")
    return [TensorType(x.dtype, (*x.shape[:-1], w.shape[0]))]


def _rms_norm(i: Types, p, a) -> Types:
    group = int(a.get("group", _last(i[0])))
    _check(_last(i[0]) % group == 0, f"rms_norm: width {_last(i[0])} not a multiple of group {group}")
    _check(p["weight"].shape == (group,), f"rms_norm: weight {p['weight']} vs group {group}")
    return [i[0]]


def _add_rms_norm(i: Types, p, a) -> Types:
    _same(i, p, a)
    return _rms_norm(i[:1], p, a) + [i[0]]


def _rope_check(q: TensorType, k: TensorType, a: dict) -> None:
    _check(_last(q) == a["heads"] * a["q_head_dim"], f"rope: q {q} vs {a['heads']}x{a['q_head_dim']}")
    _check(_last(k) == a["kv_heads"] * a["k_head_dim"], f"rope: k {k} vs {a['kv_heads']}x{a['k_head_dim']}")
    _check(a["rotary_dim"] <= min(a["q_head_dim"], a["k_head_dim"]), "rope: rotary_dim exceeds head_dim")
    _check(a["style"] in ("neox", "interleaved"), f"rope: unknown style {a['style']!r}")


def _rope(i: Types, p, a) -> Types:
    _rope_check(i[0], i[1], a)
    return [i[0], i[1]]


def _qk_norm_rope(i: Types, p, a) -> Types:
    _rope_check(i[0], i[1], a)
    _check(p["q_norm"].shape == (a["q_head_dim"],), f"qk_norm_rope: q_norm {p['q_norm']}")
    _check(p["k_norm"].shape == (a["k_head_dim"],), f"qk_norm_rope: k_norm {p['k_norm']}")
    return [i[0], i[1]]


def _attention(i: Types, p, a) -> Types:
    q = i[0]
    if a["kind"] == "gqa":
        h, kvh, d = a["heads"], a["kv_heads"], a["head_dim"]
        _check(not p, "gqa attention takes no params")
        _check(h % kvh == 0, f"attention: {h} heads not a multiple of {kvh} kv heads")
        _check(_last(q) == h * d, f"attention: q {q} vs {h}x{d}")
        _check(_last(i[1]) == kvh * d and _last(i[2]) == kvh * d, f"attention: k {i[1]} / v {i[2]}")
        return [TensorType(q.dtype, (q.shape[0], h * d))]
    _check(a["kind"] == "mla", f"attention: unknown kind {a['kind']!r}")
    _check("kv_b_proj" in p, "mla attention needs the kv_b_proj param")
    h, nope, rope, vd, r = (a[k] for k in ("heads", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank"))
    _check(_last(q) == h * (nope + rope), f"mla: q {q}")
    _check(_last(i[1]) == r and _last(i[2]) == rope, f"mla: latent {i[1]} / k_rope {i[2]}")
    _check(p["kv_b_proj"].shape == (h * (nope + vd), r), f"mla: kv_b_proj {p['kv_b_proj']}")
    return [TensorType(q.dtype, (q.shape[0], h * vd))]


def _split(i: Types, p, a) -> Types:
    x = i[0]
    _check(sum(a["sizes"]) == _last(x), f"split: sizes {a['sizes']} do not sum to {_last(x)}")
    return [TensorType(x.dtype, (*x.shape[:-1], s)) for s in a["sizes"]]


def _concat(i: Types, p, a) -> Types:
    x, y = i
    _check(x.dtype == y.dtype and x.shape[:-1] == y.shape[:-1], f"concat: {x} and {y} differ before the last dim")
    return [TensorType(x.dtype, (*x.shape[:-1], _last(x) + _last(y)))]


def _moe(i: Types, p, a) -> Types:
    x, e = i[0], a["num_experts"]
    h = _last(x)
    _check(p["router"].shape == (e, h), f"moe: router {p['router']} vs {e} experts x {h}")
    inter = int(p["w_gate"].shape[1])
    _check(p["w_gate"].shape == (e, inter, h) and p["w_up"].shape == (e, inter, h), f"moe: gate/up {p['w_gate']}")
    _check(p["w_down"].shape == (e, h, inter), f"moe: w_down {p['w_down']}")
    _check(0 < a["top_k"] <= e, f"moe: top_k {a['top_k']} of {e} experts")
    _check(a["scoring"] in ("softmax", "sigmoid"), f"moe: unknown scoring {a['scoring']!r}")
    _fp8_scales("moe", p, a, EXPERT_SLOTS)
    return [x]


def _lm_head(i: Types, p, a) -> Types:
    x, rows, w = i[0], i[1], p["weight"]
    _check(_last(x) == int(w.shape[1]), f"lm_head: input {x} vs weight {w}")
    return [TensorType("f32", (rows.shape[0], w.shape[0]))]


def _all_reduce(i: Types, p, a) -> Types:
    _check(a["group"] in GROUPS, f"all_reduce: unknown group {a['group']!r}")
    return [i[0]]


def _all_gather(i: Types, p, a) -> Types:
    x, dim = i[0], a["dim"] % len(i[0].shape)
    _check(a["group"] in GROUPS and a["size"] >= 1, f"all_gather: group {a['group']!r} of size {a['size']}")
    _check(dim > 0, "all_gather: cannot gather along the symbolic leading dim")
    shape = list(x.shape)
    shape[dim] = int(shape[dim]) * a["size"]
    return [TensorType(x.dtype, tuple(shape))]


EXPERT_SLOTS = ("w_gate", "w_up", "w_down")
SCALE_SLOTS = tuple(f"{s}_scale_inv" for s in EXPERT_SLOTS)
ROPE_ATTRS = ("heads", "kv_heads", "q_head_dim", "k_head_dim", "rotary_dim", "style", "theta")

OPS: dict[str, OpDef] = {
    op.name: op
    for op in [
        OpDef("embed", ("tokens",), ("weight",), infer=_embed, needs_ctx=True,
              doc="row lookup of token embeddings; with vocab_parallel=GROUP the weight holds this rank's "
                  "contiguous share of the vocab and other ids give zeros (then an all_reduce)"),
        OpDef("linear", ("x",), ("weight",), ("bias", "weight_scale_inv"), infer=_linear,
              doc="x @ weight.T (+ bias); an fp8 weight brings its block scales (attr fp8_block)"),
        OpDef("add", ("a", "b"), infer=_same, doc="elementwise sum (residual connection)"),
        OpDef("mul", ("a", "b"), infer=_same, doc="elementwise product"),
        OpDef("silu", ("x",), infer=lambda i, p, a: [i[0]], doc="x * sigmoid(x)"),
        OpDef("silu_mul", ("gate", "up"), infer=_same, doc="silu(gate) * up, fused"),
        OpDef("rms_norm", ("x",), ("weight",), attrs=("eps",), infer=_rms_norm,
              doc="RMSNorm over the last dim, or over each `group`-wide slice (per-head norms)"),
        OpDef("add_rms_norm", ("x", "residual"), ("weight",), attrs=("eps",), infer=_add_rms_norm,
              doc="s = x + residual; returns (rms_norm(s), s)"),
        OpDef("rope", ("q", "k", "positions"), attrs=ROPE_ATTRS, infer=_rope,
              doc="rotary embedding on the last rotary_dim dims of every q and k head"),
        OpDef("qk_norm_rope", ("q", "k", "positions"), ("q_norm", "k_norm"), attrs=("eps",) + ROPE_ATTRS,
              infer=_qk_norm_rope, doc="per-head RMSNorm of q and k, then rope, fused"),
        OpDef("attention", ("q", "k", "v"), optional_params=("kv_b_proj",), attrs=("kind", "layer", "scale"),
              infer=_attention, needs_ctx=True,
              doc="causal attention over the paged KV cache (writes this step's K/V first); GQA or MLA"),
        OpDef("split", ("x",), attrs=("sizes",), infer=_split, doc="split the last dim into pieces"),
        OpDef("concat", ("a", "b"), infer=_concat, doc="join two values along the last dim (MTP's [embedding | hidden])"),
        OpDef("moe", ("x",), ("router", "w_gate", "w_up", "w_down"), ("score_bias",) + SCALE_SLOTS,
              attrs=("num_experts", "top_k", "scoring"), infer=_moe,
              doc="router, top-k, SwiGLU experts, weighted sum (shared experts are separate nodes)"),
        OpDef("lm_head", ("x", "rows"), ("weight",), infer=_lm_head, doc="logits (f32) of the selected rows"),
        OpDef("all_reduce", ("x",), attrs=("group",), infer=_all_reduce, needs_ctx=True,
              doc="sum over the ranks of a parallel group (ctx.comm; no comm = a group of one)"),
        OpDef("all_gather", ("x",), attrs=("group", "dim", "size"), infer=_all_gather, needs_ctx=True,
              doc="concatenate along dim the pieces of the `size` ranks of a group, in rank order"),
    ]
}


def infer_types(op: str, inputs: Types, params: dict[str, TensorType], attrs: dict[str, Any]) -> Types:
    """Check a node's operands against its op and return its output types."""
    d = OPS.get(op)
    if d is None:
        raise OpTypeError(f"unknown op {op!r}")
    if len(inputs) != len(d.inputs):
        raise OpTypeError(f"{op} takes {len(d.inputs)} inputs ({', '.join(d.inputs)}), got {len(inputs)}")
    missing = [s for s in d.params if s not in params]
    extra = [s for s in params if s not in d.params + d.optional_params]
    if missing or extra:
        raise OpTypeError(f"{op}: missing params {missing}, unexpected params {extra}")
    absent = [k for k in d.attrs if k not in attrs]
    if absent:
        raise OpTypeError(f"{op}: missing attrs {absent}")
    return d.infer(inputs, params, attrs)


# -- wide expert parallelism (passes/shard_ep.py): a moe node becomes dispatch -> experts -> combine
def _moe_dispatch(i: Types, p, a) -> Types:
    x, e, k = i[0], a["num_experts"], a["top_k"]
    _check(p["router"].shape == (e, _last(x)), f"moe_dispatch: router {p['router']} vs {e} experts x {_last(x)}")
    _check(0 < k <= e, f"moe_dispatch: top_k {k} of {e} experts")
    _check(a["scoring"] in ("softmax", "sigmoid"), f"moe_dispatch: unknown scoring {a['scoring']!r}")
    return [TensorType(x.dtype, ("Tg", _last(x))), TensorType("f32", ("Tg", k)), TensorType("i64", ("Tg", k)),
            TensorType("i64", ("P",))]


def _grouped_experts(i: Types, p, a) -> Types:
    x, h = i[0], _last(i[0])
    local, inter = int(p["w_gate"].shape[0]), int(p["w_gate"].shape[1])
    _check(a["num_experts"] % local == 0, f"grouped_experts: {local} local experts do not divide {a['num_experts']}")
    _check(p["w_gate"].shape == (local, inter, h) and p["w_up"].shape == (local, inter, h),
           f"grouped_experts: gate/up {p['w_gate']}")
    _check(p["w_down"].shape == (local, h, inter), f"grouped_experts: w_down {p['w_down']}")
    _fp8_scales("grouped_experts", p, a, EXPERT_SLOTS)
    return [x]


def _moe_combine(i: Types, p, a) -> Types:
    return [TensorType(i[0].dtype, ("T", _last(i[0])))]


ROUTING_ATTRS = ("num_experts", "top_k", "scoring", "group")
OPS.update({op.name: op for op in [
    OpDef("moe_dispatch", ("x",), ("router",), ("score_bias",), attrs=ROUTING_ATTRS, infer=_moe_dispatch,
          needs_ctx=True, doc="route this rank's tokens and send each to the EP ranks owning one of its experts "
                              "(all-to-all); also returns the exchange plan moe_combine reverses"),
    OpDef("grouped_experts", ("x", "weights", "ids"), ("w_gate", "w_up", "w_down"), SCALE_SLOTS,
          attrs=("num_experts", "group"),
          infer=_grouped_experts, needs_ctx=True,
          doc="the weighted SwiGLU of this rank's experts (ids outside them contribute nothing)"),
    OpDef("moe_combine", ("y", "plan"), attrs=("group",), infer=_moe_combine, needs_ctx=True,
          doc="send the experts' outputs back to their tokens' ranks and sum them per token"),
]})
