"""Compile the paged decode attention kernel (or its prefill grid) for sm_90a on any machine (no GPU
needed: Triton's bundled ptxas) and print what decides its speed: registers, spills, shared memory,
whether loads are asynchronous copies, and the order of global loads and tensor-core ops in the
compiled code.

    python -m bench.kernels.decode_sass [--block-n 128 --warps 4 --stages 2 | --prefill-max-q 4096] [--json]

The shapes are the offline workload's (Qwen3-0.6B: 16 query / 8 kv heads, head dim 128, bf16, block
16). Pointer and stride arguments get the divisibility Triton's launcher would give them, so the
code is the one a GPU run compiles. Needs TRITON_INTERPRET unset (the interpreter cannot compile)."""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

STRIDES = dict(s_qt=2048, s_qh=128, s_kb=16384, s_ko=1024, s_kh=128, s_vb=16384, s_vo=1024, s_vh=128, s_ot=2048,
               s_oh=128, num_heads=16)  # q / out [T, 16, 128], pools [NB, 16, 8, 128]
UNIT = ("s_qd", "s_kd", "s_vd", "s_od")  # unit strides: Triton specializes 1 as a constant


def compile_decode(block_n: int, warps: int, stages: int, pdl: bool = False):
    return _compile(dict(BQ=1, BLOCK_M=16, BLOCK_N=block_n, DECODE=True, DEC_Q=0, PDL=pdl), warps, stages)


def compile_prefill(max_query_len: int):
    """The prefill grid at the tile config the engine picks for chunks of up to max_query_len rows."""
    A = importlib.import_module("nanoforge.kernels.triton.attention")
    block_m, block_n, warps, stages = A._prefill_cfg(128, 0, 128, max_query_len)
    return _compile(dict(BQ=block_m // 2, BLOCK_M=block_m, BLOCK_N=block_n, DECODE=False, DEC_Q=1, PDL=False), warps,
                    stages)


def _compile(grid: dict, warps: int, stages: int):
    A = importlib.import_module("nanoforge.kernels.triton.attention")
    fn = A._paged_attn_kernel
    params = list(inspect.signature(fn.fn).parameters)
    const = dict(G=2, HB=2, NHC=1, DK=128, DV=128, DK1=128, DK2=0, BLOCK_DV=128, BS=16, SPLIT=False,
                 V_FROM_K=False, DOT_PREC=None, KV_SCALED=False, KV_BITS=False, PV_SHIFT=8, PV_SCALE=1.0,
                 L_SCALE=1.0, LONGEST_FIRST=False, ORDERED=False, **grid, **{u: 1 for u in UNIT})
    sig, attrs = {}, {}
    for i, p in enumerate(params):
        if p in const:
            sig[p] = "constexpr"
        elif p.endswith("_ptr"):
            sig[p] = "*i32" if p in ("qs_ptr", "ctx_ptr", "bt_ptr", "ord_ptr") else "*bf16"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[p] = "fp32" if p == "qk_scale" else "i32"
            if p in STRIDES or p.startswith(("s_ks", "s_vs")):  # 16-aligned (or unused, 0)
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs={(params.index(k),): v for k, v in const.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))


def _cuobjdump(kernel, flag: str) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True, check=True).stdout


def resources(kernel) -> dict[str, int]:
    """REG, STACK (spills), SHARED, ... of the compiled kernel, as cuobjdump reports them."""
    line = _cuobjdump(kernel, "-res-usage").strip().splitlines()[-1]
    return {k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[0\])?):(\d+)", line)}


def instruction_runs(kernel) -> list[tuple[str, int]]:
    """The SASS stream as runs of global loads (LDG), async copies (LDGSTS), tensor-core ops (HMMA),
    barriers (BAR) and branches (BRA): where the loads sit against the math."""
    runs: list[list] = []
    last = None
    for ln in _cuobjdump(kernel, "-sass").splitlines():
        if not re.match(r"\s+/\*[0-9a-f]{4}\*/", ln):
            continue
        words = ln.split()[1:3]
        op = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
        kind = next((t for t in ("LDGSTS", "LDG", "HMMA", "BAR", "BRA") if op.startswith(t)), None)
        if kind and kind == last:
            runs[-1][1] += 1
        elif kind:
            runs.append([kind, 1])
        last = kind or last
    return [(k, n) for k, n in runs]  # tuples: the runs were counted in place


def ptx_order(kernel) -> list[str]:
    """The PTX's first global load, first async copy, first store and PDL instructions, in program order."""
    ptx = kernel.asm["ptx"]
    marks = {"ld.global": "load", "cp.async.c": "async copy", "st.global": "store",
             "griddepcontrol.wait": "pdl wait", "griddepcontrol.launch_dependents": "pdl launch"}
    found = {name: ptx.find(op) for op, name in marks.items()}
    return [name for name, at in sorted(found.items(), key=lambda kv: kv[1]) if at >= 0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--block-n", type=int, default=128)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--prefill-max-q", type=int, help="the prefill grid instead, at the engine's tile config for "
                    "chunks of up to this many rows")
    ap.add_argument("--pdl", action="store_true", help="the decode grid as a PDL launch compiles it (pdl.py)")
    ap.add_argument("--json", action="store_true", help="one JSON object: shared, resources, runs, ptx_order")
    a = ap.parse_args()
    k = compile_prefill(a.prefill_max_q) if a.prefill_max_q else compile_decode(a.block_n, a.warps, a.stages, a.pdl)
    if a.json:
        print(json.dumps({"shared": k.metadata.shared, "resources": resources(k), "runs": instruction_runs(k),
                          "ptx_order": ptx_order(k)}))
        return
    ptx = k.asm["ptx"]
    print(f"shared memory {k.metadata.shared} B; cp.async {len(re.findall(r'cp[.]async[.]c[ag]', ptx))}, "
          f"ld.global {ptx.count('ld.global')}, mma {ptx.count('mma.sync')}, bar.sync {ptx.count('bar.sync')}")
    print(resources(k))
    print("order:", " ".join(f"{k}x{n}" for k, n in instruction_runs(k)))


if __name__ == "__main__":
    main()
