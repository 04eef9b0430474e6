"""transformers' GGUF loader as the reference for SmolLM2 (model and tokenizer), with the parse shared
across loads."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from hf_fixtures import _quiet_transformers


@contextlib.contextmanager
def shared_gguf_parse():
    """transformers parses a whole GGUF (~5 s) several times per load and rebuilds gguf's tensor-name
    map once per parameter: share one reader per file and one map. Caching only; its conversion code
    runs unchanged. transformers 5.17 also insists on `accelerate` for GGUF, which it does not use here."""
    import functools

    import gguf
    import pytest
    import transformers.modeling_utils as mu

    readers: dict = {}
    real_reader = gguf.GGUFReader

    def reader(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = real_reader(path, mode)
        return readers[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", reader)
        mp.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))
        if not mu.is_accelerate_available():
            mp.setattr(mu, "is_accelerate_available", lambda: True)
        yield


def hf_gguf_model(gguf_path: Path, dtype=torch.float32):
    """transformers' own GGUF loader (dequantize + un-permute): the reference for SmolLM2."""
    import transformers as tf

    with _quiet_transformers(), shared_gguf_parse():
        model = tf.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=dtype)
    return model.eval()


def hf_gguf_tokenizer(gguf_path: Path):
    import transformers as tf

    with _quiet_transformers(), shared_gguf_parse():
        return tf.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
