"""The engine loop: schedule a flat batch, run it, sample, apply stop rules, free blocks."""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, replace

import torch

from .. import defaults
from ..errors import NanoForgeError
from ..models.checkpoint import Checkpoint
from ..plan import Plan
from .block_manager import BlockManager
from .engine_config import EngineConfig, EngineMetrics, check_config, spec_config, with_step_tokens
from .kv_transfer import KVStore, local_store
from .launchers import check_launcher
from .model_runner import ModelRunner, RunnerConfig
from .sampler import SampleRequest, sample, sample_plain, sample_plain_device
from .sampling_params import SamplingParams
from .scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from .sequence import Sequence, Status
from .speculative import Speculator
from .state_slots import check_state_support, prefix_caching_note
from .tokenizer import Tokenizer

log = logging.getLogger("nanoforge.engine")


@dataclass
class _InFlight:
    seqs: list[Sequence]  # rows of the launched step
    tokens: torch.Tensor  # their sampled tokens, on the device
    start: float
    kv_positions: int  # context positions the step attends, over its rows (step metrics)
    host: torch.Tensor | None = None  # CUDA: a pinned copy of `tokens`, complete once `ready` has fired
    ready: "torch.cuda.Event | None" = None

    def token_list(self) -> list[int]:
        """The sampled tokens on the host. On CUDA this waits for this step only: `tokens.tolist()`
        would also wait for the step already queued behind it, leaving the GPU idle while the host
        then prepares the next launch (about 1 ms a step at batch 256)."""
        if self.ready is None:
            return self.tokens.tolist()
        self.ready.synchronize()
        return self.host.tolist()  # type: ignore[union-attr]


class Engine:
    def __init__(self, plan: Plan, ckpt: Checkpoint | None, tokenizer: Tokenizer | None, cfg: EngineConfig,
                 progress: bool = True, runner: ModelRunner | None = None):
        check_config(cfg)
        self.cfg = cfg = with_step_tokens(cfg)
        self.tokenizer = tokenizer
        self.vision_spec = None  # vision-language plans: how their images are preprocessed (vision_inputs.py)
        if "encode" in plan.module.functions:
            from .vision_inputs import VisionSpec

            self.vision_spec = VisionSpec.of(plan.config, getattr(ckpt, "path", None))
        spec_cfg = spec_config(cfg, plan)
        check_state_support(plan.kv_contract, plan.parallel.sharded)
        self.vocab_size = plan.model.vocab_size
        model_len = cfg.max_model_len or plan.model.max_position_embeddings
        bs = plan.kv_contract.block_size
        block_bytes = max(plan.memory.kv_bytes_per_token * bs, 1)
        num_blocks = cfg.num_blocks or (cfg.kv_cache_memory // block_bytes if cfg.kv_cache_memory else None)
        if num_blocks is None and cfg.device == "cpu":
            num_blocks = defaults.CPU_KV_CACHE_BYTES // block_bytes
        check_launcher(cfg.launcher)
        runner_cfg = RunnerConfig(cfg.device, num_blocks, model_len, cfg.max_num_seqs, cfg.max_num_batched_tokens,
                                  cfg.gpu_memory_utilization, cfg.enforce_eager, progress,
                                  spec_cfg.num_tokens if spec_cfg.method else 0)
        if runner is not None:
            self.runner = runner
        elif plan.parallel.sharded:  # one process per rank, this one is rank 0
            from .distributed_runner import DistributedRunner

            self.runner = DistributedRunner(plan, ckpt, runner_cfg, cfg.launcher, cfg.ray_address)
        else:
            if cfg.launcher != "local":
                log.info("launcher %s ignored: the plan runs as one rank, in this process", cfg.launcher)
            self.runner = ModelRunner(plan, ckpt, runner_cfg)
        self.spec = None if spec_cfg.method is None else \
            Speculator(spec_cfg, getattr(self.runner, "drafter", None) if spec_cfg.method == "mtp" else None)
        if self.spec is not None:  # verify graphs take exactly K drafts a sequence
            self.spec.uniform = getattr(self.runner, "verify_graphs", None) is not None
            if plan.kv_contract.state:  # recurrent state: back to the last accepted token after each verify
                self.spec.rollback = self.runner.rollback_states
        num_blocks = self.runner.num_blocks if runner is None else (num_blocks or 1)
        if num_blocks < 1:
            raise NanoForgeError("no memory left for the KV cache: lower max_num_batched_tokens or raise "
                                 "gpu_memory_utilization")
        self.max_model_len = self._fit_model_len(model_len, num_blocks * bs, explicit=cfg.max_model_len is not None)
        kv = plan.kv_contract
        self.kv_cache = {"dtype": kv.dtype_label(),
                         "blocks": num_blocks, "block_size": bs, "tokens": num_blocks * bs,
                         "bytes_per_token": plan.memory.kv_bytes_per_token,  # what the pool holds (metrics)
                         "prefix_caching": prefix_caching_note(kv, cfg.prefix_caching)}
        if kv.state:  # recurrent layers: a state row per sequence, max_num_seqs of them (the runner's pool)
            self.kv_cache.update(state_slots=cfg.max_num_seqs, state_bytes_per_sequence=kv.bytes_per_sequence())
        self._len_note = " (all the KV cache holds)" if self.max_model_len < model_len else ""
        sched_cfg = SchedulerConfig(cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.max_prefill_chunk)
        if (dp := plan.parallel.attention_dp) > 1:  # a scheduler and KV pool per DP replica, in lockstep
            from .dp_scheduler import DPScheduler

            self.scheduler = DPScheduler(sched_cfg, num_blocks, bs, cfg.prefix_caching, dp)
            self.blocks = self.scheduler.blocks  # type: ignore[assignment]
            self.cfg = replace(cfg, overlap_decode=False)  # a chained step would need each replica's tokens
        else:
            self.blocks = BlockManager(num_blocks, bs, self.kv_cache["prefix_caching"] == "on",
                                       cfg.max_num_seqs if kv.state else 0)
            self.scheduler = Scheduler(sched_cfg, self.blocks)
        self.eos_ids = list(tokenizer.eos_token_ids) if tokenizer else []
        self.metrics = EngineMetrics()
        self._ids = itertools.count()
        self.keep_logits = False  # tests and scoring: keep each sequence's latest logits row
        self.seqs: dict[int, Sequence] = {}
        self._pending: _InFlight | None = None  # a launched decode step whose tokens are on the device
        self._last_resolve = 0.0

    @staticmethod
    def _fit_model_len(model_len: int, pool_tokens: int, explicit: bool) -> int:
        """The longest sequence the engine admits: the model's (or the user's) limit, cut to what
        one sequence can hold in the KV pool; a limit the user set that the pool cannot hold is an
        error (as in vLLM), the model's own is lowered and logged."""
        if model_len <= pool_tokens:
            return model_len
        if explicit:
            raise NanoForgeError(f"max_model_len {model_len} is more than the KV cache holds ({pool_tokens} tokens): "
                                 "lower max_model_len, or give the cache more memory (num_blocks, kv_cache_memory, "
                                 "gpu_memory_utilization)")
        log.info("max_model_len %d -> %d: the KV cache holds %d tokens", model_len, pool_tokens, pool_tokens)
        return pool_tokens

    # -- what callers may look at (serving, LLM, benchmarks) ---------------------------------------
    @property
    def block_size(self) -> int:
        return self.blocks.block_size

    def kv_pool(self) -> list[tuple[torch.Tensor, ...]]:
        """The paged KV pool tensors, per attention layer (laid out as the plan's KV contract says)."""
        return self.runner.pool

    def kv_store(self) -> KVStore:
        """The pool as PD moves it, in the one-rank layout (a sharded engine's goes through its ranks)."""
        store = getattr(self.runner, "kv_store", None)
        return store() if store is not None else \
            local_store(self.runner.pool, self.runner.contract, getattr(self.runner, "state", None))

    def kv_replica(self, seq: Sequence) -> int:
        """The attention-DP replica whose pool holds `seq`'s KV (0 for other plans)."""
        return getattr(self.scheduler, "owner", {}).get(seq.seq_id, 0)

    def kv_block_ids(self, seq: Sequence, first_block: int, num_tokens: int) -> list[int]:
        """The pool blocks holding tokens first_block * block_size .. num_tokens - 1 of `seq`."""
        return seq.block_table[first_block:self.blocks.blocks_needed(num_tokens)]

    def stats(self) -> dict[str, float]:
        """Load and cache counters, for /metrics and routers."""
        total, free = self.blocks.num_blocks, self.blocks.num_free
        return {"num_running": len(self.scheduler.running), "num_waiting": len(self.scheduler.waiting),
                "kv_blocks_total": total, "kv_blocks_free": free, "kv_usage": 1 - free / max(total, 1),
                "kv_tokens_total": self.kv_cache["tokens"],
                "prefix_cache_queries": self.blocks.queries, "prefix_cache_hits": self.blocks.hits,
                "prompt_tokens": self.metrics.prompt_tokens, "generated_tokens": self.metrics.generated_tokens,
                "steps": self.metrics.steps, "preemptions": self.scheduler.num_preemptions,
                **({} if (rows := getattr(self.blocks, "state", None)) is None else  # recurrent layers' state rows
                   {"state_slots_total": rows.num_slots, "state_slots_free": rows.num_free}),
                **({} if (vision := getattr(self.runner, "vision", None)) is None else  # images run through the tower
                   {"images_encoded": vision.encoded}),
                **({} if self.spec is None else self.spec.stats.counters())}

    def metrics_summary(self) -> dict:
        """Step times, batch shapes and how each batch ran (CUDA graph, or why eager)."""
        out = {**self.metrics.summary(self.blocks, self.scheduler.num_preemptions, getattr(self.runner, "batches", None)),
               "kv_cache": self.kv_cache}
        if self.spec is not None:
            out["speculative"] = {"method": self.spec.cfg.method, "num_tokens": self.spec.cfg.num_tokens,
                                  **self.spec.stats.summary()}
            if self.spec.mtp is not None:  # the draft head's chain steps: replayed graphs or eager
                out["speculative"]["draft_batches"] = dict(self.spec.mtp.batches)
        return out

    def runner_info(self) -> dict:
        """Start-up facts of the model runner: the decode graph sizes captured and the warm-up time."""
        graphs = getattr(self.runner, "graphs", None)
        return {"warmup_s": getattr(self.runner, "warmup_s", 0.0),
                "no_graph_reason": getattr(self.runner, "no_graph_reason", None),
                "cuda_graphs": None if graphs is None else {"sizes": list(graphs.sizes), "capture_s": graphs.capture_s,
                                                            "capture_mib": graphs.capture_bytes / 2**20}}

    def reset_prefix_cache(self) -> None:
        """Drop the prefix cache (benchmarks that rerun the same prompts)."""
        self.blocks.reset_prefix_cache()

    def forget(self, seq: Sequence) -> None:
        """Drop a finished sequence from the engine's table (its caller keeps the object)."""
        self.seqs.pop(seq.seq_id, None)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, images: list | None = None,
                    fit_max_tokens: bool = False) -> Sequence:
        """`images` (PIL images, paths, bytes, vision_inputs.ImageInput, or an encode engine's embedding maps:
        image_embeds.py), one per image placeholder token of the prompt, in order; such a request runs
        without prefix caching. `fit_max_tokens`: lower max_tokens to what max_model_len leaves once the
        placeholders are expanded (the OpenAI server's default max_tokens, which counts the prompt before
        expansion)."""
        mm = None
        if images:
            prompt_ids, mm = self._with_images(list(prompt_ids), images)
            if fit_max_tokens and len(prompt_ids) < self.max_model_len:
                params = replace(params, max_tokens=min(params.max_tokens,
                                                       self.max_model_len - len(prompt_ids)))
        self._check_request(prompt_ids, params)
        seq = self._new_sequence(list(prompt_ids), params)
        seq.mm = mm
        self.scheduler.add(seq)
        self.metrics.prompt_tokens += len(prompt_ids)
        return seq

    def _with_images(self, prompt_ids: list[int], images: list) -> tuple[list[int], object]:
        """(the prompt with its placeholders expanded, the sequence's MultimodalPrompt)."""
        from .vision_inputs import ImageInput, check_image_count, preprocess
        from .vision_runner import MultimodalPrompt

        if self.vision_spec is None:
            raise NanoForgeError("this model takes no images (its plan has no vision encoder)")
        check_image_count(len(images))
        if any(isinstance(im, dict) for im in images):  # an encode engine's embeddings (EPD): no tower runs here
            from .image_embeds import image_from_wire

            images = [image_from_wire(im, self.vision_spec, self.runner.vision, f"image_embeds[{i}]")
                      for i, im in enumerate(images)]
        inputs = [im if isinstance(im, ImageInput) else preprocess(im, self.vision_spec, f"image {i}")
                  for i, im in enumerate(images)]
        return MultimodalPrompt.build(prompt_ids, inputs, self.vision_spec)

    def _new_sequence(self, token_ids: list[int], params: SamplingParams, num_prompt: int = 0) -> Sequence:
        seq = Sequence(next(self._ids), token_ids, params, num_prompt=num_prompt)
        if params.seed is not None:
            seq.generator = torch.Generator().manual_seed(params.seed)
        self.seqs[seq.seq_id] = seq
        return seq

    def _check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise NanoForgeError("prompt is empty")
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.vocab_size:
            raise NanoForgeError(f"prompt token ids must be in [0, {self.vocab_size}); got {min(prompt_ids)}.."
                                 f"{max(prompt_ids)}")
        if len(prompt_ids) >= self.max_model_len:
            raise NanoForgeError(f"prompt has {len(prompt_ids)} tokens; max_model_len is {self.max_model_len}"
                                 f"{self._len_note} (the prompt plus at least one generated token must fit)")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:  # the OpenAI server's rule, for every caller
            raise NanoForgeError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) is more than "
                                 f"max_model_len {self.max_model_len}{self._len_note}; lower max_tokens to at most "
                                 f"{self.max_model_len - len(prompt_ids)}")

    def abort(self, seq_id: int) -> None:
        seq = self.seqs.pop(seq_id, None)
        if seq is not None and seq.status is not Status.FINISHED:
            self._finalize_text(seq)
            self.scheduler.finish(seq, "abort")

    def close(self) -> None:
        """Stop what the runner started (the worker ranks of a sharded plan)."""
        getattr(self.runner, "close", lambda: None)()

    def has_work(self) -> bool:
        return self._pending is not None or self.scheduler.has_work()

    def step(self) -> list[Sequence]:
        """Run one batch; return the sequences that got a token (finished ones included).

        A decode-only batch of plain requests is launched and left in flight: its tokens stay on
        the device and are resolved by the next call, which first launches the following decode
        step on them when it can (same sequences, no admissions, blocks at hand). The host's
        bookkeeping for step N then runs while the GPU computes step N+1."""
        if self._pending is not None:
            prev, self._pending = self._pending, None
            chained = self._chain_batch(prev)
            if chained is not None:
                self._pending = self._launch(chained, prev)
            return self._resolve(prev)
        start = time.perf_counter()
        batch = self.scheduler.schedule()
        if not batch.items:
            return []
        if self.spec is not None:
            self.spec.propose(batch, self.blocks, self.cfg.max_num_batched_tokens - batch.num_tokens,
                              self.max_model_len)
        if self._can_defer(batch):
            self._pending = self._launch(batch, None)
            return []
        starts = [seq.num_computed for seq, _ in batch.items]
        kv_positions = sum(starts) + batch.num_tokens
        logits, sample_items = self.runner.execute(batch)
        verified, emitted = [], 0
        if batch.drafts:
            logits, sample_items, verified, emitted = self.spec.verify(  # type: ignore[union-attr]
                batch, logits, sample_items, self.blocks, self._sample_request, self._append)
        commit = self.blocks.commit
        for i, (seq, n) in enumerate(batch.items):
            if i not in batch.drafts:
                seq.num_computed += n
                commit(seq)
        out = [batch.items[i][0] for i in sample_items]
        tokens = None
        if all(seq.params.plain for seq in out):  # no SampleRequests, one kernel
            tokens = sample_plain(logits, [seq.params for seq in out], [seq.generator for seq in out])
        results = sample(logits, [self._sample_request(seq) for seq in out]) if tokens is None else \
            [(t, None) for t in tokens]
        for row, (seq, (token, info)) in enumerate(zip(out, results)):
            if self.keep_logits:
                seq.logits = logits[row].float().cpu()
            self._append(seq, token, info)
        self.metrics.generated_tokens += len(out) + emitted
        if self.spec is not None:
            self.spec.after_step(batch, starts, getattr(self.runner, "hidden", None))
        out += verified
        self.metrics.steps += 1
        self.metrics.tokens_per_step.append(batch.num_tokens)
        self.metrics.rows_per_step.append(len(batch.items))
        self.metrics.kv_per_step.append(kv_positions)
        self.metrics.step_times.append(time.perf_counter() - start)
        decode_only = batch.num_tokens - sum(batch.drafts.values()) == len(batch.items)
        self.metrics.decode_flags.append(decode_only)
        if decode_only:
            self.metrics.decode_step_times.append(self.metrics.step_times[-1])
        return out

    # -- decode steps left in flight (see step) --------------------------------------------------
    def _can_defer(self, batch: ScheduledBatch) -> bool:
        if not self.cfg.overlap_decode or self.keep_logits or self.spec is not None:  # drafts need host tokens
            return False
        if "state_slots" in self.kv_cache and any(not seq.num_output for seq, _ in batch.items):
            return False  # a chained step would advance the state of a PD prefill past the token it parks at
        for seq, n in batch.items:
            if n != 1 or seq.num_computed + 1 != len(seq.token_ids) or not seq.params.plain:
                return False
        p = [seq.params for seq, _ in batch.items]
        return all(x.temperature == 0 for x in p) or self.runner.device.type == "cuda"

    def _chain_batch(self, prev: "_InFlight") -> ScheduledBatch | None:
        """The decode step after `prev`, if it can run on prev's device tokens: nothing waits for
        admission and every running sequence was in prev. Sequences that prev's token ends by
        length are left out; ones it ends by a stop token run one wasted row (dropped at resolve)."""
        sched = self.scheduler
        if sched.waiting or len(sched.running) != sum(s.status is Status.RUNNING for s in prev.seqs):
            return None
        items = []
        for seq in prev.seqs:
            if seq.status is not Status.RUNNING:
                continue
            num_output = len(seq.token_ids) + 1 - seq.num_prompt  # with prev's token
            if num_output >= seq.params.max_tokens or len(seq.token_ids) + 1 >= self.max_model_len:
                continue
            items.append((seq, 1))
        blocks = self.blocks
        room, stateless = getattr(blocks, "block_size", 0), getattr(blocks, "state", None) is None
        for seq, _ in items:  # the slot of the unknown token: position num_computed
            if seq.num_computed < len(seq.block_table) * room and (stateless or seq.state_slot >= 0):
                continue  # its last block has room and it has its state row: grow would do nothing
            if not blocks.can_grow(seq, 1):
                return None
            blocks.grow(seq, 1)
        return ScheduledBatch(items) if items else None

    def _launch(self, batch: ScheduledBatch, prev: "_InFlight | None") -> "_InFlight":
        seqs = [seq for seq, _ in batch.items]
        inputs = None
        if prev is not None:
            if len(seqs) == len(prev.seqs) and all(a is b for a, b in zip(seqs, prev.seqs)):
                inputs = prev.tokens  # the same rows (the usual case): no reindexing
            else:
                row = {id(s): i for i, s in enumerate(prev.seqs)}
                idx = [row[id(s)] for s in seqs]
                inputs = prev.tokens[torch.tensor(idx, device=prev.tokens.device)]
        kv_positions = sum(seq.num_computed for seq in seqs) + len(seqs)
        logits, _ = self.runner.execute(batch, device_tokens=inputs)
        for seq in seqs:
            seq.num_computed += 1  # committed at resolve, once the input token is in token_ids
        tokens = sample_plain_device(logits, [s.params for s in seqs], [s.generator for s in seqs])
        assert tokens is not None, "_can_defer admitted a batch sample_plain_device cannot serve"
        if not tokens.is_cuda:
            return _InFlight(seqs, tokens, time.perf_counter(), kv_positions)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return _InFlight(seqs, tokens, time.perf_counter(), kv_positions, host, ready)

    def _resolve(self, p: "_InFlight") -> list[Sequence]:
        tokens = p.token_list()  # waits for that step (the next one is already queued)
        commit, out = self.blocks.commit, []
        for seq, token in zip(p.seqs, tokens):
            if seq.status is not Status.RUNNING:  # finished by the previous token, or aborted
                continue
            self._append(seq, token, None)
            commit(seq)  # after the append: a chained step already counts the token's position
            out.append(seq)
        now = time.perf_counter()
        m = self.metrics
        m.generated_tokens += len(out)
        m.steps += 1
        m.tokens_per_step.append(len(p.seqs))
        m.rows_per_step.append(len(p.seqs))
        m.kv_per_step.append(p.kv_positions)
        m.step_times.append(now - max(p.start, self._last_resolve))
        m.decode_flags.append(True)
        m.decode_step_times.append(m.step_times[-1])
        self._last_resolve = now
        return out

    def _sample_request(self, seq: Sequence) -> SampleRequest:
        p = seq.params
        banned = []
        if seq.num_output < p.min_tokens:
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else self.eos_ids)
        history = (seq.token_ids, seq.output_ids) if p.needs_history else ([], [])
        return SampleRequest(p, *history, seq.generator, banned)

    def _append(self, seq: Sequence, token: int, info: dict | None) -> None:
        p, ids = seq.params, seq.token_ids
        ids.append(token)
        if info is not None:
            seq.logprobs.append(info)
        reason, num_output = None, len(ids) - seq.num_prompt
        if num_output >= p.min_tokens:
            if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids):
                reason = "stop"
            elif p.stop and self._stop_string_in_tail(seq):
                reason = "stop"
        if reason is None and (num_output >= p.max_tokens or len(ids) >= self.max_model_len):
            reason = "length"
        if reason is not None:
            self._finalize_text(seq)
            self.scheduler.finish(seq, reason)

    def _stop_string_in_tail(self, seq: Sequence) -> bool:
        """Decode only the last few tokens: enough to hold any stop string that the newest token
        completed (earlier occurrences were caught at earlier tokens)."""
        if self.tokenizer is None:
            return False
        window = max(len(s) for s in seq.params.stop) + 8
        tail = self.tokenizer.decode(seq.token_ids[max(seq.num_prompt, seq.num_tokens - window):])
        return any(s in tail for s in seq.params.stop)

    def _finalize_text(self, seq: Sequence) -> None:
        """Full text once, at the end; cut before the first stop string."""
        if self.tokenizer is None:
            return
        seq.text = self.tokenizer.decode(seq.output_ids)
        hits = [i for i in (seq.text.find(s) for s in seq.params.stop) if i >= 0]
        if hits:
            seq.text = seq.text[:min(hits)]

    def run_until_done(self) -> None:
        while self.has_work():
            self.step()

    # -- PD disaggregation: a sequence may leave the scheduler holding its KV blocks -------------
    def park(self, seq: Sequence) -> "torch.cuda.Event | None":
        """Take a prefilled sequence out of scheduling but keep its blocks, so that a decode engine
        can pull its KV (release_parked frees them). On CUDA, returns an event recorded after the
        steps that wrote that KV, for a reader on another thread to wait on."""
        self.scheduler.detach(seq)
        seq.status, seq.finish_reason = Status.FINISHED, "prefilled"
        self.seqs.pop(seq.seq_id, None)
        if self.runner.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def release_parked(self, seq: Sequence) -> None:
        """Free the blocks of a sequence outside the scheduler (parked, or being migrated in)."""
        self.seqs.pop(seq.seq_id, None)
        self.blocks.release(seq)

    def add_migrated(self, token_ids: list[int], num_prompt: int, params: SamplingParams, num_kv: int, *,
                     images: list | None = None, fit_max_tokens: bool = False) -> tuple[Sequence, int | None]:
        """A request prefilled on another engine: token_ids = prompt + the tokens it sampled there,
        the first num_kv of which have KV over there. Blocks for them are allocated here (prefix
        cache hits first) but the sequence is not scheduled until resume_migrated. Returns it and
        the first block to pull (earlier ones were cached here); when the pool cannot hold the KV
        now, the sequence is queued to recompute instead and the block is None. With `images` (as
        add_request takes them) the prompt's placeholders are expanded here as there (num_prompt and
        num_kv count the prompt before and after expansion): its rope positions come from them, and a
        recompute (a failed pull, a preemption) runs them through the encoder, or uses their embeddings."""
        mm = None
        if images and 0 < num_prompt < len(token_ids):
            expanded, mm = self._with_images(list(token_ids[:num_prompt]), images)
            token_ids, num_prompt = expanded + list(token_ids[num_prompt:]), len(expanded)
            if fit_max_tokens and num_prompt < self.max_model_len:
                params = replace(params, max_tokens=min(params.max_tokens, self.max_model_len - num_prompt))
        if not 0 < num_prompt < len(token_ids) or not 0 < num_kv < len(token_ids):
            raise NanoForgeError(f"migrated request: num_prompt ({num_prompt}) and num_tokens ({num_kv}) must be "
                                 f"in [1, {len(token_ids) - 1}] for {len(token_ids)} tokens")
        self._check_request(token_ids[:num_prompt], params)
        out = token_ids[num_prompt:]
        if min(out) < 0 or max(out) >= self.vocab_size or len(token_ids) >= self.max_model_len:
            raise NanoForgeError(f"migrated request: output ids must be in [0, {self.vocab_size}) and "
                                 f"{len(token_ids)} tokens below max_model_len {self.max_model_len}")
        seq = self._new_sequence(list(token_ids), params, num_prompt)
        seq.mm = mm  # before match_prefix: a sequence with images shares no cached blocks
        if params.logprobs is not None:  # the source engine sent those tokens' logprobs
            seq.logprobs = [{"token": 0.0, "top": []} for _ in out]
        if hasattr(self.scheduler, "place"):  # attention-DP: the replica that will own its KV
            self.scheduler.place(seq)
        self.blocks.match_prefix(seq)
        first, need = len(seq.block_table), num_kv - seq.num_computed
        if need > 0 and not self.blocks.can_grow(seq, need):
            self.blocks.release(seq)
            seq.num_cached = 0
            self.scheduler.add(seq)
            return seq, None
        self.blocks.grow(seq, max(need, 0))
        return seq, first

    def resume_migrated(self, seq: Sequence, num_kv: int) -> None:
        """The pull for add_migrated's sequence ended: num_kv tokens now have KV here (0: it
        failed, so the prompt is recomputed). Either way the sequence is next to be admitted."""
        if num_kv:
            seq.num_computed = max(seq.num_computed, num_kv)
            self.blocks.commit(seq)
        else:
            self.blocks.release(seq)
            seq.num_cached = 0
        self.scheduler.readmit(seq)
