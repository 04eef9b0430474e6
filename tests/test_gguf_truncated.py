"""A GGUF file cut short (a partial download) fails with one line naming the file and saying it is
truncated: which tensor or metadata entry runs past the end, and the file's size against the size
needed; never a numpy error from inside the gguf reader."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nanoforge.cli import main
from nanoforge.errors import NanoForgeError
from nanoforge.models.checkpoint import open_checkpoint


def _write(path: Path) -> Path:
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_token_list([f"t{i}" for i in range(16)])
    w.add_tensor("token_embd.weight", np.ones((16, 32), np.float32))
    q8_0 = np.zeros((32, 34), np.uint8)  # 32 rows of one Q8_0 block (32 values in 34 bytes)
    w.add_tensor("blk.0.attn_q.weight", q8_0, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("output_norm.weight", np.ones(32, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _data_start(path: Path) -> int:
    from gguf import GGUFReader
    return GGUFReader(str(path)).data_offset


def _open_error(path: Path) -> str:
    with pytest.raises(NanoForgeError) as e:
        open_checkpoint(path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_compile_of_a_gguf_cut_to_60_percent(tmp_path, capsys):
    full = _write(tmp_path / "full.gguf")
    data = full.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:len(data) * 6 // 10])
    out = tmp_path / "plan"
    assert main(["compile", str(cut), "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "cut.gguf" in err and "truncated" in err and "reshape" not in err
    assert "token_embd.weight" in err  # the first tensor that runs past the end
    assert f"{len(data) * 6 // 10} bytes" in err  # what the file has ...
    assert str(len(data)) in err                  # ... and what the full file needs
    assert not out.exists()


@pytest.mark.parametrize("keep", [-1, -40])
def test_gguf_cut_inside_the_last_tensor(tmp_path, keep):
    data = _write(tmp_path / "full.gguf").read_bytes()
    p = tmp_path / "m.gguf"
    p.write_bytes(data[:keep])
    msg = _open_error(p)
    assert "m.gguf" in msg and "truncated" in msg and "output_norm.weight" in msg


def test_gguf_cut_anywhere_in_header_and_metadata(tmp_path):
    full = _write(tmp_path / "full.gguf")
    data, start = full.read_bytes(), _data_start(full)
    p = tmp_path / "h.gguf"
    for n in range(1, start + 1):
        p.write_bytes(data[:n])
        msg = _open_error(p)
        assert "h.gguf" in msg and "truncated" in msg, (n, msg)
    p.write_bytes(data[:data.index(b"t15")])  # inside the tokenizer.ggml.tokens array: the entry is named
    assert "tokenizer.ggml.tokens" in _open_error(p)


def test_empty_gguf(tmp_path):
    p = tmp_path / "e.gguf"
    p.write_bytes(b"")
    msg = _open_error(p)
    assert "e.gguf" in msg and "empty" in msg


def test_not_a_gguf_is_not_called_truncated(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04" + bytes(100))
    msg = _open_error(p)
    assert "x.gguf" in msg and "truncated" not in msg
