"""attach_mtp: make a plan that drafts with the checkpoint's MTP head (`compile --speculative mtp
--num-speculative-tokens K`).

The frontend traced the checkpoint's MTP layer into the module's `draft` function (tokens,
positions, hidden, rows) -> (logits, state); its attention is one more KV layer of the contract.
This pass turns that into a speculation plan: the `forward` also returns its final hidden state
(the input of `lm_head`, which the draft reads one position behind), and a `speculative` fact
says K and which KV layers belong to the draft. The runtime (runtime/mtp.py) runs the draft over
each step's accepted rows, then chains it on its own state for drafts 2..K; the target verifies
them in one step (runtime/speculative.py).

    before:  return %logits                     after:  return %logits, %hidden
             draft(...) untouched                        meta speculative = {mtp, K, draft layers}
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import NanoForgeError
from ..facts import SpeculativePlan, write
from ..ir.graph import Module
from .manager import Pass


@dataclass(frozen=True)
class Options:
    num_tokens: int = 0  # K drafts a step; 0: the plan does not speculate with MTP


def attach_mtp(module: Module, opts: Options) -> int:
    if opts.num_tokens == 0:
        return 0
    if opts.num_tokens < 1:
        raise NanoForgeError(f"--num-speculative-tokens {opts.num_tokens}: must be at least 1")
    draft = module.functions.get("draft")
    if draft is None:
        raise NanoForgeError("--speculative mtp: the traced module has no draft function (trace the checkpoint "
                             "with its MTP layer)")
    forward = module.functions["forward"]
    head = next((n for n in forward.nodes if n.op == "lm_head"), None)
    if head is None:
        raise NanoForgeError("--speculative mtp: the forward function has no lm_head node")
    hidden = head.inputs[0]
    changes = 0
    if not forward.returns(hidden):
        forward.outputs.append(hidden)
        changes += 1
    layers = tuple(sorted(n.attrs["layer"] for n in draft.nodes if n.op == "attention"))
    write(module, SpeculativePlan("mtp", opts.num_tokens, layers))
    return changes + 1


PASS = Pass("attach_mtp", attach_mtp, "MTP speculation: forward returns its hidden state, K recorded", Options)
