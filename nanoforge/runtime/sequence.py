"""A request's state inside the engine: its tokens, how many have KV in the pool, its blocks."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from .sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    token_ids: list[int]  # prompt, then every generated token (one list: no copies per step)
    params: SamplingParams
    num_prompt: int = 0
    block_table: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0  # leading blocks already registered in the prefix cache
    last_block_hash: bytes = b""  # chain hash of the last registered block
    num_computed: int = 0  # tokens whose K/V are in the pool
    num_cached: int = 0  # of those, tokens found in the prefix cache at admission
    status: Status = Status.WAITING
    finish_reason: str | None = None
    text: str = ""
    logprobs: list[dict] = field(default_factory=list)
    generator: torch.Generator | None = None
    logits: torch.Tensor | None = None  # latest row, only when the engine keeps them
    arrival: int = 0  # admission order; the newest running sequence is preempted first
    state_slot: int = -1  # its row of the per-sequence state pool (recurrent layers); -1: none
    draft: Any = None  # the MTP head's latest output for it (runtime/mtp.py DraftState)
    mm: Any = None  # its images and multimodal rope positions (runtime/vision_runner.py MultimodalPrompt)

    def __post_init__(self) -> None:
        self.num_prompt = self.num_prompt or len(self.token_ids)

    @property
    def prompt_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt]

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def remaining(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return self.num_tokens - self.num_computed
