"""Runs the plan's generated forward over one flat batch: builds the token, position and
row tensors plus the batch context, and returns the logits of the rows that need a token.
Decode-only batches replay a captured CUDA graph when the plan planned one; every batch that
runs eagerly instead is counted under its reason. A rank of a sharded plan runs the same code
with its collectives (`comm`) and the KV block count all ranks agreed on (distributed_runner.py)."""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import defaults
from ..codegen.pysource import compile_function, prepare_params
from ..errors import NanoForgeError
from ..kv_contract import KVContract
from ..kernels.context import TORCH_DTYPES, allocate_pool, allocate_state, host_to_device, make_context
from ..passes.quantize_kv import FP8_MIN_SM
from ..models.checkpoint import Checkpoint
from ..models.weights import load_params
from ..plan import Plan
from ..typed_json import from_json, to_json
from .scheduler import ScheduledBatch

log = logging.getLogger("nanoforge.runner")


def flat_batch(batch: ScheduledBatch, sample_items: list[int], device_tokens: bool = False
               ) -> tuple[list[int], list[tuple[int, int, list[int]]], list[int]]:
    """(token ids, (q_len, ctx_len, blocks) per sequence, rows to sample) of a scheduled batch;
    its tokens are positions ctx_len - q_len .. ctx_len - 1 of each sequence. With device_tokens,
    the token ids are on the device already and the list is empty. An item with d speculative
    drafts (batch.drafts) returns its last d + 1 rows."""
    tokens: list[int] = []
    seqs, ends, end = [], [], -1
    for seq, n in batch.items:
        start = seq.num_computed
        if not device_tokens:
            tokens += seq.token_ids[start:start + n]
        seqs.append((n, start + n, seq.block_table))
        end += n
        ends.append(end)
    drafts = batch.drafts
    return tokens, seqs, [r for i in sample_items for r in range(ends[i] - drafts.get(i, 0), ends[i] + 1)]


@dataclass(frozen=True)
class RunnerConfig:
    """What a model runner needs besides the plan and the checkpoint: the Engine makes it from
    its EngineConfig, and a sharded plan's driver sends it to every worker rank as JSON."""

    device: str = "cpu"
    num_blocks: int | None = None  # KV blocks; None: what the card's memory leaves (CUDA)
    max_model_len: int = defaults.MAX_MODEL_LEN
    max_num_seqs: int = defaults.MAX_NUM_SEQS
    max_num_batched_tokens: int = defaults.MAX_NUM_BATCHED_TOKENS
    gpu_memory_utilization: float = defaults.GPU_MEMORY_UTILIZATION
    enforce_eager: bool = False  # never replay CUDA graphs
    progress: bool = True  # weight-loading progress bar
    verify_drafts: int = 0  # speculative decoding's K: also capture verify graphs (K + 1 tokens a sequence)

    def to_json(self) -> dict:
        return to_json(self)

    @classmethod
    def from_json(cls, data: dict) -> "RunnerConfig":
        return from_json(cls, data, "runner config")


def positions_of(seqs: list[tuple[int, int, list[int]]]) -> list[int]:
    return [p for q, c, _ in seqs for p in range(c - q, c)]


class ModelRunner:
    def __init__(self, plan: Plan, ckpt: Checkpoint, cfg: RunnerConfig, rank: int = 0):
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise NanoForgeError("--device cuda: no CUDA device is visible")
        self.world = plan.parallel.world
        if self.world > 1 and not self.one_rank_of_many:  # one rank alone would compute garbage, silently
            raise NanoForgeError(f"the plan is sharded over {self.world} ranks ({plan.parallel.describe()}); "
                                 "ModelRunner runs a world of one (Engine runs such plans with DistributedRunner)")
        self.cfg, self.device, self.rank = cfg, torch.device(cfg.device), rank
        self.comm = None  # this rank's collectives, set by _agree_blocks on a sharded plan
        self.contract = plan.kv_contract
        if self.contract.scale_dtype and self.device.type == "cuda":
            sm = int("".join(map(str, torch.cuda.get_device_capability())))
            if sm < FP8_MIN_SM:
                raise NanoForgeError(f"--kv-dtype / --index-kv-dtype fp8: the plan keeps KV in "
                                     f"{self.contract.dtype_label()}, which this GPU (sm{sm}) cannot convert; "
                                     "recompile without them")
        self.block_size = self.contract.block_size
        self.params = load_params(plan.module, ckpt, self.device, progress=cfg.progress, rank=rank)
        self.forward = compile_function(plan.module, "forward")
        self.hidden: torch.Tensor | None = None  # the last step's final hidden state per row (MTP plans)
        self.carry: dict = {}  # what kernels keep from one step to the next (BatchContext.carry)
        runs = ["forward"] + (["draft"] if plan.speculative else []) + \
            (["encode"] if "encode" in plan.module.functions else [])
        self.vision = None  # the image encoder of vision-language plans (vision_runner.py)
        if "encode" in plan.module.functions:
            from .vision_runner import VisionEncoder

            if self.world > 1:
                raise NanoForgeError("vision-language plans run on one rank only (the vision tower is not sharded); "
                                     "recompile without --tp / --attention-dp / --ffn-ep")

            self.vision = VisionEncoder.of(plan.module, self.params, self.device)
        prepare_params([plan.module.functions[name] for name in runs], self.params)
        num_blocks = cfg.num_blocks if cfg.num_blocks is not None else self._blocks_that_fit(plan)
        self.num_blocks = self._agree_blocks(num_blocks)
        self.pool = allocate_pool(self.contract, max(self.num_blocks, 1), self.device)
        # recurrent layers' per-sequence state: a row per seat (the engine's BlockManager hands them out),
        # and with speculation K more per seat, the states after a verify step's rows (rollback_states)
        self.state = allocate_state(self.contract, state_rows(self.contract, cfg), self.device)
        self.warmup_s = self._warmup(cfg.max_num_batched_tokens, cfg.max_num_seqs) if self.device.type == "cuda" \
            else 0.0
        self.batches = Counter()  # "graph" or the reason a batch ran eagerly
        self.graphs = None
        self.verify_graphs = None  # DecodeGraphs of speculative verify steps
        self.no_graph_reason = self._graph_plan_reason(plan, cfg.enforce_eager)
        if self.no_graph_reason is None:
            from .cuda_graphs import DecodeGraphs

            sizes = [s for s in plan.cuda_graphs.sizes if s <= cfg.max_num_seqs] or [1]
            self.graphs = DecodeGraphs(self.forward, self.params, self.pool, self.block_size, sizes,
                                       max_model_len=cfg.max_model_len, device=self.device, comm=self.comm,
                                       state=self.state)
            q = cfg.verify_drafts + 1
            if cfg.verify_drafts and self.state:
                log.info("verify steps run eagerly: this plan's recurrent layers keep a state per draft row "
                         "(%.1f MiB of state rows for them)", self.contract.bytes_per_sequence() *
                         cfg.max_num_seqs * cfg.verify_drafts / 2**20)
            elif cfg.verify_drafts and self.world == 1:  # the plan's sizes for its K, else up to 1024 rows
                planned = plan.speculative is not None and plan.speculative.num_tokens == cfg.verify_drafts
                verify = list(plan.cuda_graphs.verify_sizes) if planned else [s for s in sizes if s * q <= 1024]
                self.verify_graphs = DecodeGraphs(
                    self.forward, self.params, self.pool, self.block_size,
                    [s for s in verify if s <= cfg.max_num_seqs] or [1],
                    max_model_len=cfg.max_model_len, device=self.device, q_per_seq=q)
        else:
            log.info("decode runs without CUDA graphs: %s", self.no_graph_reason)
        self.drafter = None  # the MTP head (mtp.py), for plans compiled with --speculative mtp
        if plan.speculative is not None:
            self.drafter = self._drafter(plan)

    one_rank_of_many = False  # True for the ranks of a sharded plan (distributed_runner.py)

    def _drafter(self, plan: Plan):
        """The MTP head's runner; its one-row chain steps captured at the decode graphs' sizes."""
        from .cuda_graphs import DecodeGraphs
        from .mtp import MtpDrafter

        draft = compile_function(plan.module, "draft")
        graphs = None
        if self.graphs is not None:
            hidden = plan.module.functions["draft"].inputs[2].type
            graphs = DecodeGraphs(draft, self.params, self.pool, self.block_size, self.graphs.sizes,
                                  max_model_len=self.cfg.max_model_len, device=self.device,
                                  hidden=(int(hidden.shape[1]), TORCH_DTYPES[hidden.dtype]))
        return MtpDrafter(draft, self.params, self.pool, self.block_size, self.device, graphs)

    def _agree_blocks(self, num_blocks: int) -> int:
        """The KV block count every rank uses (a world of one: its own)."""
        return num_blocks

    def close(self) -> None:
        """Release what the runner holds beyond memory (a world of one: nothing)."""

    def _warmup(self, max_tokens: int, max_seqs: int) -> float:
        """Run the eager batch shapes once (a full mixed step: decode rows next to a prefill
        chunk, then a short prefill) so kernels compile now, not inside the first requests."""
        start = time.perf_counter()
        bs, free = self.block_size, self.num_blocks
        decode = min(max_seqs - 1, 32, max(free // 4, 0))
        chunk = max(min(max_tokens - decode, (free - 2 * decode) * bs), 1)
        batches = [[(1, bs + 1, [2 * i, 2 * i + 1]) for i in range(decode)]
                   + [(chunk, chunk, list(range(2 * decode, 2 * decode + -(-chunk // bs))))],
                   [(min(chunk, 100), min(chunk, 100), list(range(-(-min(chunk, 100) // bs))))]]
        with torch.inference_mode():
            for seqs in batches:
                if max(max(b) for _, _, b in seqs) >= free:
                    continue
                n = sum(q for q, _, _ in seqs)
                # scratch use of state rows: a real sequence restarts its row at position 0
                state = (self.state, list(range(len(seqs)))) if self.state else None
                ctx = make_context(self.pool, bs, seqs, self.device, self.comm, state=state)
                zeros = torch.zeros(n, dtype=torch.long, device=self.device)
                self.forward(self.params, ctx, zeros, zeros, torch.tensor([n - 1], device=self.device))
        torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def _blocks_that_fit(self, plan: Plan) -> int:
        """KV blocks in what gpu_memory_utilization of the card leaves once weights are loaded,
        minus the plan's activation peak for the largest step, the logits and a reserve for CUDA graphs."""
        if self.device.type != "cuda":
            raise NanoForgeError("a CPU runner needs num_blocks (Engine sizes the CPU pool)")
        free, total = torch.cuda.mem_get_info(self.device)
        cfg, mem = self.cfg, plan.memory
        # the plan's live-value peak, doubled for kernel temporaries and allocator rounding
        activations = 2 * mem.activation_bytes_per_token * cfg.max_num_batched_tokens + \
            8 * cfg.max_num_seqs * plan.model.vocab_size
        reserve = 1 << 30  # CUDA graph pool, library workspaces
        budget = int(total * cfg.gpu_memory_utilization) - (total - free) - activations - reserve - \
            self.contract.bytes_per_sequence() * state_rows(self.contract, cfg)  # the per-sequence state pool
        block_bytes = mem.kv_bytes_per_token * self.block_size
        log.info("KV cache: %.2f GiB for %d blocks", max(budget, 0) / 2**30, max(budget, 0) // block_bytes)
        return max(budget, 0) // block_bytes

    def _graph_plan_reason(self, plan: Plan, enforce_eager: bool) -> str | None:
        if self.device.type != "cuda":
            return "not on a CUDA device"
        if enforce_eager:
            return "enforce_eager is set"
        info = plan.cuda_graphs
        return (info.reason or "the plan planned no graph sizes") if not info.sizes else None

    def execute(self, batch: ScheduledBatch,
                device_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int]]:
        """Logits f32[R, vocab] for the R sequences whose last token was computed this step,
        and their indices into batch.items. `device_tokens`: a decode batch whose input tokens
        (one per sequence, at position num_computed) are still on the device, not in token_ids."""
        if batch.drafts and self.verify_graphs is not None and self.verify_graphs.why_not(batch) is None:
            self.batches["verify graph"] += 1
            logits, self.hidden = self.verify_graphs.run(batch)
            return logits, list(range(len(batch.items)))
        if device_tokens is not None:
            sample_items = list(range(len(batch.items)))
            why = self.no_graph_reason or (None if len(batch.items) <= self.graphs.sizes[-1]  # type: ignore
                                           else "the batch exceeds the largest graph")
        else:
            sample_items = batch.sample_indices()
            why = self.no_graph_reason or self.graphs.why_not(batch)  # type: ignore[union-attr]
        if why is None:
            self.batches["graph"] += 1
            logits, self.hidden = self.graphs.run(batch, device_tokens)  # type: ignore[union-attr]
            return logits, sample_items
        self.batches[f"eager: {why}"] += 1
        tokens, seqs, rows = flat_batch(batch, sample_items, device_tokens is not None)
        slots = [seq.state_slot for seq, _ in batch.items] if self.state else None
        history = [self.history_row(seq.state_slot) if batch.drafts.get(i) else -1
                   for i, (seq, _) in enumerate(batch.items)] if self.state and batch.drafts else None
        vision = None
        if self.vision is not None:
            from .vision_runner import vision_batch

            vision = vision_batch(batch.items, self.vision, self.device)
        return self.run(tokens, seqs, rows, device_tokens, state_slots=slots, vision=vision,
                        state_history=history), sample_items

    def run(self, tokens: list[int], seqs: list[tuple[int, int, list[int]]], rows: list[int],
            device_tokens: torch.Tensor | None = None, ep_tokens: int | None = None,
            state_slots: list[int] | None = None, vision: Any = None, *,
            state_history: list[int] | None = None) -> torch.Tensor:
        """The forward over one flat batch (flat_batch's lists); logits of `rows`. `ep_tokens`:
        the most tokens any rank of the EP group runs this step (sharded plans). `state_slots`: each
        sequence's row of the per-sequence state pool (plans with recurrent layers); `state_history`:
        for a verify step, each sequence's first row for the states after its rows (-1: none)."""
        state = (self.state, state_slots) if self.state and state_slots is not None else None
        ctx = make_context(self.pool, self.block_size, seqs, self.device, self.comm, ep_tokens, state)
        ctx.state_history = list(state_history or [])
        ctx.vision = vision  # images of a vision-language plan's step (vision_runner.VisionBatch), else None
        ctx.carry = self.carry
        as_tensor = lambda xs: host_to_device(np.asarray(xs, np.int64), torch.long, self.device)  # noqa: E731
        token_ids = as_tensor(tokens) if device_tokens is None else device_tokens.to(torch.long)
        positions = as_tensor(ctx.host.positions if ctx.host is not None else positions_of(seqs))
        with torch.inference_mode():
            out = self.forward(self.params, ctx, token_ids, positions, as_tensor(rows))
        logits, self.hidden = out if isinstance(out, tuple) else (out, None)
        return logits

    def history_row(self, slot: int) -> int:
        """The first of the K state rows of `slot` that keep a verify step's per-row states."""
        assert self.cfg.verify_drafts and 0 <= slot < self.cfg.max_num_seqs, f"no state history for slot {slot}"
        return self.cfg.max_num_seqs + slot * self.cfg.verify_drafts

    def rollback_states(self, verified: list[tuple[int, int, int]]) -> None:
        """After a verify step: (state slot, drafts, drafts accepted) per verified sequence. Its slot
        holds the state after all its rows; where a draft was rejected, the state after the last
        accepted row (a history row) replaces it, so the state never includes a rejected draft."""
        moves = [(self.history_row(slot) + accepted, slot) for slot, drafts, accepted in verified if accepted < drafts]
        if not self.state or not moves:
            return
        src, dst = (torch.tensor(x, dtype=torch.long, device=self.device) for x in zip(*moves))
        for tensors in self.state:
            for t in tensors:
                t.index_copy_(0, dst, t.index_select(0, src))


def state_rows(contract: KVContract, cfg: RunnerConfig) -> int:
    """Rows of the per-sequence state pool: one per seat, and with speculation K more per seat (the
    states after each draft row of a verify step, kept until the step's acceptance is known)."""
    return cfg.max_num_seqs * (1 + cfg.verify_drafts) if contract.state else 0
