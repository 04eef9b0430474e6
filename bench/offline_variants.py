"""The reference offline workload under variants of the decode attention's knobs, one process per
variant (so each compiles and captures its own graphs), interleaved and repeated so machine drift
shows: `python bench/offline_variants.py --repeats 2 --out DIR two-loops mask-all mask-all+tiles4`.

A variant name is a '+'-joined list of: two-loops | mask-all (DECODE_MASK_ALL) and tilesN
(SPLIT_TILES = N) of nanoforge/kernels/triton/attention.py."""
from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path


def apply(variant: str) -> None:
    A = importlib.import_module("nanoforge.kernels.triton.attention")  # the module; the package's `attention` is the op

    for part in variant.split("+"):
        if part in ("two-loops", "mask-all"):
            A.DECODE_MASK_ALL = part == "mask-all"
        elif part.startswith("tiles"):
            A.SPLIT_TILES = int(part[5:]) or None
        else:
            raise SystemExit(f"unknown variant part {part!r} in {variant!r}")
    print(f"variant {variant}: DECODE_MASK_ALL={A.DECODE_MASK_ALL} SPLIT_TILES={A.SPLIT_TILES}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child: run this variant once
    a, rest = ap.parse_known_args()
    if a.one:
        apply(a.one)
        from nanoforge.cli import main as cli
        sys.exit(cli(["bench", "offline", "--device", "cuda", "--model", "qwen3-0.6b", "--hf-num-prompts", "0",
                      "--results-dir", a.out, *rest]))
    rows = []
    for rep in range(a.repeats):
        for v in a.variants:
            d = Path(a.out) / f"{v}-{rep}"
            subprocess.run([sys.executable, __file__, "x", "--one", v, "--out", str(d), *rest], check=True)
            r = json.loads(sorted(d.glob("*.json"))[-1].read_text())
            eng = r["nanoforge"]["engine"]
            rows.append({"variant": v, "repeat": rep, "output_tok_s": r["nanoforge"]["output_tok_s"],
                         "decode_only_step_s": eng["decode_only_step_s"], "mixed_step_s": eng["mixed_step_s"],
                         "gpu": r["machine"].get("gpu")})
            print(f"offline variant {v} rep {rep}: {rows[-1]['output_tok_s']:.0f} tok/s, decode-only "
                  f"{eng['decode_only_step_s']:.2f} s, mixed {eng['mixed_step_s']:.2f} s", flush=True)
    Path(a.out, "offline_variants.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
