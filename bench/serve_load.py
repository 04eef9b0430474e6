"""Serving load test (the serving issue's acceptance point): a tiny random-weight model behind a real
`nanoforge serve` subprocess on 127.0.0.1, hammered by `--concurrency` closed-loop streaming clients
for `--duration` seconds. Exits non-zero on any request error or any KV block not free afterwards.

    .venv/bin/python bench/serve_load.py [--concurrency 64] [--duration 60] [--output-len 32]

Self-contained: the checkpoint (qwen3-tiny preset shapes, f32, seeded random weights, a word-level
tokenizer in which every id decodes to a visible word so each token is one streamed chunk) is
written to a temp dir and removed afterwards. The server gets --max-num-seqs = concurrency, so
every client is stepped at once instead of queueing. Runs on CPU.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nanoforge.serving.sockets import free_tcp_port  # noqa: E402

MODEL = "tiny-load"


def make_checkpoint(out: Path, seed: int = 0) -> Path:
    """config.json + model.safetensors + tokenizer.json of the qwen3-tiny preset (random weights)."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    from nanoforge.models.presets import PRESETS
    from nanoforge.models.random_checkpoint import RandomCheckpoint

    cfg = {**PRESETS["qwen3-tiny"], "torch_dtype": "float32"}
    ck = RandomCheckpoint(cfg, MODEL, dtype="f32", seed=seed)
    save_file({k: t.contiguous() for k, t in ck.read(list(ck.tensors), progress=False)}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(cfg["vocab_size"])}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # decode joins words with spaces: no held-back bytes
    tok.save(str(out / "tokenizer.json"))
    return out


def start_server(ckpt: Path, port: int, max_num_seqs: int, log: Path, timeout_s: float = 300.0) -> subprocess.Popen:
    """`nanoforge serve` in a subprocess (the real CLI, its own process and GIL); returns once /health is 200."""
    import httpx

    cmd = [sys.executable, "-m", "nanoforge.cli", "serve", str(ckpt), "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", MODEL, "--device", "cpu", "--max-num-seqs", str(max_num_seqs)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2.0).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(proc)
    raise RuntimeError(f"server not healthy after {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(2)  # SIGINT: uvicorn's graceful shutdown, then the engine thread is closed
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--output-len", "--max-tokens", dest="output_len", type=int, default=32)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", default=str(ROOT / "bench" / "results"))
    a = p.parse_args(argv)

    from nanoforge.errors import NanoForgeError
    from nanoforge.tools.bench_serve import bench_serve, summary_lines, workload_from_flags

    try:
        w = workload_from_flags(rate=None, num_prompts=None, concurrency=a.concurrency, duration=a.duration,
                                input_len=a.input_len, output_len=a.output_len, vocab=4096, seed=a.seed)
    except NanoForgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="nanoforge-serve-load-") as tmp:
        t0 = time.perf_counter()
        ckpt = make_checkpoint(Path(tmp))
        port, log = free_tcp_port(), Path(tmp) / "server.log"
        proc = start_server(ckpt, port, a.concurrency, log)
        print(f"server up on 127.0.0.1:{port} in {time.perf_counter() - t0:.1f} s (max_num_seqs {a.concurrency}); "
              f"{a.concurrency} clients for {a.duration:g} s, {a.input_len} in / {a.output_len} out tokens")
        try:
            r = bench_serve(f"http://127.0.0.1:{port}", MODEL, w, Path(a.results_dir))
        finally:
            stop_server(proc)
    print("\n".join(summary_lines(r)) + f"\nwrote {r['path']}")
    problems = ([f"{r['num_errors']} errors"] if r["num_errors"] else []) + \
               ([f"leaked_blocks {r['leaked_blocks']}"] if r["leaked_blocks"] != 0 else []) + \
               (["no request completed"] if not r["completed"] else [])
    print("FAIL: " + ", ".join(problems) if problems else "PASS")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
