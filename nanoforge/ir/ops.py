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


def _qk_rope_store(i: Types, p, a) -> Types:
    _rope_check(i[0], i[1], a)
    _check(("q_norm" in p) == ("k_norm" in p), "qk_rope_store: q_norm and k_norm come together")
    if "q_norm" in p:
        _qk_norm_rope(i, p, a)
        _check("eps" in a, "qk_rope_store: per-head norms need eps")
    _check(i[2].shape == i[1].shape, f"qk_rope_store: v {i[2]} vs k {i[1]}")
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
    return [TensorType(x.dtype, (rows.shape[0], w.shape[0]))]


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
        OpDef("qk_rope_store", ("q", "k", "v", "positions"), optional_params=("q_norm", "k_norm"),
              attrs=("layer",) + ROPE_ATTRS, infer=_qk_rope_store, needs_ctx=True,
              doc="rope (after per-head RMSNorm with q_norm / k_norm) of q and k, and this step's k and v "
                  "written to the layer's paged KV pool, fused (passes/fuse_kv_store.py: its attention has "
                  "kv_stored)"),
        OpDef("attention", ("q", "k", "v"), optional_params=("kv_b_proj",), attrs=("kind", "layer", "scale"),
              infer=_attention, needs_ctx=True,
              doc="causal attention over the paged KV cache (writes this step's K/V first unless attr "
                  "kv_stored); GQA or MLA"),
        OpDef("split", ("x",), attrs=("sizes",), infer=_split, doc="split the last dim into pieces"),
        OpDef("concat", ("a", "b"), infer=_concat, doc="join two values along the last dim (MTP's [embedding | hidden])"),
        OpDef("moe", ("x",), ("router", "w_gate", "w_up", "w_down"), ("score_bias",) + SCALE_SLOTS,
              attrs=("num_experts", "top_k", "scoring"), infer=_moe,
              doc="router, top-k, SwiGLU experts, weighted sum (shared experts are separate nodes)"),
        OpDef("lm_head", ("x", "rows"), ("weight",), infer=_lm_head,
              doc="logits of the selected rows in the activations' dtype (as HF; the sampler widens them)"),
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


# -- DeepSeek Sparse Attention (DeepSeek-V3.2, GLM-5; models/deepseek_v32.py): the indexer picks each query's
# top-k cached tokens, sparse_mla attends over those only. A query with at most topk tokens before it keeps
# them all, so short contexts are dense MLA.
def _indexer(i: Types, p, a) -> Types:
    x, q, k, pos = i
    h, d, r = a["heads"], a["head_dim"], a["rope_dim"]
    _check(_last(q) == h * d and _last(k) == d, f"indexer: q {q} / k {k} vs {h} heads x {d}")
    _check(0 < r <= d and r % 2 == 0, f"indexer: rope_dim {r} of head_dim {d}")
    _check(a["style"] in ("neox", "interleaved"), f"indexer: unknown rope style {a['style']!r}")
    _check(p["weights_proj"].shape == (h, _last(x)), f"indexer: weights_proj {p['weights_proj']} vs {h} x {_last(x)}")
    _check(p["k_norm"].shape == (d,) and p["k_norm_bias"].shape == (d,), f"indexer: k_norm {p['k_norm']}")
    _check(pos.dtype in ("i32", "i64") and a["topk"] >= 1, f"indexer: positions {pos}, topk {a['topk']}")
    return [TensorType("i32", (q.shape[0], a["topk"]))]


def _sparse_mla(i: Types, p, a) -> Types:
    ids = i[3]
    _check(ids.dtype == "i32" and ids.shape == (i[0].shape[0], a["topk"]),
           f"sparse_mla: token ids {ids} vs i32[{i[0].shape[0]},{a['topk']}]")
    return _attention(i[:3], p, {**a, "kind": "mla"})


OPS.update({op.name: op for op in [
    OpDef("indexer", ("x", "q", "k", "positions"), ("weights_proj", "k_norm", "k_norm_bias"),
          attrs=("layer", "heads", "head_dim", "rope_dim", "style", "theta", "topk", "scale", "eps"),
          infer=_indexer, needs_ctx=True,
          doc="DSA lightning indexer: layer-norm and rope (first rope_dim dims) its key, store it in the layer's "
              "indexer cache, score each cached token per query (sum over heads of weight * relu(q.k * scale)) "
              "and return the top-k token positions, -1 padded; a query with <= topk tokens before it keeps all"),
    OpDef("sparse_mla", ("q", "latent", "k_rope", "token_ids"), ("kv_b_proj",),
          attrs=("layer", "heads", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank", "scale",
                 "topk"),
          infer=_sparse_mla, needs_ctx=True,
          doc="MLA (writes this step's latent and rope key first) over only the cached tokens each query's "
              "token_ids name (-1: none); at most topk tokens of context it is dense MLA"),
]})


# -- hybrid linear-attention models (Qwen3.5-MoE, models/qwen3_5_moe.py): Gated DeltaNet layers keep a
# fixed-size state per sequence (ctx.state, sized by plan_memory) instead of paged KV; gated full attention
def _offset_rms_norm(i: Types, p, a) -> Types:
    return _rms_norm(i, p, a)


def _gated_qk_norm_rope(i: Types, p, a) -> Types:
    qg, k = i[0], i[1]
    h, d = a["heads"], a["q_head_dim"]
    _check(_last(qg) == 2 * h * d, f"gated_qk_norm_rope: q {qg} vs {h} heads x 2 x {d} (query | gate per head)")
    _rope_check(TensorType(qg.dtype, (*qg.shape[:-1], h * d)), k, a)
    _check(a["style"] == "neox", "gated_qk_norm_rope: only neox rope (on the first rotary_dim dims of a head)")
    _check(p["q_norm"].shape == (d,) and p["k_norm"].shape == (a["k_head_dim"],),
           f"gated_qk_norm_rope: q_norm {p['q_norm']} / k_norm {p['k_norm']}")
    q = TensorType(qg.dtype, (*qg.shape[:-1], h * d))
    return [q, k, q]


def _sigmoid_mul(i: Types, p, a) -> Types:
    x, g = i
    _check(x.shape[:-1] == g.shape[:-1] and _last(g) in (1, _last(x)), f"sigmoid_mul: x {x} vs gate {g}")
    return [x]


def _gdn(i: Types, p, a) -> Types:
    qkv, z, b, g = i
    hk, hv, dk, dv, kern = (int(a[n]) for n in ("k_heads", "v_heads", "k_head_dim", "v_head_dim", "conv_kernel"))
    conv = 2 * hk * dk + hv * dv
    _check(hv % hk == 0, f"gdn: {hv} value heads not a multiple of {hk} key heads")
    _check(_last(qkv) == conv, f"gdn: qkv {qkv} vs 2 x {hk}x{dk} + {hv}x{dv}")
    _check(_last(z) == hv * dv and _last(b) == hv and _last(g) == hv, f"gdn: z {z} / b {b} / a {g} vs {hv} heads of {dv}")
    _check(p["conv"].shape == (conv, 1, kern), f"gdn: conv {p['conv']} vs [{conv},1,{kern}]")
    _check(p["dt_bias"].shape == (hv,) and p["A_log"].shape == (hv,), f"gdn: dt_bias {p['dt_bias']} / A_log {p['A_log']}")
    _check(p["norm"].shape == (dv,), f"gdn: norm {p['norm']} vs {dv}")
    return [TensorType(qkv.dtype, (qkv.shape[0], hv * dv))]


GDN_ATTRS = ("layer", "k_heads", "v_heads", "k_head_dim", "v_head_dim", "conv_kernel", "eps")
OPS.update({op.name: op for op in [
    OpDef("offset_rms_norm", ("x",), ("weight",), attrs=("eps",), infer=_offset_rms_norm,
          doc="RMSNorm with a (1 + weight) gain, all in f32 (Qwen3.5 / Qwen3-Next norms; optional `group`)"),
    OpDef("gated_qk_norm_rope", ("q_gate", "k", "positions"), ("q_norm", "k_norm"), attrs=("eps",) + ROPE_ATTRS,
          infer=_gated_qk_norm_rope,
          doc="q_proj's per-head [query | gate] halves split, (1 + weight) per-head RMSNorm of q and k, neox rope "
              "on the first rotary_dim dims of each head; returns (q, k, gate)"),
    OpDef("sigmoid_mul", ("x", "gate"), infer=_sigmoid_mul,
          doc="x * sigmoid(gate); a gate of width 1 scales whole rows (gated attention output, shared expert)"),
    OpDef("gdn", ("qkv", "z", "b", "a"), ("conv", "dt_bias", "A_log", "norm"), attrs=GDN_ATTRS, infer=_gdn,
          needs_ctx=True,
          doc="Gated DeltaNet core: causal depthwise conv1d + silu over [q|k|v] with the sequence's conv window, "
              "gated delta rule with its recurrent state (both in ctx.state[layer], reset at position 0), "
              "gated RMSNorm by silu(z); per-sequence state, no paged KV"),
]})


# -- vision-language models (Qwen3-VL, models/qwen3_vl.py): the vision tower is its own function `encode`
# over the patches of a batch of images (leading dim P; M after the 2x2 merge; `grid` is i64[I, 3] of
# (t, h, w) patches per image); `forward` takes the encoder's outputs through the batch context
def _patch_embed(i: Types, p, a) -> Types:
    x, w = i[0], p["weight"]
    _check(len(w.shape) == 5 and _last(x) == int(w.shape[1] * w.shape[2] * w.shape[3] * w.shape[4]),
           f"patch_embed: pixels {x} vs conv3d weight {w}")
    _check(p["bias"].shape == (w.shape[0],), f"patch_embed: bias {p['bias']} vs weight {w}")
    return [TensorType(w.dtype, (x.shape[0], w.shape[0]))]


def _grid_input(op: str, grid: TensorType) -> None:
    _check(grid.dtype == "i64" and len(grid.shape) == 2 and grid.shape[1] == 3, f"{op}: grid {grid} must be i64[I,3]")


def _vision_pos_embed(i: Types, p, a) -> Types:
    _grid_input("vision_pos_embed", i[1])
    _check(len(p["weight"].shape) == 2 and p["weight"].shape[1] == _last(i[0]),
           f"vision_pos_embed: table {p['weight']} vs x {i[0]}")
    return [i[0]]


def _layer_norm(i: Types, p, a) -> Types:
    _check(p["weight"].shape == (_last(i[0]),) and p["bias"].shape == (_last(i[0]),),
           f"layer_norm: weight {p['weight']} / bias {p['bias']} vs x {i[0]}")
    return [i[0]]


def _gelu(i: Types, p, a) -> Types:
    _check(a["approximate"] in ("none", "tanh"), f"gelu: unknown approximate {a['approximate']!r}")
    return [i[0]]


def _vision_attention(i: Types, p, a) -> Types:
    qkv, h, d = i[0], a["heads"], a["head_dim"]
    _grid_input("vision_attention", i[1])
    _check(_last(qkv) == 3 * h * d and d % 4 == 0, f"vision_attention: qkv {qkv} vs 3 x {h} heads x {d}")
    return [TensorType(qkv.dtype, (qkv.shape[0], h * d))]


def _merge_patches(i: Types, p, a) -> Types:
    return [TensorType(i[0].dtype, ("M", _last(i[0]) * int(a["factor"])))]


def _mrope(i: Types, p, a) -> Types:
    _rope_check(i[0], i[1], a)
    sec = a["mrope_section"]
    _check(a["style"] == "neox" and isinstance(sec, list) and len(sec) == 3 and sum(sec) == a["rotary_dim"] // 2,
           f"mrope: mrope_section {sec} must be 3 sizes summing to rotary_dim/2 = {a['rotary_dim'] // 2} (neox)")
    return [i[0], i[1]]


OPS.update({op.name: op for op in [
    OpDef("patch_embed", ("pixels",), ("weight", "bias"), infer=_patch_embed,
          doc="Conv3d with stride = kernel over each flattened (C, t, p, p) patch: one row a patch"),
    OpDef("vision_pos_embed", ("x", "grid"), ("weight",), attrs=("merge",), infer=_vision_pos_embed,
          doc="x + the learned square position table bilinearly resampled (align_corners) to each image's "
              "h x w grid, in merge-block patch order"),
    OpDef("layer_norm", ("x",), ("weight", "bias"), attrs=("eps",), infer=_layer_norm, doc="LayerNorm over the last dim"),
    OpDef("gelu", ("x",), attrs=("approximate",), infer=_gelu, doc="GELU, exact or tanh-approximated"),
    OpDef("vision_attention", ("qkv", "grid"), attrs=("heads", "head_dim", "theta", "merge"), infer=_vision_attention,
          doc="split [q|k|v], 2-D rotary (row, column of each patch, in merge-block order) on q and k, then "
              "bidirectional attention within each image frame"),
    OpDef("merge_patches", ("x",), attrs=("factor",), infer=_merge_patches,
          doc="concatenate each run of `factor` consecutive patch rows (one merge block) into one row"),
    OpDef("mrope", ("q", "k", "positions"), attrs=ROPE_ATTRS + ("mrope_section",), infer=_mrope, needs_ctx=True,
          doc="interleaved multimodal rope: frequency j uses the h (j % 3 == 1) or w (j % 3 == 2) position within "
              "mrope_section, else t; positions (t, h, w) from ctx.vision, else `positions` on every axis"),
    OpDef("vision_embed", ("x",), infer=lambda i, p, a: [i[0]], needs_ctx=True,
          doc="replace the rows of image placeholder tokens with the encoder's embeddings (ctx.vision; none: x)"),
    OpDef("deepstack_add", ("x",), attrs=("level",), infer=lambda i, p, a: [i[0]], needs_ctx=True,
          doc="add the encoder's deepstack features of `level` to the rows of image tokens (ctx.vision; none: x)"),
]})
