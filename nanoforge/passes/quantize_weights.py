"""quantize_weights: how each weight is stored and run, when the checkpoint ships block FP8 or the
user asks for it (`compile --quantize`).

  checkpoint fp8, mode auto|fp8   linear / moe weight -> fp8_e4m3 param + f32 `<name>_scale_inv`
                                  param (read as stored), the node gets attr fp8_block; MLA's
                                  kv_b_proj (read inside attention) -> dequantized at load
  checkpoint fp8, mode none       every fp8 weight -> dequantized at load to the model dtype
  checkpoint plain, mode fp8      linear / moe weight -> fp8_e4m3 + scales, block-quantized at load
  checkpoint plain, mode auto     nothing

With `act_quant` (a group size; the compiler sets 128 for CUDA targets, as DeepSeek's dynamic
activation scheme does) an FP8 linear or expert layer also quantizes its inputs per token and 128
columns (attr act_quant; experts: x and silu(g) * u): the W8A8 math the FP8 GEMMs run, which the
torch and Triton providers then run too.

`Param.quant` says which: `fp8_e4m3:128x128` (stored or quantized at load: the loader tells by
the checkpoint tensor's dtype), `scale:128x128` (its scales), `dequant:128x128` (an fp8 tensor
widened at load). Embeddings, the LM head, norms and routers stay as they are, and so do the
modules the checkpoint lists in `modules_to_not_convert`."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import NanoForgeError
from ..ir.graph import Module, Node, Param, TensorType
from ..ir.ops import EXPERT_SLOTS, FP8
from ..models.quant import scale_shape
from .manager import Pass

MODES = ("auto", "none", "fp8")
MLA_OPS = ("attention", "sparse_mla")  # read kv_b_proj inside the op


@dataclass(frozen=True)
class Options:
    checkpoint: str = "none"  # how the checkpoint stores its weights: none | fp8 (block FP8)
    mode: str = "auto"  # auto: as shipped; none: dequantize at load; fp8: block-quantize at load (--quantize)
    block: tuple[int, int] = (128, 128)
    keep: tuple[str, ...] = ()  # module name fragments left alone (modules_to_not_convert)
    act_quant: int = 0  # FP8 linears quantize their input per token and this many columns (0: weight-only)


def _slots(node: Node) -> tuple[str, ...]:
    if node.op == "linear":
        return ("weight",)
    if node.op == "moe":
        return EXPERT_SLOTS
    if node.op in MLA_OPS and "kv_b_proj" in node.params:
        return ("kv_b_proj",)
    return ()


def _to_fp8(module: Module, node: Node, slot: str, p: Param, block: tuple[int, int], act_quant: int) -> None:
    tag = f"{block[0]}x{block[1]}"
    scale_name = f"{p.name}_scale_inv"
    if p.quant is None:
        module.params[scale_name] = Param(scale_name, TensorType("f32", scale_shape(p.type.shape, block)),
                                          [f"{k}_scale_inv" for k in p.keys], p.layout, quant=f"scale:{tag}")
        p.type, p.quant = TensorType(FP8, p.type.shape), f"{FP8}:{tag}"
    node.params[f"{slot}_scale_inv"] = scale_name
    node.attrs["fp8_block"] = list(block)
    if act_quant:
        node.attrs["act_quant"] = act_quant


def quantize_weights(module: Module, opts: Options) -> int:
    if opts.mode not in MODES:
        raise NanoForgeError(f"--quantize {opts.mode!r}: choose one of {', '.join(MODES)}")
    if opts.checkpoint not in ("none", "fp8"):
        raise NanoForgeError(f"quantize_weights: unknown checkpoint storage {opts.checkpoint!r}")
    shipped, wanted = opts.checkpoint == "fp8", opts.mode == "fp8" or (opts.mode == "auto" and opts.checkpoint == "fp8")
    if not shipped and not wanted:
        return 0
    tag, changes = f"{opts.block[0]}x{opts.block[1]}", 0
    for _, node in module.nodes():
        for slot in _slots(node):
            p = module.params[node.params[slot]]
            if any(k in p.name for k in opts.keep):
                continue
            if wanted and node.op not in MLA_OPS:  # attention reads kv_b_proj in its own dtype
                _to_fp8(module, node, slot, p, opts.block, opts.act_quant)
            elif shipped:
                p.quant = f"dequant:{tag}"
            else:
                continue
            changes += 1
    return changes


PASS = Pass("quantize_weights", quantize_weights, "block-FP8 weights: keep, dequantize or quantize at load", Options)
