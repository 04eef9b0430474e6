"""Sampler: logits of the rows that finished a step -> next tokens (+ logprobs).

Order of operations follows vLLM: penalties on raw logits, then temperature, then top-k,
top-p and min-p filtering, then a draw from a per-request generator (so a seeded request is
reproducible whatever it is batched with). Logprobs are of the raw distribution.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling_params import SamplingParams


@dataclass
class SampleRequest:
    params: SamplingParams
    history: list[int]  # prompt + output ids, for penalties
    output: list[int]  # output ids only (frequency/presence count over these)
    generator: torch.Generator | None
    banned: list[int]  # ids that may not be drawn yet (eos before min_tokens)


def _penalize(logits: torch.Tensor, req: SampleRequest) -> torch.Tensor:
    p = req.params
    if p.repetition_penalty != 1 and req.history:
        seen = torch.tensor(sorted(set(req.history)), device=logits.device)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and req.output:
        ids, counts = torch.tensor(req.output, device=logits.device).unique(return_counts=True)
        logits[ids] -= p.frequency_penalty * counts.to(logits.dtype) + p.presence_penalty
    return logits


def _filter(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1 or p.min_p > 0:
        probs = torch.softmax(logits, dim=-1)
        if p.min_p > 0:
            logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
        if p.top_p < 1:
            sorted_p, order = torch.sort(probs, descending=True)
            drop = (sorted_p.cumsum(-1) - sorted_p) >= p.top_p  # keep the smallest set reaching top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, reqs: list[SampleRequest]) -> list[tuple[int, dict | None]]:
    """One token per row; with logprobs, {'token': lp, 'top': [(id, lp), ...]}."""
    logits = logits.float()
    if all(r.params.logprobs is None and not r.banned and not r.params.needs_history for r in reqs):
        tokens = sample_plain(logits, [r.params for r in reqs], [r.generator for r in reqs])
        if tokens is not None:
            return [(t, None) for t in tokens]
    return _sample_torch(logits, reqs)


def sample_plain(logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> list[int] | None:
    """Rows whose params are all `plain`: one argmax when every row is greedy, else the fused
    Triton kernel on CUDA; None when neither applies (the caller takes the per-row path). The
    engine calls this directly, so a decode step of plain requests builds no SampleRequests."""
    tokens = sample_plain_device(logits, params, generators)
    return None if tokens is None else tokens.tolist()


def sample_plain_device(logits: torch.Tensor, params: list[SamplingParams],
                        generators: list[torch.Generator | None]) -> torch.Tensor | None:
    """sample_plain without the device->host copy: the tokens stay where the logits are, so the
    next decode step can be launched on them before the host has seen them."""
    if all(p.temperature == 0 for p in params):
        return greedy_tokens(logits)  # the common case
    if _use_triton(logits):
        return _sample_triton(logits.float(), params, generators)
    return None


ARGMAX_CHUNK = 64  # columns per chunk of the CPU's two-level argmax
ARGMAX_SPLIT_MIN = 2048  # columns from which it beats one argmax (1.8x at 2k, 9x at 49k; 32 rows, 2 threads)


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(-1), exactly (the first of equal maxima; a NaN counts as the largest). On the CPU
    argmax is a scalar loop (1.3 ms for 32 rows of a 49k vocabulary, one core): there the row's
    chunks of ARGMAX_CHUNK columns are reduced by a vectorized amax, argmax picks the first chunk
    holding the row's maximum, and a second argmax the first maximum inside it."""
    n, v = logits.shape
    c = ARGMAX_CHUNK
    if logits.is_cuda or v % c or v < ARGMAX_SPLIT_MIN or not logits.is_contiguous():
        return logits.argmax(dim=-1)
    chunks = logits.view(n, v // c, c)
    first = chunks.amax(-1).argmax(-1, keepdim=True)
    inside = chunks.gather(1, first.unsqueeze(-1).expand(n, 1, c)).squeeze(1).argmax(-1)
    return first.squeeze(1) * c + inside


def _use_triton(logits: torch.Tensor) -> bool:
    """The fused kernel on CUDA; tests patch this to run it in Triton's interpreter."""
    return logits.is_cuda


def _sample_triton(logits: torch.Tensor, params: list[SamplingParams],
                   generators: list[torch.Generator | None]) -> torch.Tensor:
    """Temperature/top-k/top-p/min-p rows in one Triton launch instead of a per-row loop with a
    device->host copy each. One uniform per row, from the request's generator when it has one,
    keeps seeded requests reproducible whatever they are batched with."""
    from ..kernels.triton.sampling import sample_tokens

    u = torch.rand(len(params))  # unseeded rows: the global CPU generator
    for i, (p, g) in enumerate(zip(params, generators)):
        if g is not None and not p.greedy:
            u[i] = torch.rand((), generator=g)
    cols = torch.tensor([[p.temperature for p in params], [p.top_k for p in params],
                         [p.top_p for p in params], [p.min_p for p in params]], dtype=torch.float32)
    cols = torch.cat([cols, u[None]]).to(logits.device, non_blocking=True)  # one host->device copy
    return sample_tokens(logits, *cols)


def processed_logits(row: torch.Tensor, req: SampleRequest) -> torch.Tensor:
    """One row as the draw sees it: penalties, banned ids, then (not greedy) temperature and the
    top-k / top-p / min-p filters. Greedy takes its argmax, sampling its softmax."""
    p = req.params
    row = row.to(torch.float32, copy=True)  # a copy, widened (the logits come in the model's dtype)
    row = _penalize(row, req) if p.needs_history else row
    if req.banned:
        row[req.banned] = float("-inf")
    return row if p.greedy else _filter(row / p.temperature, p)


def logprob_info(row: torch.Tensor, token: int, k: int) -> dict:
    """{'token': logprob of `token`, 'top': the k most likely (id, logprob)}, of the raw distribution."""
    raw = torch.log_softmax(row.float(), dim=-1)
    top = torch.topk(raw, k) if k else None
    return {"token": float(raw[token]), "top": [] if top is None else list(zip(top.indices.tolist(), top.values.tolist()))}


def _sample_torch(logits: torch.Tensor, reqs: list[SampleRequest]) -> list[tuple[int, dict | None]]:
    out = []
    for row, req in zip(logits, reqs):
        p = req.params
        x = processed_logits(row, req)
        if p.greedy:
            token = int(torch.argmax(x))
        else:
            token = int(torch.multinomial(torch.softmax(x, dim=-1).cpu(), 1, generator=req.generator))
        out.append((token, None if p.logprobs is None else logprob_info(row, token, p.logprobs)))
    return out
