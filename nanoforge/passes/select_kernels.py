"""select_kernels: pick a provider for every node from what the target can run, and record
why each better-ranked provider was passed over (shown by `nanoforge inspect`).

Option `force` ({op: provider}) comes from `--provider op=name`; forcing a provider that
cannot run there is an error, not a silent fallback. The EP ops of a layer hand each other the
dispatching provider's own layout, so a library dispatch must also run that layer's experts and
combine (`--provider` all three); torch's and allgather's rows are the ops' documented contract."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..codegen.providers import BY_NAME, candidates
from ..errors import NanoForgeError
from ..facts import ProviderNotes, Target, write
from ..ir.graph import Function, Module
from .manager import Pass


PUBLIC_EP_LAYOUT = ("torch", "allgather")  # dispatches whose rows are the documented contract


def _check_ep_trios(fn: Function) -> None:
    """grouped_experts reads moe_dispatch's rows and moe_combine its plan: the combine must run on the
    dispatch's provider, and so must the experts unless the dispatch's rows are the public layout."""
    made_by = {v.name: n for n in fn.nodes for v in n.outputs}
    for node in fn.nodes:
        if node.op not in ("grouped_experts", "moe_combine"):
            continue
        d = made_by.get(node.inputs[0 if node.op == "grouped_experts" else 1].name)
        if d is None or d.op != "moe_dispatch" or d.provider == node.provider:
            continue
        if node.op == "moe_combine" or d.provider not in PUBLIC_EP_LAYOUT:
            p = node.provider if d.provider in PUBLIC_EP_LAYOUT else d.provider
            ops = [op for op in ("moe_dispatch", "grouped_experts", "moe_combine") if op in BY_NAME[p].ops]
            raise NanoForgeError(f"{node.op} runs on {node.provider} but its moe_dispatch on {d.provider} "
                                 f"@{node.source}: force the EP ops together ("
                                 + " ".join(f"--provider {op}={p}" for op in ops) + ")")


@dataclass(frozen=True)
class Options:
    target: Target = field(default_factory=Target)  # the machine the plan is for
    force: dict[str, str] = field(default_factory=dict)  # op -> provider (--provider OP=NAME)
    block_size: int | None = None  # the KV block size asked for (--block-size); None = what the kernels need


def _block_size_reason(provider: str, op: str, block_size: int | None) -> str | None:
    """Why `provider` cannot run `op` over KV blocks of the size asked for, or None."""
    sizes = (BY_NAME[provider].block_sizes or {}).get(op)
    if block_size is None or not sizes or block_size in sizes:
        return None
    return f"{provider} needs --block-size {' or '.join(map(str, sizes))} for {op}; the plan asks for {block_size}"


def select_kernels(module: Module, opts: Options) -> int:
    target, force = opts.target, opts.force
    for op, name in force.items():
        if name not in BY_NAME:
            raise NanoForgeError(f"--provider {op}={name}: unknown provider; known: {', '.join(BY_NAME)}")
    notes: dict[str, list[str]] = {}
    changes = 0
    for _, node in module.nodes():
        attrs = {**node.attrs, "out_dtype": node.outputs[0].type.dtype}
        ranked = [(n, why or _block_size_reason(n, node.op, opts.block_size))
                  for n, why in candidates(node.op, target, attrs)]
        if node.op in force:
            why = dict(ranked).get(force[node.op], f"{force[node.op]} does not implement {node.op}")
            if why:
                raise NanoForgeError(f"--provider {node.op}={force[node.op]}: {why}")
            choice = force[node.op]
        else:
            usable = [n for n, why in ranked if why is None]
            if not usable:
                raise NanoForgeError(f"no provider can run {node.op} on {target.device} @ {node.source}")
            choice = usable[0]
            first = BY_NAME[choice]
            why_first = [f"{choice}: {first.first_note}"] if first.first_for and first.first_for(node.op, attrs) else []
            notes.setdefault(node.op, [f"{n}: {why}" for n, why in ranked if why is not None])
            notes[node.op] += [w for w in why_first if w not in notes[node.op]]
        if node.provider != choice:
            node.provider = choice
            changes += 1
    for fn in module.functions.values():
        _check_ep_trios(fn)
    write(module, target)
    write(module, ProviderNotes({op: why for op, why in notes.items() if why}))
    return changes


PASS = Pass("select_kernels", select_kernels, "provider per node, with the reason for each fallback", Options)
