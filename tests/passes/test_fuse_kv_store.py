"""fuse_kv_store: a Triton rope / qk_norm_rope whose k only its GQA attention reads becomes
qk_rope_store (the new K and V rows written to the pool there), and the attention gets kv_stored.

    qk_norm_rope(q, k) -> attention(q, k, v)  =>  qk_rope_store(q, k, v) {layer} -> attention {kv_stored}

The rewritten node keeps the rope node's output names; nodes on other providers, FP8 KV, a k read
elsewhere and a v made after the rope stay as they are. Off unless Options(enabled=True).
"""
from __future__ import annotations

import pytest
from irtext import ir, run_fn

from nanoforge.passes.fuse_kv_store import Options

ON = Options(enabled=True)
ROPE = ('{heads=2, kv_heads=1, q_head_dim=4, k_head_dim=4, rotary_dim=4, style="neox", theta=10000.0}')
ATTN = '{kind="gqa", layer=0, heads=2, kv_heads=1, head_dim=4, scale=0.5}'


def layer(rope_provider: str = "triton", attn_provider: str = "triton", attn: str = ATTN, extra: str = "",
          norms: bool = True) -> str:
    call = (f"qk_norm_rope(%q, %k, %positions, q_norm=$q_norm.weight, k_norm=$k_norm.weight) "
            f"{{eps=1e-06, {ROPE[1:-1]}}}" if norms else f"rope(%q, %k, %positions) {ROPE}")
    params = "\n    param $q_norm.weight: f32[4] <- q_norm.weight\n    param $k_norm.weight: f32[4] <- k_norm.weight" \
        if norms else ""
    return f"""
    module{params}

    func forward(%q: f32[T,8], %k: f32[T,4], %v: f32[T,4], %positions: i64[T]) {{
      %0: f32[T,8], %1: f32[T,4] = {call} provider={rope_provider}  @attn
      %2: f32[T,8] = attention(%0, %1, %v) {attn} provider={attn_provider}  @attn{extra}
      return %2
    }}
"""


ROUNDTRIP = [("fuse_kv_store", layer(), ON)]


def test_qk_norm_rope_and_attention_on_triton_fuse():
    assert run_fn("fuse_kv_store", layer(), ON) == ir("""
        func forward(%q: f32[T,8], %k: f32[T,4], %v: f32[T,4], %positions: i64[T]) {
          %0: f32[T,8], %1: f32[T,4] = qk_rope_store(%q, %k, %v, %positions, q_norm=$q_norm.weight, k_norm=$k_norm.weight) {eps=1e-06, heads=2, kv_heads=1, q_head_dim=4, k_head_dim=4, rotary_dim=4, style="neox", theta=10000.0, layer=0} provider=triton  @attn
          %2: f32[T,8] = attention(%0, %1, %v) {kind="gqa", layer=0, heads=2, kv_heads=1, head_dim=4, scale=0.5, kv_stored=true} provider=triton  @attn
          return %2
        }
    """)


def test_plain_rope_fuses_without_norms():
    out = run_fn("fuse_kv_store", layer(norms=False), ON)
    assert "qk_rope_store(%q, %k, %v, %positions) {heads=2" in out and "kv_stored=true" in out


@pytest.mark.parametrize("case", ["off", "cpu attention", "torch rope", "fp8 kv", "k read twice"])
def test_left_alone(case):
    text = {"off": layer(), "cpu attention": layer(attn_provider="cpu"), "torch rope": layer(rope_provider="torch"),
            "fp8 kv": layer(attn=ATTN[:-1] + ', kv_dtype="fp8_e4m3"}'),
            "k read twice": layer().replace("return %2", "return %2, %1")}[case]
    assert run_fn("fuse_kv_store", text, Options() if case == "off" else ON) == run_fn(
        "fuse_kv_store", text, Options(enabled=False))
    assert "qk_rope_store" not in run_fn("fuse_kv_store", text, Options() if case == "off" else ON)


def test_v_made_after_the_rope_stays():
    """qk_rope_store runs where the rope node was: a v computed later does not exist there yet."""
    text = layer().replace("      %2: f32[T,8] = attention(%0, %1, %v)",
                           "      %3: f32[T,4] = mul(%v, %v)  @attn\n      %2: f32[T,8] = attention(%0, %1, %3)")
    assert "mul(%v, %v)" in text and "qk_rope_store" not in run_fn("fuse_kv_store", text, ON)
