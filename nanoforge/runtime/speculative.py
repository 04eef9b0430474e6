"""Speculative decoding in the runtime: draft tokens for decoding sequences, verify them in one
target step, keep the longest accepted prefix plus one token of the target's own.

A decode row of sequence s (its last token at position c) becomes 1 + d rows: the token and d
drafts. The step writes K/V for all of them and returns logits for each; row j is the target's
distribution for position c + 1 + j. Greedy: draft j + 1 is accepted while it equals row j's argmax,
so the output is exactly greedy decoding's. Sampling: the drafts are point proposals, so draft t is
kept with probability p_j(t) and, on the first rejection, a token is drawn from p_j with t removed
(renormalized): the standard rejection rule for a one-hot draft distribution, which leaves every
emitted token distributed as the target's. Afterwards the sequence keeps the K/V of the accepted
positions only; blocks grown for rejected ones go back to the free list unregistered, so they
never enter the prefix cache. A plan with recurrent layers (Gated DeltaNet) kept the state after each
verify row; `rollback` puts the one after the last accepted row in the sequence's slot.

Drafts come from `ngram` (prompt lookup): the tokens that followed the most recent earlier
occurrence of the sequence's last n tokens, longest n first. No extra weights, and it pays off
where the output repeats the input (editing, summarising, code). Or from `mtp`: the checkpoint's
multi-token-prediction head, which a plan compiled with `--speculative mtp` carries as its draft
function (mtp.py runs it)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..errors import NanoForgeError
from .mtp import MtpDrafter

METHODS = ("ngram", "mtp")


@dataclass(frozen=True)
class SpecConfig:
    method: str | None = None  # None (off) | ngram | mtp (the plan's draft function)
    num_tokens: int = 3  # drafts per step and sequence (K)
    ngram_max: int = 4  # longest suffix looked up
    ngram_min: int = 1

    def __post_init__(self) -> None:
        if self.method is None:
            return
        if self.method not in METHODS:
            raise NanoForgeError(f"--speculative {self.method!r}: choose ngram or mtp")
        if self.num_tokens < 1:
            raise NanoForgeError(f"--num-speculative-tokens {self.num_tokens}: must be at least 1")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise NanoForgeError(f"ngram sizes {self.ngram_min}..{self.ngram_max}: need 1 <= min <= max")


def ngram_drafts(tokens: list[int], k: int, n_max: int = 4, n_min: int = 1) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of tokens' last n tokens."""
    size = len(tokens)
    if size < 2 or k < 1:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    starts = np.flatnonzero(arr[:-1] == arr[-1])[::-1]  # earlier places of the last token, latest first
    for n in range(min(n_max, size - 1), n_min - 1, -1):
        for end in starts:  # arr[end] == arr[-1]; the match is arr[end - n + 1 .. end]
            if end - n + 1 >= 0 and np.array_equal(arr[end - n + 1: end + 1], arr[size - n:]):
                follow = tokens[end + 1: end + 1 + k]
                if follow:
                    return follow
    return []


@dataclass
class SpecStats:
    """Acceptance per draft position and mean tokens per verify row (metrics)."""

    proposed: list[int] = field(default_factory=list)  # drafts offered at position j
    accepted: list[int] = field(default_factory=list)  # of those, accepted
    verify_rows: int = 0  # sequences verified (one per sequence and step)
    emitted: int = 0  # tokens they produced (accepted drafts + one each)

    def record(self, num_drafts: int, num_accepted: int, num_emitted: int) -> None:
        while len(self.proposed) < num_drafts:
            self.proposed.append(0)
            self.accepted.append(0)
        for j in range(num_drafts):
            self.proposed[j] += 1
            self.accepted[j] += j < num_accepted
        self.verify_rows += 1
        self.emitted += num_emitted

    def summary(self) -> dict:
        """For llm.metrics(); counters() gives the same under /metrics' names."""
        return {"acceptance_rate_per_position": [a / p if p else 0.0 for a, p in zip(self.accepted, self.proposed)],
                "drafts_proposed": sum(self.proposed), "drafts_accepted": sum(self.accepted),
                "verify_rows": self.verify_rows, "emitted_tokens": self.emitted,
                "mean_accepted_length": self.emitted / self.verify_rows if self.verify_rows else 0.0}

    def counters(self) -> dict:
        """For the engine's stats (/metrics): summary()'s figures as spec_* counters."""
        return {f"spec_{k}": v for k, v in self.summary().items() if k != "mean_accepted_length"}


def accept_greedy(targets: list[int], drafts: list[int]) -> list[int]:
    """Tokens emitted: the target's argmax per row, up to and including the first that differs
    from its draft (all d + 1 when every draft matches)."""
    out = []
    for target, draft in zip(targets, drafts):
        out.append(target)
        if target != draft:
            return out
    out.append(targets[len(drafts)])
    return out


def accept_sampled(target: Callable[[int, list[int]], torch.Tensor], drafts: list[int],
                   generator: torch.Generator | None) -> list[int]:
    """Rejection sampling of point drafts. target(j, accepted) -> processed logits of row j given the
    tokens accepted before it (penalties see them). Returns the emitted tokens."""
    out: list[int] = []
    for j, draft in enumerate(drafts):
        probs = torch.softmax(target(j, out).float(), dim=-1).cpu()
        if float(torch.rand((), generator=generator)) < float(probs[draft]):
            out.append(draft)
            continue
        probs[draft] = 0.0
        out.append(int(torch.multinomial(probs / probs.sum(), 1, generator=generator)))
        return out
    probs = torch.softmax(target(len(drafts), out).float(), dim=-1).cpu()
    out.append(int(torch.multinomial(probs, 1, generator=generator)))
    return out


class Speculator:
    """The engine's speculative step: `propose` turns decode rows into draft rows before the target
    step runs, `verify` turns their logits into tokens afterwards and gives back the rest."""

    def __init__(self, cfg: SpecConfig, mtp: MtpDrafter | None = None):
        if (cfg.method == "mtp") != (mtp is not None):
            raise ValueError("an mtp Speculator needs the plan's drafter, and only it")
        self.cfg, self.stats, self.mtp = cfg, SpecStats(), mtp
        self.uniform = False  # give every decode row exactly K drafts (the runner has verify graphs)
        # plans with per-sequence recurrent state: told (state slot, drafts, accepted) of each verified
        # sequence after a verify step, to roll its state back to the last accepted token (the runner's)
        self.rollback: Callable[[list[tuple[int, int, int]]], None] | None = None

    def propose(self, batch, blocks, budget: int, max_model_len: int) -> None:
        """Append drafts to the decode rows of `batch` (sequence tokens and blocks grow with them,
        batch.drafts records how many) while `budget` extra tokens and free blocks last."""
        cfg, k = self.cfg, self.cfg.num_tokens
        rooms = {}
        for i, (seq, n) in enumerate(batch.items):
            if n == 1 and seq.num_computed + 1 == seq.num_tokens:
                rooms[i] = min(k, seq.params.max_tokens - seq.num_output - 1, max_model_len - seq.num_tokens - 1)
        if self.mtp is not None:  # the chain writes the draft layer's K/V past the token: blocks first
            left, wanted = budget, []
            for i, room in rooms.items():
                seq, room = batch.items[i][0], max(min(room, left), 0)
                if room and self.mtp.ready(seq) and blocks.can_grow(seq, 1 + room):
                    blocks.grow(seq, 1 + room)
                    left -= room
                else:
                    room = 0
                wanted.append((seq, room))
            found = {i: (room, d) for (i, room), d in zip(rooms.items(), self.mtp.chain(wanted))}
        else:
            found = {i: (room, ngram_drafts(batch.items[i][0].token_ids, room, cfg.ngram_max, cfg.ngram_min)
                         if room > 0 else []) for i, room in rooms.items()}
        pad = self.uniform and any(d for _, d in found.values())
        for i, (room, drafts) in found.items():
            seq = batch.items[i][0]
            if pad and room == k and len(drafts) < k:  # filler drafts (the last token again): a verify graph
                drafts = drafts + [(drafts or seq.token_ids)[-1]] * (k - len(drafts))  # runs K rows anyway
            drafts = drafts[:budget]
            if not drafts or not blocks.can_grow(seq, 1 + len(drafts)):
                continue
            seq.token_ids.extend(drafts)
            blocks.grow(seq, 1 + len(drafts))
            batch.items[i] = (seq, 1 + len(drafts))
            batch.drafts[i] = len(drafts)
            budget -= len(drafts)

    def after_step(self, batch, starts: list[int], hidden: torch.Tensor | None) -> None:
        """MTP: the draft head over the rows the step kept (`starts`: each item's num_computed before
        it; `hidden`: the target's final hidden state of every row it ran)."""
        if self.mtp is None or hidden is None:
            return
        items, flat = [], 0
        for (seq, n), start in zip(batch.items, starts):
            items.append((seq, start, seq.num_computed - start, flat))
            flat += n
        self.mtp.extend(items, hidden)

    def verify(self, batch, logits: torch.Tensor, sample_items: list[int], blocks,
               request_of: Callable, append: Callable) -> tuple[torch.Tensor, list[int], list, int]:
        """Accept drafts per sequence (see the module doc), keep the accepted positions' K/V and
        append the emitted tokens. Returns the logits and items of the rows without drafts (the
        caller samples those), the sequences verified here and the tokens they got."""
        from .sampler import logprob_info, processed_logits

        rest_rows, rest_items, done, row, emitted, verified = [], [], [], 0, 0, []
        greedy_rows = logits.argmax(dim=-1).tolist() if all(
            batch.items[i][0].params.greedy and batch.items[i][0].params.plain for i in batch.drafts) else None
        for i in sample_items:
            d = batch.drafts.get(i, 0)
            if not d:
                rest_rows.append(row)
                rest_items.append(i)
                row += 1
                continue
            seq, _ = batch.items[i]
            rows, base = logits[row: row + d + 1], seq.num_tokens - d
            drafts = seq.token_ids[base:]

            def target(j: int, accepted: list[int], seq=seq, rows=rows, base=base, drafts=drafts):
                seq.token_ids[base:] = accepted  # the history row j was computed after
                try:
                    return processed_logits(rows[j], request_of(seq))
                finally:
                    seq.token_ids[base:] = drafts

            if greedy_rows is not None:
                tokens = accept_greedy(greedy_rows[row: row + d + 1], drafts)
            elif seq.params.greedy:
                tokens = []
                for j in range(d + 1):
                    tokens.append(int(torch.argmax(target(j, tokens))))
                    if j == d or tokens[-1] != drafts[j]:
                        break
            else:
                tokens = accept_sampled(target, drafts, seq.generator)
            row += d + 1
            accepted = len(tokens) - 1
            self.stats.record(d, accepted, len(tokens))
            verified.append((seq.state_slot, d, accepted))  # before append: a finish gives the slot back
            del seq.token_ids[base + accepted:]  # K/V stays for the input token and the accepted drafts
            seq.num_computed += 1 + accepted
            blocks.trim(seq)
            blocks.commit(seq)
            del seq.token_ids[base:]
            k = seq.params.logprobs
            for j, t in enumerate(tokens):
                append(seq, t, None if k is None else logprob_info(rows[j], t, k))
                emitted += 1
                if seq.finish_reason is not None:
                    break
            done.append(seq)
        if self.rollback is not None and verified:
            self.rollback(verified)
        keep = torch.tensor(rest_rows, dtype=torch.long, device=logits.device)
        return logits.index_select(0, keep), rest_items, done, emitted
