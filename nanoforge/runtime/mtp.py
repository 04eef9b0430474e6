"""Drafts from the checkpoint's MTP head (a plan compiled with `--speculative mtp`, attach_mtp).

The draft function reads, for position i, the target's final hidden state h_i and the token at
i + 1, and predicts the token at i + 2; it keeps K/V of its own (one more layer of the pool, at the
sequence's own slots). Two calls per step keep it in step with the target:

- `extend`, after every target step, over the rows the target kept (a prefill chunk, a decode row,
  a verify step's accepted rows), with the tokens one position ahead: it writes the draft layer's
  K/V there, and for a sequence about to decode, its last row gives draft 1 and the state that
  draft 2 chains on. The slots exist already (the target wrote the same positions).
- `chain`, when the next step proposes, once its blocks have grown for the drafts: drafts 2..K,
  each a one-row step on the previous draft and state (replayed from CUDA graphs where captured). Their K/V land past the accepted tokens,
  where the next `extend` overwrites them with the real pairs before anything reads them.

Drafts are greedy (the head's argmax): point proposals, which rejection sampling turns into
samples of the target's own distribution (speculative.py). A sequence whose state is stale
(just admitted by PD migration, or recomputed after preemption) decodes one step without drafts;
its next `extend` catches it up. A prefix-cache hit reuses the draft layer's K/V of the cached
blocks as the first request wrote them: the last cached position saw that request's next token,
which only costs acceptance, never correctness."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch

from ..kernels.context import make_context
from .cuda_graphs import DecodeGraphs
from .sequence import Sequence, Status


@dataclass
class DraftState:
    """What the head left for a sequence: its draft of the token after next, and its state."""

    position: int  # the row it was computed at (the sequence's last computed position)
    token: int
    state: torch.Tensor  # [hidden]


class MtpDrafter:
    def __init__(self, draft: Callable, params: dict, pool: list, block_size: int, device: torch.device,
                 graphs: DecodeGraphs | None = None):
        self.draft, self.params, self.pool = draft, params, pool
        self.block_size, self.device = block_size, device
        self.graphs = graphs  # the chain's one-row steps, captured (CUDA)
        self.batches: Counter = Counter()  # chain steps: "graph" or "eager"

    def _run(self, tokens: list[int], seqs: list[tuple[int, int, list[int]]], hidden: torch.Tensor,
             rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = make_context(self.pool, self.block_size, seqs, self.device)
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long).to(self.device)  # noqa: E731
        positions = [p for q, c, _ in seqs for p in range(c - q, c)]
        with torch.inference_mode():
            return self.draft(self.params, ctx, as_long(tokens), as_long(positions), hidden, as_long(rows))

    def extend(self, items: list[tuple[Sequence, int, int, int]], hidden: torch.Tensor) -> None:
        """items: (sequence, first position, rows kept, first flat row of `hidden`) of one target step."""
        tokens, seqs, picks, rows, heads = [], [], [], [], []
        for seq, start, count, flat in items:
            if seq.status is not Status.RUNNING or count < 1 or seq.num_tokens <= start + count:
                seq.draft = None
                continue
            tokens += seq.token_ids[start + 1:start + count + 1]
            seqs.append((count, start + count, seq.block_table))
            picks += range(flat, flat + count)
            if seq.num_computed + 1 == seq.num_tokens:  # prompt done: it decodes next
                rows.append(len(tokens) - 1)
                heads.append(seq)
            else:
                seq.draft = None
        if not seqs:
            return
        h = hidden.index_select(0, torch.tensor(picks, dtype=torch.long, device=hidden.device))
        logits, state = self._run(tokens, seqs, h, rows)
        drafts = logits.argmax(dim=-1).tolist()
        for seq, row, token in zip(heads, rows, drafts):
            seq.draft = DraftState(seq.num_computed - 1, token, state[row].clone())  # not a view of all rows

    @staticmethod
    def ready(seq: Sequence) -> bool:
        """Whether the head's output for `seq` is at its last computed position (else no drafts)."""
        return isinstance(seq.draft, DraftState) and seq.draft.position == seq.num_computed - 1

    def chain(self, wanted: list[tuple[Sequence, int]]) -> list[list[int]]:
        """Up to `room` drafts for each (sequence, room) whose state is current (empty if stale);
        the sequences' blocks must already cover num_computed + 1 + room tokens."""
        out: list[list[int]] = []
        live: list[tuple[int, Sequence, int, torch.Tensor]] = []
        for seq, room in wanted:
            s = seq.draft
            if not self.ready(seq) or room < 1:
                out.append([])
                continue
            out.append([s.token])
            live.append((len(out) - 1, seq, room, s.state))
        for j in range(1, max((room for _, _, room, _ in live), default=0)):
            live = [x for x in live if x[2] > j]
            seqs = [(1, seq.num_computed + j, seq.block_table) for _, seq, _, _ in live]
            tokens = [out[i][-1] for i, _, _, _ in live]
            hidden = torch.stack([s for _, _, _, s in live])
            if self.graphs is not None and len(live) <= self.graphs.sizes[-1]:
                self.batches["graph"] += 1
                logits, state = self.graphs.run_flat(tokens, seqs, hidden=hidden)
            else:
                self.batches["eager"] += 1
                logits, state = self._run(tokens, seqs, hidden, list(range(len(live))))
            for r, (token, (i, seq, room, _)) in enumerate(zip(logits.argmax(dim=-1).tolist(), live)):
                out[i].append(token)
                live[r] = (i, seq, room, state[r])
        return out
