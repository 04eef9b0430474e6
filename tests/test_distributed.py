"""Sharded plans on real processes (CPU, gloo): one worker process per rank beyond the driver's.
tp=2 and attention_dp=2 x ffn_ep=2 give tp=1's greedy tokens through LLM.generate, `nanoforge
generate` and `nanoforge serve`; a killed worker ends the next step with an error naming its rank
(no hang); no worker process outlives its driver. One sharded engine lives at a time (a process
runs one torch.distributed world), so the tests share it through `ranks`."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from hf_fixtures import TOKENIZER_VOCAB, _quiet_transformers, _randomize_extras, make_tokenizer, tiny_config
from nanoforge import LLM, SamplingParams
from nanoforge.cli import main
from nanoforge.errors import NanoForgeError
from nanoforge.runtime.distributed_runner import DistributedRunner
from nanoforge.facts import ParallelLayout

# Qwen3-MoE whose sizes divide by 2: layer 0 dense, layer 1 MoE (8 experts top-2), vocab 1024
SIZES = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=8, head_dim=16, num_local_experts=8,
             num_experts_per_tok=2, mlp_only_layers=[])
ENGINE = dict(dtype="f32", progress=False, num_blocks=256, max_model_len=256)
PROMPTS = [[1, 5, 9, 200, 3], list(range(7, 40)), [100, 101], [4] * 9 + [9]]
MAX_TOKENS = [3, 20, 3, 15]  # replica 0 of a 2-way attention-DP engine runs dry first, replica 1 goes on alone


def greedy() -> list[SamplingParams]:
    return [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in MAX_TOKENS]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    import transformers as tf

    d = {**tiny_config("qwen3_moe").to_dict(), **SIZES}
    d.pop("layer_types", None)
    cfg = type(tiny_config("qwen3_moe")).from_dict(d)
    torch.manual_seed(0)
    with _quiet_transformers():
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _randomize_extras(model, 0)
    out = tmp_path_factory.mktemp("moe_even")
    with _quiet_transformers():
        model.save_pretrained(out, safe_serialization=True)
    make_tokenizer(TOKENIZER_VOCAB["qwen3_moe"]).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def ref(ckpt):
    llm = LLM(ckpt, **ENGINE)
    return llm, [o.token_ids for o in llm.generate(PROMPTS, greedy())]


@pytest.fixture(scope="module")
def tp2_plan(ckpt, tmp_path_factory):
    plan = tmp_path_factory.mktemp("plans") / "tp2"
    assert main(["compile", str(ckpt), "-o", str(plan), "--dtype", "f32", "--tp", "2", "-q"]) == 0
    return plan


def workers_of(ckpt, driver: int | None = None) -> list[str]:
    """Worker processes of this module's checkpoint (and `driver`) still alive, zombies aside."""
    ps = subprocess.run(["ps", "-ww", "-eo", "pid,stat,args"], capture_output=True, text=True).stdout.splitlines()
    return [ln for ln in ps if "nanoforge.runtime.worker" in ln and str(ckpt) in ln and " Z" not in ln
            and (driver is None or ln.endswith(f"--driver-pid {driver}"))]


class Ranks:
    """The one live sharded LLM of this process, restarted when a test needs another layout."""

    def __init__(self):
        self.key, self.llm = None, None

    def get(self, key: str, make) -> LLM:
        if key != self.key or self.llm.engine.runner.closed:
            self.close()
            self.llm, self.key = make(), key
        return self.llm

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
        self.key = self.llm = None


@pytest.fixture(scope="module")
def ranks(ckpt):
    r = Ranks()
    yield r
    r.close()
    deadline = time.time() + 5
    while workers_of(ckpt) and time.time() < deadline:
        time.sleep(0.1)
    assert workers_of(ckpt) == []


def test_tp2_plan_generates_tp1_tokens(ref, tp2_plan, ranks):
    llm = ranks.get("tp2", lambda: LLM(tp2_plan, **ENGINE))
    runner = llm.engine.runner
    assert isinstance(runner, DistributedRunner) and len(runner.workers) == 1 and runner.workers[0].poll() is None
    chained, execute = [], runner.execute
    runner.execute = lambda batch, device_tokens=None: (chained.append(device_tokens is not None),
                                                        execute(batch, device_tokens))[1]
    got = [o.token_ids for o in llm.generate(PROMPTS, greedy())]
    del runner.execute
    assert got == ref[1]
    assert sum(chained) > 10  # overlapped decode steps: the previous step's tokens go out as a device broadcast
    assert list(llm.metrics()["batches"]) == ["eager: not on a CUDA device"]
    with pytest.raises(NanoForgeError, match=r"is a plan for tp=2, attention_dp=1, ffn_ep=1, not tp=4"):
        LLM(tp2_plan, tp=4, **ENGINE)


def test_killed_worker_is_named_not_a_hang(tp2_plan, ranks, ckpt):
    llm = ranks.get("tp2", lambda: LLM(tp2_plan, **ENGINE))
    worker = llm.engine.runner.workers[0]
    threading.Timer(0.3, os.kill, (worker.pid, signal.SIGKILL)).start()
    start = time.monotonic()
    with pytest.raises(NanoForgeError, match=rf"worker rank 1 \(pid {worker.pid}\) was killed by SIGKILL"):
        llm.generate([[1, 2, 3]] * 4, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    assert time.monotonic() - start < 15
    with pytest.raises(NanoForgeError, match="worker rank 1"):  # later steps fail the same way, at once
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))
    ranks.close()
    assert workers_of(ckpt, os.getpid()) == []
    shutil.rmtree(llm.engine.runner.tmp)  # kept after a failure for its logs


def test_cli_generate_on_a_checkpoint_with_tp2(ckpt, ref, ranks, capsys):
    ranks.close()  # the CLI starts (and stops) ranks of its own in this process
    text = [ref[0].tokenizer.decode(p) for p in PROMPTS[:2]]
    argv = ["generate", str(ckpt), "--tp", "2", "--dtype", "f32", "--json", "--ignore-eos", "--max-tokens", "6"]
    assert main(argv + [x for t in text for x in ("--prompt", t)]) == 0
    got = [json.loads(line)["token_ids"] for line in capsys.readouterr().out.splitlines()]
    want = [o.token_ids for o in ref[0].generate(text, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))]
    assert got == want
    assert workers_of(ckpt, os.getpid()) == []


def test_attention_dp2_ffn_ep2_generates_tp1_tokens(ckpt, ref, ranks):
    llm = ranks.get("dp2ep2", lambda: LLM(ckpt, attention_dp=2, ffn_ep=2, **ENGINE))
    assert llm.plan.parallel == ParallelLayout(1, 2, 2)
    got = [o.token_ids for o in llm.generate(PROMPTS, greedy())]
    assert got == ref[1]
    owners = llm.engine.scheduler.replicas
    assert all(not r.has_work() for r in owners) and llm.engine.blocks.num_free == 256
    assert llm.generate(PROMPTS[1], greedy()[1])[0].token_ids == ref[1][1]  # replica 1 idles


def test_serve_tp2_plan(ckpt, ref, tp2_plan, tmp_path):
    from nanoforge.serving.sockets import free_tcp_port

    port = free_tcp_port()  # clear of the TCPStore's own bind(0) in the server's ranks
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "nanoforge.cli", "serve", str(tp2_plan), "--port", str(port),
                             "--max-model-len", "256", "--served-model-name", "tiny"],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.time() < deadline, "nanoforge serve did not come up in 60 s"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert len(workers_of(ckpt, proc.pid)) == 1
        llm = ref[0]
        sp = SamplingParams(temperature=0, max_tokens=8)
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hello world", "max_tokens": 8,
                                                      "temperature": 0}, timeout=30).json()
        assert r["choices"][0]["text"] == llm.generate("hello world", sp)[0].text
        chat = [{"role": "user", "content": "What is the capital of France?"}]
        r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": chat, "max_tokens": 8,
                                                           "temperature": 0}, timeout=30).json()
        assert r["choices"][0]["message"]["content"] == llm.chat(chat, sp)[0].text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
    deadline = time.time() + 5
    while workers_of(ckpt, proc.pid) and time.time() < deadline:
        time.sleep(0.1)
    assert workers_of(ckpt, proc.pid) == []


def test_slices_are_read_without_mmap(tmp_path, monkeypatch):
    """The sharded loader's positioned reads equal safetensors slicing: row ranges, column cuts
    (over several row chunks), 1-D and 3-D tensors, bf16 / f16 / i64."""
    from safetensors.torch import save_file

    from nanoforge.models.checkpoint import open_checkpoint
    from nanoforge.models import slice_reader

    g = torch.Generator().manual_seed(0)
    ts = {"a": torch.randn(64, 48, generator=g).to(torch.bfloat16), "b": torch.randn(5, 12, 8, generator=g),
          "c": torch.randn(7, generator=g).to(torch.float16), "e": torch.randint(0, 100, (6, 10), generator=g)}
    save_file(ts, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"]}))
    ck = open_checkpoint(tmp_path)
    every = slice(None)
    reqs = [("a", None), ("a", (slice(16, 32), every)), ("a", (every, slice(24, 48))),
            ("b", (every, slice(3, 9), every)), ("b", (every, every, slice(4, 8))), ("b", (slice(2, 4), every, every)),
            ("c", (slice(0, 3),)), ("e", (every, slice(5, 10)))]
    monkeypatch.setattr(slice_reader, "CHUNK", 100)  # a column cut spans several chunks of rows
    got = dict(ck.read_slices(reqs, progress=False))
    for i, (k, sl) in enumerate(reqs):
        want = ts[k] if sl is None else ts[k][sl]
        assert got[i].dtype == want.dtype and torch.equal(got[i], want), (k, sl)


def test_random_weights_are_the_same_on_every_rank(ranks):
    """Benchmarks shard random-weight checkpoints too: each worker makes its slices from the
    driver's config and seed, so tp=2 reproduces tp=1."""
    from nanoforge.models.presets import PRESETS
    from nanoforge.models.random_checkpoint import RandomCheckpoint

    cfg = {**PRESETS["qwen3-tiny"], "num_hidden_layers": 2}
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = [o.token_ids for o in LLM(RandomCheckpoint(cfg, "tiny", "f32", seed=3), **ENGINE).generate(PROMPTS, sp)]
    llm = ranks.get("random-tp2", lambda: LLM(RandomCheckpoint(cfg, "tiny", "f32", seed=3), tp=2, **ENGINE))
    assert [o.token_ids for o in llm.generate(PROMPTS, sp)] == want
