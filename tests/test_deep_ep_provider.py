"""DeepEP provider (kernels/libs/deep_ep_ops.py, passes/plan_deep_ep.py) on the CPU.

The adapter runs against a torch stand-in of deep_ep.Buffer that follows buffer.py's documented
contracts (local expert ids from normal dispatch, unweighted normal combine, the low-latency
[local experts, cap * ranks, hidden] layout with garbage past each expert's count, weighting
low-latency combine) between two simulated ranks: dispatch -> grouped_experts -> combine must give
torch_ref.moe on each rank's own tokens, in both modes, with an idle rank. The compile-time side
(the trio forced together, the low-latency cap vs max_num_seqs, what DeepEP cannot run) runs with
the provider's probe faked usable. tests/test_gpu_deepep.py checks the real library on 2 GPUs."""
from __future__ import annotations

import dataclasses
import importlib
import json
import sys
import threading
from types import SimpleNamespace

import pytest
import torch

from nanoforge.cli import main
from nanoforge.codegen import providers
from nanoforge.kernels import libs, torch_ref
from nanoforge.errors import NanoForgeError
from nanoforge.ir.parser import parse_module
from nanoforge.ir.printer import format_module
from nanoforge.models import trace_model
from nanoforge.parallel.comm import SimulatedComm, SimulatedHub
from nanoforge.passes import PASSES, PIPELINES, PassContext, PassManager
from nanoforge.facts import CudaGraphPlan, DeepEPPlan, ParallelLayout, Target, read
from nanoforge.passes import plan_cuda_graphs, plan_deep_ep, select_kernels, shard_ep
from test_cli import fails_with
from test_ir import config_dict
from lib_fixtures import _fake, isolated  # noqa: F401 - the fixture

TRIO = {op: "deep_ep" for op in ("moe_dispatch", "grouped_experts", "moe_combine")}
META = ParallelLayout(1, 2, 2)


# ---------------------------------------------------------------------------------------------
# a torch stand-in of deep_ep.Buffer between simulated ranks
# ---------------------------------------------------------------------------------------------
def _fake_deep_ep(log: dict):
    class Config:
        def get_nvl_buffer_size_hint(self, hidden_bytes: int, ranks: int) -> int:
            return hidden_bytes * ranks * 1000

    class Buffer:
        def __init__(self, group, num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False, num_qps_per_rank=24,
                     allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False, use_fabric=False,
                     explicitly_destroy=False, enable_shrink=False, comm=None):
            self.g, self.ll, self.qps = group, low_latency_mode, num_qps_per_rank
            self.me, self.W = group.members.index(group.rank), len(group.members)
            log["made"].append((group.rank, num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank))

        get_dispatch_config = get_combine_config = staticmethod(lambda ranks: Config())
        get_low_latency_rdma_size_hint = staticmethod(lambda tokens, hidden, ranks, experts: tokens * hidden * experts)

        def _all(self, obj):
            return self.g.hub.exchange(self.g.members, self.g.rank, obj)

        def get_dispatch_layout(self, topk_idx, num_experts, previous_event=None, async_finish=False,
                                allocate_on_comm_stream=False):
            owner = torch.where(topk_idx >= 0, topk_idx // (num_experts // self.W), -1)
            in_rank = torch.stack([(owner == r).any(1) for r in range(self.W)], 1)
            per_expert = torch.bincount(topk_idx[topk_idx >= 0], minlength=num_experts).int()
            return in_rank.sum(0).int(), None, per_expert, in_rank, None

        def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                     is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                     expert_alignment=1, num_worst_tokens=0, config=None, previous_event=None, async_finish=False,
                     allocate_on_comm_stream=False):
            assert topk_idx.dtype == torch.int64 and topk_weights.dtype == torch.float32 and handle is None
            log["modes"][self.g.rank].append("normal")
            L = num_tokens_per_expert.numel() // self.W
            first, rows, ids, ws, src = self.me * L, [], [], [], []
            for s, (xs, ids_s, w_s, in_s) in enumerate(self._all((x, topk_idx, topk_weights, is_token_in_rank))):
                t = in_s[:, self.me].nonzero().squeeze(1)
                local = (ids_s[t] >= first) & (ids_s[t] < first + L)
                rows.append(xs[t])
                ids.append(torch.where(local, ids_s[t] - first, -1))  # DeepEP hands back local ids
                ws.append(torch.where(local, w_s[t], 0.0))
                src += [(s, t_) for t_ in t.tolist()]
            return torch.cat(rows), torch.cat(ids), torch.cat(ws), [], (src, x.shape[0]), None

        def combine(self, x, handle, topk_weights=None, bias=None, config=None, previous_event=None,
                    async_finish=False, allocate_on_comm_stream=False):
            src, tokens = handle
            out = torch.zeros(tokens, x.shape[1], dtype=torch.float32)
            for y, pairs in self._all((x, src)):
                for j, (s, t) in enumerate(pairs):
                    if s == self.me:
                        out[t] += y[j].float()  # a plain sum: normal combine does not weight
            return out.to(x.dtype), None, None

        def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank, hidden, num_experts):
            log["cleans"][self.g.rank] += 1

        def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                                 cumulative_local_expert_recv_stats=None, dispatch_wait_recv_cost_stats=None,
                                 use_fp8=True, round_scale=False, use_ue8m0=False, async_finish=False,
                                 return_recv_hook=False):
            cap, L = num_max_dispatch_tokens_per_rank, num_experts // self.W
            assert self.ll and self.qps == L and not use_fp8 and x.shape[0] <= cap
            log["modes"][self.g.rank].append("low_latency")
            recv = torch.full((L, cap * self.W, x.shape[1]), float("nan"), dtype=x.dtype)  # garbage past counts
            counts, pairs = torch.zeros(L, dtype=torch.int32), [[] for _ in range(L)]
            parts = self._all((x, topk_idx))
            for e in range(L):
                for s, (xs, ids_s) in enumerate(parts):
                    for t in (ids_s == self.me * L + e).any(1).nonzero().squeeze(1).tolist():
                        recv[e, len(pairs[e])] = xs[t]
                        pairs[e].append((s, t))
                counts[e] = len(pairs[e])
            return recv, counts, (pairs, x.shape[0]), None, None

        def low_latency_combine(self, x, topk_idx, topk_weights, handle, use_logfmt=False, zero_copy=False,
                                async_finish=False, return_recv_hook=False, out=None,
                                combine_wait_recv_cost_stats=None):
            pairs_here, tokens = handle
            out = torch.zeros(tokens, x.shape[2], dtype=torch.float32)
            for m, (y, pairs) in enumerate(self._all((x, pairs_here))):
                for e, rows in enumerate(pairs):
                    for p, (s, t) in enumerate(rows):
                        if s == self.me:  # weighted with the source rank's own routing weights
                            k = (topk_idx[t] == m * y.shape[0] + e).nonzero()[0, 0]
                            out[t] += topk_weights[t, k] * y[e, p].float()
            return out.to(x.dtype), None, None

        def destroy(self):
            log["destroyed"] += 1

    return _fake("deep_ep", Buffer=Buffer, Config=Config, topk_idx_t=torch.int64, __version__=libs.DEEP_EP.version)


def _problem(scoring: str, E=8, H=16, I=12):
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    p = dict(router=r(E, H), w_gate=r(E, I, H) / 4, w_up=r(E, I, H) / 4, w_down=r(E, H, I) / 4)
    attrs = dict(num_experts=E, top_k=3, scoring=scoring, norm_topk_prob=True)
    if scoring == "sigmoid":  # DeepSeek-V3 style: selection bias, group-limited, scaled
        p["score_bias"] = r(E) * 0.3
        attrs.update(n_group=4, topk_group=2, routed_scaling_factor=2.5)
    return p, attrs


def _run_ranks(M, p: dict, attrs: dict, steps: list[tuple[int, int, int]], groups: bool = True,
               hooks: bool = False, header: bool = False):
    """Two simulated ranks run dispatch -> experts -> combine for each step (tokens of rank 0, of rank 1,
    the low-latency cap); returns {(rank, step): (output, torch_ref.moe on that rank's tokens)}, comms."""
    hub, comms, got, errors = SimulatedHub(2, timeout_s=30), {}, {}, []

    def rank(r: int) -> None:
        try:
            comm = comms[r] = SimulatedComm(hub, r, META)
            if hooks:  # as TorchDistComm: host work before a CUDA graph replays
                comm.replay_hooks = []
            if groups:  # the process group deep_ep.Buffer takes (here: where the fake meets its peer)
                comm.groups = {"ep": SimpleNamespace(hub=hub, rank=r, members=[0, 1])}
            L = attrs["num_experts"] // 2
            local = {k: p[k][r * L:(r + 1) * L] for k in ("w_gate", "w_up", "w_down")}
            for i, step in enumerate(steps):
                x = torch.randn(step[r], 16, generator=torch.Generator().manual_seed(100 * i + r))
                ctx = SimpleNamespace(comm=comm)  # a fresh context per step, as the runtime makes
                if header:  # the runtime's step header says how many tokens the fullest rank has
                    ctx.ep_tokens = max(step[:2])
                xs, ws, ids, plan = M.moe_dispatch(x, p["router"], p.get("score_bias"), ctx=ctx, group="ep",
                                                   low_latency_max_tokens=step[2], **attrs)
                y = M.grouped_experts(xs, ws, ids, **local, num_experts=attrs["num_experts"], ctx=ctx, group="ep")
                got[r, i] = (M.moe_combine(y, plan, ctx=ctx, group="ep"), torch_ref.moe(x, **p, **attrs))
        except BaseException as exc:  # noqa: BLE001 - reported below; the other rank must stop waiting
            errors.append(exc)
            hub.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    if errors:
        raise errors[0]
    for (r, i), (out, ref) in sorted(got.items()):
        assert out.shape == (steps[i][r], 16)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"rank {r} step {i}: {m}")
    return comms


@pytest.fixture
def fake_ep(isolated):  # noqa: F811
    """(the adapter imported against the stand-in, the stand-in's log of what ran)."""
    log = {"made": [], "modes": {0: [], 1: []}, "cleans": {0: 0, 1: 0}, "destroyed": 0}
    isolated.setitem(sys.modules, "deep_ep", _fake_deep_ep(log))
    return importlib.import_module(libs.DEEP_EP.adapter), log


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_adapter_on_simulated_ranks_matches_moe(scoring, fake_ep):
    M, log = fake_ep
    p, attrs = _problem(scoring)
    # LL, LL with an idle rank, normal (9 > 8), normal (cap 0 on an LL-capable buffer), back to LL
    # (cleans the buffer again), normal with an idle rank
    steps = [(3, 5, 8), (0, 6, 8), (9, 2, 8), (0, 4, 0), (4, 0, 8), (13, 0, 8)]
    comms = _run_ranks(M, p, attrs, steps)
    want = ["low_latency", "low_latency", "normal", "normal", "low_latency", "normal"]
    assert log["modes"] == {0: want, 1: want} and log["cleans"] == {0: 2, 1: 2}
    assert sorted(m[0] for m in log["made"]) == [0, 1] and all(m[3] and m[4] == 4 and m[2] > 0 for m in log["made"])
    with pytest.raises(NanoForgeError, match="cannot serve hidden 32"):
        M.buffer(comms[0], "ep", 32, 8, 8)  # a live buffer is never resized
    for comm in comms.values():
        M.release(comm)
    assert log["destroyed"] == 2 and not hasattr(comms[0], "_deep_ep")


def test_graph_replays_switch_to_low_latency_mode_first(fake_ep, monkeypatch):
    """A replayed graph runs no Python: after an eager normal-mode step, the comm's replay hook
    cleans the low-latency buffer before the replay, once. With the step header's token count the
    mode is chosen without a collective (as inside a captured graph)."""
    M, log = fake_ep
    p, attrs = _problem("softmax")
    comms = _run_ranks(M, p, attrs, [(3, 5, 8), (9, 20, 8)], hooks=True)  # low latency, then normal
    assert all(len(c.replay_hooks) == 1 for c in comms.values())
    assert all(c._deep_ep["ep"].mode == "normal" for c in comms.values())
    cleans = dict(log["cleans"])
    threads = [threading.Thread(target=c.replay_hooks[0]) for c in comms.values()]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert all(log["cleans"][r] == cleans[r] + 1 and comms[r]._deep_ep["ep"].mode == "low_latency" for r in (0, 1))
    [c.replay_hooks[0]() for c in comms.values()]  # already in low-latency mode: no second clean
    assert log["cleans"] == {r: cleans[r] + 1 for r in (0, 1)}
    monkeypatch.setattr(SimulatedComm, "all_gather", lambda *a: pytest.fail("the header's count was ignored"))
    _run_ranks(M, p, attrs, [(3, 5, 8), (9, 20, 8)], header=True)


def test_adapter_simulated_ranks_without_process_groups_use_torch_ref(fake_ep):
    """--verify-each-pass runs ranks as threads: no process group for DeepEP, so torch_ref moves the rows."""
    M, log = fake_ep
    p, attrs = _problem("softmax")
    _run_ranks(M, p, attrs, [(3, 5, 8), (0, 9, 8)], groups=False)
    assert log["made"] == [] and log["modes"] == {0: [], 1: []}


def test_adapter_group_of_one_is_torch_ref(fake_ep):
    M, log = fake_ep
    p, attrs = _problem("softmax")
    x = torch.randn(5, 16)
    xs, ws, ids, plan = M.moe_dispatch(x, p["router"], ctx=None, low_latency_max_tokens=8, **attrs)
    y = M.grouped_experts(xs, ws, ids, p["w_gate"], p["w_up"], p["w_down"], num_experts=8, ctx=None)
    torch.testing.assert_close(M.moe_combine(y, plan, ctx=None), torch_ref.moe(x, **p, **attrs))
    assert log["made"] == []


# ---------------------------------------------------------------------------------------------
# compile time: the provider forced, its modes planned and checked
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def usable(monkeypatch):
    """deep_ep probes usable (as on an H100 with the pinned wheel)."""
    monkeypatch.setattr(providers, "PROVIDERS", [dataclasses.replace(p, probe=lambda t: None) if p.name == "deep_ep"
                                                 else p for p in providers.PROVIDERS])


def _compile(force: dict, *, seqs=64, cap=128, hidden=2048, dtype="bf16", ep=2):
    module = trace_model({**config_dict("qwen3_moe"), "hidden_size": hidden}, dtype)  # 6 experts, top-3
    ctx = PassContext(options={"shard_ep": shard_ep.Options(ep, ep),
                               "select_kernels": select_kernels.Options(Target("cuda", capability="sm90"), force),
                               "plan_deep_ep": plan_deep_ep.Options(seqs, cap),
                               "plan_cuda_graphs": plan_cuda_graphs.Options(max_num_seqs=seqs)})  # as compiler.py does
    return PassManager(PASSES, PIPELINES["default"], ctx).run(module)


def test_probe_and_rank():
    probe = providers.BY_NAME["deep_ep"].probe
    assert probe(Target("cpu")) == "deep_ep needs a CUDA target (compile with --device cuda)"
    assert probe(Target("cuda", capability="sm80")) == "deep_ep needs sm90; the target is sm80"
    names = [p.name for p in providers.PROVIDERS]
    assert names.index("torch") < names.index("deep_ep")  # used only where forced
    for op in TRIO:  # low-latency mode is capturable; plan_deep_ep blocks graphs when it is off
        assert providers.graph_unsafe_reason(op, "deep_ep") is None


def test_plan_records_the_modes(usable):
    module = _compile(TRIO)
    dispatches = [n for _, n in module.nodes() if n.op == "moe_dispatch"]
    assert dispatches and all(n.provider == "deep_ep" and n.attrs["low_latency_max_tokens"] == 128 for n in dispatches)
    assert {n.provider for _, n in module.nodes() if n.op in TRIO} == {"deep_ep"}
    assert "no EP rank holds more than 128 tokens" in read(module, DeepEPPlan).modes
    assert "max_num_seqs 64" in read(module, DeepEPPlan).modes
    graphs = read(module, CudaGraphPlan)
    assert graphs.reason is None and max(graphs.sizes) == 64
    text = format_module(module)
    assert "low_latency_max_tokens=128" in text and format_module(parse_module(text)) == text
    off = _compile(TRIO, seqs=512, cap=0, hidden=96)  # normal mode only: no cap, any hidden size
    assert {n.attrs["low_latency_max_tokens"] for _, n in off.nodes() if n.op == "moe_dispatch"} == {0}
    assert read(off, DeepEPPlan).modes.startswith("normal for every batch")
    assert read(off, CudaGraphPlan).sizes == () and "normal mode only" in read(off, CudaGraphPlan).reason
    assert read(_compile({}), DeepEPPlan) is None  # not forced: torch, nothing planned


@pytest.mark.parametrize("kw, message", [
    ({"seqs": 256}, "^--max-num-seqs 256 exceeds DeepEP's low-latency cap --deep-ep-max-tokens 128: lower "
                    "--max-num-seqs to 128 or raise --deep-ep-max-tokens to 256$"),
    ({"cap": 600, "seqs": 8}, "--deep-ep-max-tokens 600: DeepEP's low-latency mode holds 1 to 511 tokens"),
    ({"dtype": "f32"}, "DeepEP moves bf16 activations, this plan's are f32"),
    ({"hidden": 96}, "low-latency kernels take hidden sizes 2048, .*, not 96; --deep-ep-max-tokens 0 uses normal"),
    ({"ep": 3}, "DeepEP's NVLink mode runs on 2, 4 or 8 EP ranks, not 3"),
])
def test_what_deep_ep_cannot_run_fails_at_compile_time(usable, kw, message):
    with pytest.raises(NanoForgeError, match=message):
        _compile(TRIO, **kw)


@pytest.mark.parametrize("force, message", [
    ({"moe_dispatch": "deep_ep", "moe_combine": "deep_ep"}, r"grouped_experts runs on \w+ but its moe_dispatch on "
                                                           "deep_ep"),
    ({"moe_dispatch": "deep_ep", "grouped_experts": "deep_ep"}, "moe_combine runs on allgather but its moe_dispatch "
                                                               "on deep_ep"),
    ({"moe_combine": "deep_ep"}, "moe_combine runs on deep_ep but its moe_dispatch on allgather"),
])
def test_the_ep_ops_are_forced_together(usable, force, message):
    with pytest.raises(NanoForgeError, match=message + r" @model\.layers\.\d+\.mlp: force the EP ops together "
                       r"\(--provider moe_dispatch=deep_ep --provider grouped_experts=deep_ep "
                       r"--provider moe_combine=deep_ep\)$"):
        _compile(force)
    _compile({"grouped_experts": "deep_ep"})  # allgather's dispatch layout is the public contract: allowed


def test_cli_compile_and_inspect(usable, tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**config_dict("qwen3_moe"), "hidden_size": 2048}))
    argv = ["compile", str(tmp_path / "ckpt"), "--config-only", "--device", "cuda", "--dtype", "bf16",
            "--attention-dp", "2", "--ffn-ep", "2"] + [a for op in TRIO for a in ("--provider", f"{op}=deep_ep")]
    fails_with(capsys, argv + ["-o", str(tmp_path / "bad")], "--max-num-seqs 256", "--deep-ep-max-tokens 128")
    assert main(argv + ["-o", str(tmp_path / "plan"), "--max-num-seqs", "64", "-q"]) == 0
    assert main(["inspect", str(tmp_path / "plan")]) == 0
    out = capsys.readouterr().out
    assert "deep_ep      low_latency while no EP rank holds more than 128 tokens" in out
    assert "moe_dispatch" in out and "provider deep_ep" in out and "plan_deep_ep(" in out
