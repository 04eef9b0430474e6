"""GGUF files (llama.cpp): metadata -> HF LlamaForCausalLM config, tensor names -> HF keys, and
dequantized weights in HF layout, equal to what transformers produces when it loads the same file.

llama.cpp's converter stores q_proj / k_proj rows permuted per head (the two rope halves
interleaved, for its GPT-J style rope kernel); `unpermute_qk` undoes that, giving HF's
rotate-half (neox) layout back.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..errors import NanoForgeError
from .tensor_info import TensorInfo

_LAYER = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")

# llama.cpp marks a vocab's end-of-generation tokens by their text (llama-vocab.cpp); a GGUF's
# own eos id is only one of them (SmolLM2: <|im_end|> is eos, <|endoftext|> also ends text).
EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
             "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>", "<｜end▁of▁sentence｜>")


def hf_name(gguf_name: str) -> str | None:
    """HF key of a llama GGUF tensor name, or None if the name is not one we know."""
    if m := _BLOCK.match(gguf_name):
        part = _LAYER.get(m.group(2))
        return f"model.layers.{m.group(1)}.{part}.{m.group(3)}" if part else None
    base, _, suffix = gguf_name.rpartition(".")
    return f"{_GLOBAL[base]}.{suffix}" if base in _GLOBAL and suffix in ("weight", "bias") else None


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's `permute`: rows of each head go from (half, 2) interleaved back to (2, half)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


@dataclass
class GGUFFile:
    """An open GGUF file: the reader (memory-mapped) and the HF key -> GGUF tensor map."""
    path: Path
    reader: Any                      # gguf.GGUFReader
    names: dict[str, str]            # HF key -> GGUF tensor name

    def get(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except Exception as e:  # a malformed field: name it rather than fail deep inside gguf
            raise NanoForgeError(f"{self.path.name}: cannot read metadata '{key}': {e}") from e

    def arch(self) -> str:
        return str(self.get("general.architecture", "?"))


def open_gguf(path: Path) -> GGUFFile:
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise NanoForgeError(f"{path}: reading GGUF needs the 'gguf' package (pip install gguf)") from e
    try:
        reader = GGUFReader(str(path))
    except Exception as e:
        # gguf's reader fails on a file cut short with a numpy error ("cannot reshape array of size
        # ..."); walk the layout ourselves to say so, naming what runs past the end
        if why := truncation(path):
            raise NanoForgeError(why) from e
        raise NanoForgeError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
    g = GGUFFile(path, reader, {})
    if g.arch() != "llama":
        raise NanoForgeError(f"{path.name}: GGUF architecture {g.arch()!r} is not supported (only 'llama')")
    for t in reader.tensors:
        key = hf_name(t.name)
        if key is None:
            raise NanoForgeError(f"{path.name}: GGUF tensor '{t.name}' has no HF llama equivalent")
        g.names[key] = t.name
    return g


class _Short(Exception):
    def __init__(self, what: str, end: int):
        self.what, self.end = what, end


# GGUFValueType -> struct format of one scalar (8 STRING and 9 ARRAY are variable-sized)
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def truncation(path: Path) -> str | None:
    """Why the GGUF file at `path` is cut short (the header field, metadata entry or tensor that
    runs past its end, and the bytes it has against those needed), or None when its layout fits.
    Bounds-checked and separate from gguf's reader, which reports a short file as a numpy error."""
    size = path.stat().st_size
    if size == 0:
        return f"{path} is empty (0 bytes)"
    try:
        with open(path, "rb") as f:
            return _walk(f, path, size)
    except _Short as s:
        return (f"{path} is truncated: {s.what} runs past the end of the file ({size} bytes; it needs at least "
                f"{s.end}); an incomplete download? fetch it again")
    except (OSError, ValueError, KeyError, struct.error):
        return None  # not a layout problem we can name; the caller keeps the reader's message


def _walk(f, path: Path, size: int) -> str | None:
    magic = f.read(4)
    if magic != b"GGUF":
        if len(magic) < 4 and b"GGUF".startswith(magic):
            raise _Short("the GGUF magic", 4)
        return None
    order = "<"

    def take(fmt: str, what: str) -> tuple:
        n = struct.calcsize(order + fmt)
        b = f.read(n)
        if len(b) < n:
            raise _Short(what, f.tell() - len(b) + n)
        return struct.unpack(order + fmt, b)

    def skip(n: int, what: str) -> None:
        end = f.tell() + n
        if end > size:
            raise _Short(what, end)
        f.seek(end)

    def string(what: str) -> bytes:
        (n,) = take("Q", what)
        end = f.tell() + n
        if end > size:
            raise _Short(what, end)
        return f.read(n)

    (version,) = take("I", "the GGUF version")
    if version & 0xFFFF == 0:  # written for the other byte order, as gguf's reader detects it
        order = ">"
        version = struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in (2, 3):
        return None
    n_tensors, n_kv = take("QQ", "the GGUF tensor and metadata counts")
    alignment = 32
    for i in range(n_kv):
        key = string(f"metadata entry {i} of {n_kv}").decode("utf-8", "replace")
        what = f"metadata '{key}'"
        (vtype,) = take("I", what)
        if vtype == 9:
            etype, count = take("IQ", what)
            if etype in _SCALAR:
                skip(count * struct.calcsize(order + _SCALAR[etype]), what)
            elif etype == 8:
                for _ in range(count):
                    string(what)
            else:
                return None  # nested arrays: gguf's reader does not read them either
        elif vtype == 8:
            string(what)
        elif vtype in _SCALAR:
            (v,) = take(_SCALAR[vtype], what)
            if key == "general.alignment" and vtype == 4 and v > 0 and v & (v - 1) == 0:
                alignment = v
        else:
            return None
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    tensors = []
    for i in range(n_tensors):
        name = string(f"the tensor table (entry {i} of {n_tensors})").decode("utf-8", "replace")
        what = f"the tensor table entry of '{name}'"
        (n_dims,) = take("I", what)
        dims = take("Q" * n_dims, what)
        ttype, offset = take("IQ", what)
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        numel = 1
        for d in dims:
            numel *= d
        tensors.append((offset, numel * type_size // block, name))
    start = -(-f.tell() // alignment) * alignment
    if not tensors:
        return None
    need = max(start + off + n for off, n, _ in tensors)
    for off, n, name in sorted(tensors):
        if start + off + n > size:
            return (f"{path} is truncated: tensor '{name}' ends at byte {start + off + n} but the file has "
                    f"{size} bytes (the complete file has {need}; an incomplete download? fetch it again)")
    return None


def llama_config(g: GGUFFile) -> dict[str, Any]:
    """Synthesize an HF LlamaForCausalLM config from `llama.*` / `tokenizer.ggml.*` metadata."""
    def need(key: str) -> Any:
        v = g.get(key)
        if v is None:
            raise NanoForgeError(f"{g.path.name}: GGUF metadata '{key}' is missing")
        return v

    hidden, heads = int(need("llama.embedding_length")), int(need("llama.attention.head_count"))
    tokens = g.reader.fields.get("tokenizer.ggml.tokens")
    vocab = g.get("llama.vocab_size") or (len(tokens.data) if tokens is not None else None)
    if vocab is None and "model.embed_tokens.weight" in g.names:
        embd = next(t for t in g.reader.tensors if t.name == g.names["model.embed_tokens.weight"])
        vocab = int(embd.shape[-1])
    head_dim = g.get("llama.attention.key_length") or g.get("llama.rope.dimension_count") or hidden // heads
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(need("llama.feed_forward_length")),
        "num_hidden_layers": int(need("llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(g.get("llama.attention.head_count_kv", heads)),
        "head_dim": int(head_dim),
        "rms_norm_eps": float(g.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(g.get("llama.rope.freq_base", 10000.0)),
        "vocab_size": int(vocab) if vocab is not None else None,
        "max_position_embeddings": int(g.get("llama.context_length", 2048)),
        "tie_word_embeddings": "lm_head.weight" not in g.names,
        "bos_token_id": g.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": g.get("tokenizer.ggml.eos_token_id"),
        "hidden_act": "silu",
        "attention_bias": "model.layers.0.self_attn.q_proj.bias" in g.names,
        "torch_dtype": "float32",
    }
    kind = g.get("llama.rope.scaling.type")
    if kind and kind != "none":
        cfg["rope_scaling"] = {"rope_type": kind, "factor": float(g.get("llama.rope.scaling.factor", 1.0))}
        if (orig := g.get("llama.rope.scaling.original_context_length")) is not None:
            cfg["rope_scaling"]["original_max_position_embeddings"] = int(orig)
    return cfg


def tensor_infos(g: GGUFFile) -> dict[str, TensorInfo]:
    by_name = {t.name: t for t in g.reader.tensors}
    return {key: TensorInfo(key, tuple(int(d) for d in reversed(by_name[n].shape)), by_name[n].tensor_type.name,
                            g.path.name)
            for key, n in g.names.items()}


def read_tensors(g: GGUFFile, keys: list[str], config: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """Dequantize to float32 (gguf.quants), reshape to HF orientation, undo the q/k permutation."""
    from gguf.quants import dequantize

    by_name = {t.name: t for t in g.reader.tensors}
    for key in keys:
        t = by_name[g.names[key]]
        try:
            arr = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise NanoForgeError(f"{g.path.name}: tensor '{t.name}' ({key}) has quant type "
                                 f"{t.tensor_type.name}, which gguf cannot dequantize") from e
        if not arr.flags.writeable:  # F32 comes back as a view of the read-only memory map
            arr = arr.copy()
        w = torch.from_numpy(arr.astype(np.float32, copy=False)).reshape(tuple(int(d) for d in reversed(t.shape)))
        if ".self_attn.q_proj." in key:
            w = unpermute_qk(w, config["num_attention_heads"])
        elif ".self_attn.k_proj." in key:
            w = unpermute_qk(w, config["num_key_value_heads"])
        yield key, w


def eog_token_ids(g: GGUFFile) -> list[int]:
    """End-of-generation ids, as llama.cpp finds them: the eos id, then control tokens named like EOG."""
    ids = [int(i) for i in (g.get("tokenizer.ggml.eos_token_id"), g.get("tokenizer.ggml.eot_token_id"),
                            g.get("tokenizer.ggml.eom_token_id")) if i is not None]
    tokens = g.get("tokenizer.ggml.tokens") or []
    types = g.get("tokenizer.ggml.token_type") or [3] * len(tokens)
    ids += [i for i, (tok, ty) in enumerate(zip(tokens, types)) if ty == 3 and tok in EOG_TEXTS]
    return list(dict.fromkeys(ids))
