"""DeepEP provider (kernels/libs/deep_ep_ops.py) on 2 GPUs of one host (-m gpu; skipped without
2 CUDA GPUs of sm90 or without deep_ep); NANOFORGE_EP_RANKS=8 runs it on 8 (DeepEP's published EP8).

The processes (NCCL, NVLink multicast off) form an attention_dp=N x ffn_ep=N layout; each holds its
own tokens, a different count per rank (even ranks one count, odd ranks another; idle in some steps). dispatch -> grouped_experts ->
combine must equal torch_ref.moe(x, router, the full expert weights) on each rank's tokens within
bf16 tolerance, in normal mode and in low-latency mode (which also switches to normal mode and back
on one buffer). Then it times dispatch and combine per call on DeepSeek-V3's routing shape (hidden
7168, top-8 of 256 experts; DeepEP publishes 77/114 us low-latency at 128 tokens EP8, 153/158 GB/s
normal mode, on H800, by its authors) and writes the figures as JSON to $OUT.

Each mode runs in its own pair of processes with a deadline, so a hang (NVSHMEM) is reported, never
waited on. Low-latency mode needs NVSHMEM; where it cannot initialise (no IB, say) the test is an
xfail that quotes the error. Every stage a rank passes is written to its result file first.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import time
import traceback
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nanoforge.kernels import libs, torch_ref

ENV = {"NCCL_NVLS_ENABLE": "0", "NVSHMEM_DISABLE_NVLS": "1", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
RANKS = int(os.environ.get("NANOFORGE_EP_RANKS", "2"))  # 8 for the published EP8 comparison (an 8-GPU host)
META = {"parallel": {"attention_dp": RANKS, "ffn_ep": RANKS}}
E, K, H, I, CAP = 256, 8, 7168, 64, 128  # DeepSeek-V3's routing and hidden size; narrow experts keep weights small
ATTRS = dict(num_experts=E, top_k=K, scoring="sigmoid", norm_topk_prob=True, n_group=8, topk_group=4,
             routed_scaling_factor=2.5)
STEPS = {  # tokens on rank 0, rank 1; the low-latency cap the plan would carry; the mode that must run
    "normal": [((37, 300), 0, "normal"), ((0, 65), 0, "normal"), ((129, 0), 0, "normal"), ((1000, 3), 0, "normal")],
    "low_latency": [((5, 128), CAP, "low_latency"), ((0, 17), CAP, "low_latency"), ((200, 3), CAP, "normal"),
                    ((128, 128), CAP, "low_latency"), ((1, 0), CAP, "low_latency")],
}
TOL = 2e-2  # of the reference's largest magnitude: bf16 sums of 8 experts in another order
TIMEOUT_S = 240  # per mode: both modes hung still end inside a 10-minute GPU call
DEVICE, BACKEND, NORMAL_TOKENS = "cuda", "nccl", 4096  # normal mode is timed on 4096 tokens a rank


def _params(device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    r = lambda *s, scale: (torch.randn(*s, generator=g) * scale).to(device, torch.bfloat16)  # noqa: E731
    return dict(router=r(E, H, scale=H ** -0.5), w_gate=r(E, I, H, scale=H ** -0.5), w_up=r(E, I, H, scale=H ** -0.5),
                w_down=r(E, H, I, scale=I ** -0.5), score_bias=(torch.randn(E, generator=g) * 0.1).to(device))


def _events(fns, iters: int = 50, warmup: int = 10) -> list[float]:
    """Median microseconds of each fn of a call sequence run `iters` times (both ranks in lockstep)."""
    for _ in range(warmup):
        state = None
        for fn in fns:
            state = fn(state)
    torch.cuda.synchronize()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(iters):
        ev, state = [torch.cuda.Event(enable_timing=True) for _ in range(len(fns) + 1)], None
        ev[0].record()
        for i, fn in enumerate(fns):
            state = fn(state)
            ev[i + 1].record()
        torch.cuda.synchronize()
        for i in range(len(fns)):
            times[i].append(ev[i].elapsed_time(ev[i + 1]) * 1e3)
    return [sorted(t)[len(t) // 2] for t in times]


def _timing(M, comm, p: dict, mode: str) -> dict:
    """Raw DeepEP calls and the adapter's ops (routing, the per-step token all-gather, host syncs)."""
    buf = comm._deep_ep["ep"].buffer
    tokens = CAP if mode == "low_latency" else NORMAL_TOKENS
    x = torch.randn(tokens, H, device=DEVICE, dtype=torch.bfloat16, generator=torch.Generator(DEVICE).manual_seed(9))
    w, ids = torch_ref._route(x, p["router"], p["score_bias"], **ATTRS)
    ids, selections = ids.to(M.deep_ep.topk_idx_t), int((ids >= 0).sum())
    out = {"tokens_per_rank": tokens, "hidden": H, "top_k": K, "experts": E, "ranks": RANKS}
    if mode == "low_latency":
        buf.clean_low_latency_buffer(CAP, H, E)
        raw = _events([lambda _: buf.low_latency_dispatch(x, ids, CAP, E, use_fp8=False),
                       lambda d: buf.low_latency_combine(d[0], ids, w, d[2])])
        moved = selections * H * 2  # bf16 bytes per direction, counted as DeepEP's test_low_latency does
    else:
        def dispatch(_):
            rank, rdma, expert, in_rank, _ = buf.get_dispatch_layout(ids, E)
            return buf.dispatch(x, num_tokens_per_rank=rank, num_tokens_per_rdma_rank=rdma, is_token_in_rank=in_rank,
                                num_tokens_per_expert=expert, topk_idx=ids, topk_weights=w)
        recv = dispatch(None)[0]
        raw = _events([dispatch, lambda d: buf.combine(d[0], d[4])])
        moved = recv.numel() * 2  # received bf16 bytes, as DeepEP's test_intranode counts
    cap = CAP if mode == "low_latency" else 0
    ops = _events([lambda _: M.moe_dispatch(x, p["router"], p["score_bias"], ctx=SimpleNamespace(comm=comm),
                                            low_latency_max_tokens=cap, **ATTRS),
                   lambda d: M.moe_combine(d[0], d[3], ctx=SimpleNamespace(comm=comm))])
    out.update(dispatch_us=raw[0], combine_us=raw[1], dispatch_gb_s=moved / raw[0] * 1e-3,
               combine_gb_s=moved / raw[1] * 1e-3, op_dispatch_us=ops[0], op_combine_us=ops[1])
    return out


def _worker(rank: int, port: int, mode: str, path: str) -> None:
    import torch.distributed as dist

    from nanoforge.parallel.comm import TorchDistComm

    res: dict = {"rank": rank, "stage": "start"}
    save = lambda: Path(path).write_text(json.dumps(res))  # noqa: E731
    try:
        os.environ.update(ENV)
        torch.cuda.set_device(rank)
        dist.init_process_group(BACKEND, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=RANKS,
                                timeout=timedelta(seconds=180))  # a rank left waiting on a failed one gives up
        comm = TorchDistComm(META, rank)
        M = importlib.import_module(libs.DEEP_EP.adapter)
        res["stage"] = "buffer"
        save()
        M.buffer(comm, "ep", H, E, CAP if mode == "low_latency" else 0)  # NVSHMEM starts here in low-latency mode
        res["stage"], res["cases"] = "cases", []
        save()
        p = _params(DEVICE)
        local = {k: p[k][rank * (E // RANKS): (rank + 1) * (E // RANKS)] for k in ("w_gate", "w_up", "w_down")}
        for i, (counts, cap, want) in enumerate(STEPS[mode]):
            g = torch.Generator(DEVICE).manual_seed(1000 * i + rank)
            x = torch.randn(counts[rank % 2], H, device=DEVICE, dtype=torch.bfloat16, generator=g)
            ctx = SimpleNamespace(comm=comm)  # one step
            xs, ws, ids, plan = M.moe_dispatch(x, p["router"], p["score_bias"], ctx=ctx, low_latency_max_tokens=cap,
                                               **ATTRS)
            ran = comm._deep_ep["ep"].mode
            out = M.moe_combine(M.grouped_experts(xs, ws, ids, **local, num_experts=E, ctx=ctx), plan, ctx=ctx)
            ref = torch_ref.moe(x, p["router"], p["w_gate"], p["w_up"], p["w_down"], p["score_bias"], **ATTRS)
            err = (out.float() - ref.float()).abs().max().item() if x.shape[0] else 0.0
            res["cases"].append({"tokens": [counts[r % 2] for r in range(RANKS)], "want": want, "ran": ran,
                                 "shape": list(out.shape),
                                 "finite": bool(torch.isfinite(out).all()), "max_err": err,
                                 "ref_max": ref.float().abs().max().item() if x.shape[0] else 0.0})
            save()
        res["stage"] = "timing"
        save()
        res["timing"] = _timing(M, comm, p, mode)
        res["stage"] = "done"
        M.release(comm)
    except BaseException as exc:  # noqa: BLE001 - the parent reports it
        res["error"] = f"{type(exc).__name__}: {exc}"
        res["traceback"] = traceback.format_exc()
    finally:
        save()
        try:
            torch.distributed.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def _run(mode: str, tmp_path: Path, monkeypatch) -> list[dict]:
    """Both ranks' result files; a rank still running at the deadline is killed and says so."""
    import torch.multiprocessing as mp

    from nanoforge.serving.sockets import free_tcp_port

    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    ctx, port = mp.get_context("spawn"), free_tcp_port()
    paths = [tmp_path / f"{mode}-{r}.json" for r in range(RANKS)]
    procs = [ctx.Process(target=_worker, args=(r, port, mode, str(paths[r]))) for r in range(RANKS)]
    [p.start() for p in procs]
    deadline = time.monotonic() + TIMEOUT_S
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    out = []
    for r, (p, path) in enumerate(zip(procs, paths)):
        res = json.loads(path.read_text()) if path.exists() else {"rank": r, "stage": "start"}
        if p.is_alive():
            p.kill()
            p.join(10)
            res.setdefault("error", f"timed out after {TIMEOUT_S} s in stage {res['stage']!r}")
        elif p.exitcode != 0:
            res.setdefault("error", f"exit code {p.exitcode} in stage {res['stage']!r}")
        out.append(res)
    return out


def _requirements() -> None:
    if torch.cuda.device_count() < RANKS:
        pytest.skip(f"needs {RANKS} CUDA GPUs (NANOFORGE_EP_RANKS)")
    if torch.cuda.get_device_capability(0) != (9, 0):
        pytest.skip("the pinned DeepEP build runs on sm90")
    if importlib.util.find_spec("deep_ep") is None:
        pytest.skip(f"deep_ep is not installed (pip install --no-deps {libs.DEEP_EP.wheel}=={libs.DEEP_EP.version})")
    if (why := libs.import_error(libs.DEEP_EP.adapter)) is not None:
        pytest.skip(why)


def _check_and_report(mode: str, results: list[dict]) -> None:
    errors = [f"rank {r['rank']}: {r['error']}\n{r.get('traceback', '')}" for r in results if "error" in r]
    assert not errors, "\n".join(errors)
    for r in results:
        for c in r["cases"]:
            assert c["ran"] == c["want"] and c["finite"] and c["shape"] == [c["tokens"][r["rank"]], H], (r["rank"], c)
            assert c["max_err"] <= TOL * max(1.0, c["ref_max"]), (r["rank"], c)
            assert c["ref_max"] > 0 or c["tokens"][r["rank"]] == 0, (r["rank"], c)  # never compared on zeros
    figures = {"bench": f"deep_ep_{mode}", "card": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "deep_ep": libs.DEEP_EP.version, "published_h800": "LL 77/114 us (128 tokens, top-8, EP8); "
               "normal 153/158 GB/s intranode", "ranks": {str(r["rank"]): r["timing"] for r in results},
               "cases": results[0]["cases"]}
    print(json.dumps(figures["ranks"]))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["OUT"]) / f"deep_ep_{mode}.json").write_text(json.dumps(figures, indent=1))


@pytest.mark.gpu
def test_gpu_deepep_normal_mode(tmp_path, monkeypatch):
    _requirements()
    _check_and_report("normal", _run("normal", tmp_path, monkeypatch))


@pytest.mark.gpu
def test_gpu_deepep_low_latency_mode(tmp_path, monkeypatch):
    _requirements()
    results = _run("low_latency", tmp_path, monkeypatch)
    stuck = [r for r in results if "error" in r and r["stage"] in ("start", "buffer")]
    if stuck:  # NVSHMEM could not start here: say why, do not fail the machine
        pytest.xfail("DeepEP low-latency mode could not initialise: " + "; ".join(
            f"rank {r['rank']} ({r['stage']}): {r['error']}" for r in stuck))
    _check_and_report("low_latency", results)
