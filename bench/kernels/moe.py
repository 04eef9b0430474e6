"""GPU benchmark and tile tuning of the Triton MoE provider (nanoforge/kernels/triton/moe.py); the
tuned tiles go into moe.py's pick_config by hand. From the repo root:

    python -m bench.kernels.moe [T ...] [--tune]     # default T: 1 16 64 256 1024 2048 4096
"""
from __future__ import annotations

import torch

from nanoforge.kernels.torch_ref import _route
from nanoforge.kernels.triton.moe import _p2, fused_experts, moe, pick_config


def _bench_problem(T, E, top_k, H, I, layers, seed, scoring="softmax"):
    """x and `layers` independent random bf16 MoE layers (so the timed loop streams weights from HBM
    as a model does, instead of re-reading one layer from L2), with each layer's routing."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    dt = torch.bfloat16

    def r(*shape, fan_in):
        return torch.randn(*shape, device="cuda", dtype=dt, generator=g) * fan_in ** -0.5

    x = r(T, H, fan_in=1)
    attrs = dict(num_experts=E, top_k=top_k, scoring=scoring, norm_topk_prob=True)
    if scoring == "sigmoid" and E % 8 == 0:
        attrs.update(n_group=8, topk_group=3)
    ls = []
    for _ in range(layers):
        ws = dict(router=r(E, H, fan_in=H), w_gate=r(E, I, H, fan_in=H), w_up=r(E, I, H, fan_in=H),
                  w_down=r(E, H, I, fan_in=I))
        ws["route"] = _route(x, ws["router"], None, **attrs)
        ls.append(ws)
    return x, attrs, ls


def _deep_gemm_fn(x, ls, E):
    """deep_gemm's m-grouped contiguous bf16 GEMMs (gate_up as one [2I, H] GEMM, then down) on the
    same routing, GEMMs only (no routing, permute, activation or reduce); None if not importable."""
    try:
        import deep_gemm
    except ImportError:
        return None
    T, H = x.shape
    I = ls[0]["w_gate"].shape[1]
    align = deep_gemm.get_mk_alignment_for_contiguous_layout()
    runs = []
    for l in ls:
        counts = torch.bincount(l["route"][1].reshape(-1), minlength=E).tolist()  # host sync: bench setup
        padded = [(c + align - 1) // align * align for c in counts]
        m_idx = torch.cat([torch.full((p,), e, dtype=torch.int32) for e, p in enumerate(padded)]).cuda()
        m = m_idx.numel()
        runs.append((torch.randn(m, H, dtype=torch.bfloat16, device="cuda"),
                     torch.cat([l["w_gate"], l["w_up"]], dim=1).contiguous(),
                     torch.empty(m, 2 * I, dtype=torch.bfloat16, device="cuda"),
                     torch.randn(m, I, dtype=torch.bfloat16, device="cuda"), l["w_down"],
                     torch.empty(m, H, dtype=torch.bfloat16, device="cuda"), m_idx))

    def fn():
        for a, w13, d1, a2, wd, d2, m_idx in runs:
            deep_gemm.m_grouped_bf16_gemm_nt_contiguous(a, w13, d1, m_idx)
            deep_gemm.m_grouped_bf16_gemm_nt_contiguous(a2, wd, d2, m_idx)

    return fn


def bench_moe(T: int, E: int, top_k: int, H: int, I: int, *, scoring="softmax", config=None, layers=4,
              seed=0) -> dict:
    """Median ms per layer on random bf16 data, averaged over `layers` distinct layers:
    ms        the whole provider (routing + align + GEMMs + reduce), eager launches (do_bench)
    graph_ms  the same replayed from a CUDA graph (do_bench_cudagraph): what decode sees
    experts_ms / experts_graph_ms   align + GEMMs + reduce on given routing
    tflops    6*T*top_k*H*I expert-GEMM FLOPs over graph_ms; weight_gbps: bytes of active expert
              weights over experts_graph_ms
    deep_gemm_ms / deep_gemm_tflops  deep_gemm m-grouped contiguous GEMMs alone, graph-replayed,
              when deep_gemm is importable (else deep_gemm_error says why)."""
    from triton.testing import do_bench, do_bench_cudagraph

    x, attrs, ls = _bench_problem(T, E, top_k, H, I, layers, seed, scoring)
    full = [dict(router=l["router"], w_gate=l["w_gate"], w_up=l["w_up"], w_down=l["w_down"]) for l in ls]

    def run_full():
        for l in full:
            moe(x, **l, **attrs)

    def run_experts():
        for l in ls:
            fused_experts(x, *l["route"], l["w_gate"], l["w_up"], l["w_down"], num_experts=E, config=config)

    flops = 6.0 * T * top_k * H * I
    out = dict(T=T, E=E, top_k=top_k, H=H, I=I, config=config or pick_config(T, top_k, E, H, I))
    out["ms"] = do_bench(run_full, return_mode="median") / layers
    out["graph_ms"] = do_bench_cudagraph(run_full, return_mode="median") / layers
    out["experts_ms"] = do_bench(run_experts, return_mode="median") / layers
    out["experts_graph_ms"] = do_bench_cudagraph(run_experts, return_mode="median") / layers
    out["tflops"] = flops / out["graph_ms"] * 1e-9
    out["experts_tflops"] = flops / out["experts_graph_ms"] * 1e-9
    active = sum(int((torch.bincount(l["route"][1].reshape(-1), minlength=E) > 0).sum()) for l in ls) / layers
    out["weight_gbps"] = active * 3 * H * I * 2 / out["experts_graph_ms"] * 1e-6
    y = torch.randn(T * top_k, H, device="cuda", dtype=torch.bfloat16)
    out["reduce_ms"] = do_bench_cudagraph(lambda: y.view(T, top_k, H).sum(1), return_mode="median")
    try:
        fn = _deep_gemm_fn(x, ls, E)
        if fn is not None:
            out["deep_gemm_ms"] = do_bench_cudagraph(fn, return_mode="median") / layers
            out["deep_gemm_tflops"] = flops / out["deep_gemm_ms"] * 1e-9
    except Exception as exc:  # noqa: BLE001 - a comparison only; say why it is missing
        out["deep_gemm_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return out


_GU_SMALL = [(16, 128, 4, 4), (32, 128, 4, 4), (32, 256, 4, 3), (64, 128, 4, 4), (32, 128, 2, 4), (64, 64, 4, 5)]
_DN_SMALL = [(16, 256, 4, 3), (32, 128, 4, 4), (32, 256, 4, 3), (64, 128, 4, 4), (64, 64, 4, 5), (128, 64, 4, 4)]
_GU_LARGE = [(64, 64, 4, 4), (128, 64, 4, 4), (128, 64, 8, 3), (128, 64, 8, 4), (64, 128, 8, 4), (128, 128, 8, 3)]
_DN_LARGE = [(128, 64, 4, 4), (128, 64, 8, 4), (256, 64, 8, 3), (256, 64, 8, 4), (128, 128, 8, 3), (256, 128, 8, 2)]


def tune_moe(T: int, E: int, top_k: int, H: int, I: int, layers=4, seed=0) -> tuple[float, dict]:
    """Coordinate search (graph-replayed timing): for each BM, the gate_up tile, then the down tile,
    then GROUP_M. Returns (best ms per layer, config)."""
    from triton.testing import do_bench_cudagraph

    x, _, ls = _bench_problem(T, E, top_k, H, I, layers, seed)

    def t(cfg):
        def run():
            for l in ls:
                fused_experts(x, *l["route"], l["w_gate"], l["w_up"], l["w_down"], num_experts=E, config=cfg)
        try:
            return do_bench_cudagraph(run, return_mode="median") / layers
        except Exception:  # noqa: BLE001 - out of shared memory / registers: not a candidate
            return float("inf")

    per_expert = T * top_k / E
    best = (float("inf"), None)
    for bm in (16, 32, 64, 128):
        if bm > max(16, 4 * _p2(per_expert)) or bm < per_expert / 8:
            continue
        cfg = dict(pick_config(T, top_k, E, H, I), BM=bm)
        gus, dns = (_GU_SMALL, _DN_SMALL) if bm <= 32 else (_GU_LARGE, _DN_LARGE)
        cfg["gu"] = min(gus, key=lambda gu: t(dict(cfg, gu=gu)))
        cfg["dn"] = min(dns, key=lambda dn: t(dict(cfg, dn=dn)))
        cfg["GROUP_M"] = min((1, 8, 32), key=lambda gm: t(dict(cfg, GROUP_M=gm)))
        best = min(best, (t(cfg), cfg), key=lambda r: r[0])
    return best


if __name__ == "__main__":
    import sys

    Ts = [int(a) for a in sys.argv[1:] if a.isdigit()] or [1, 16, 64, 256, 1024, 2048, 4096]
    for T in Ts:
        size = (T, 128, 8, 2048, 768)  # Qwen3-30B-A3B
        r = bench_moe(*size)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
        if "--tune" in sys.argv:
            ms, cfg = tune_moe(*size)
            print(f"  tuned T={T}: experts {ms:.4f} ms ({6 * T * 8 * 2048 * 768 / ms * 1e-9:.1f} TFLOP/s), "
                  f"default {r['experts_graph_ms']:.4f} ms: {cfg}", flush=True)
