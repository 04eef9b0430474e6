"""`nanoforge serve`'s HTTP API, through the official openai client against uvicorn on a free
127.0.0.1 port: greedy text equals LLM.generate / LLM.chat, streamed text equals non-streamed,
usage, n, stop strings (never leaked into a stream), logprobs, a tool-call round trip, OpenAI-style
errors after which the server keeps serving, client disconnects aborting their requests, metrics."""
from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import openai
import pytest

from nanoforge import LLM, SamplingParams
from nanoforge.serving.inprocess import InProcessClient
from nanoforge.serving.openai_api import build_app
from nanoforge.serving.openai_output import Detokenizer
from nanoforge.serving.protocol import TokenDelta
from nanoforge.serving.tool_parser import ToolCallFilter, parse_tool_calls
from serving_fixtures import serve

MODEL, KEY = "tiny-qwen3", "sk-test"
ENGINE = dict(progress=False, num_blocks=256, max_model_len=256)
CHAT = [{"role": "user", "content": "Hello, how are you today?"}]


@pytest.fixture(scope="module")
def srv(tiny_ckpt):
    llm = LLM(tiny_ckpt("qwen3"), **ENGINE)
    client = InProcessClient(llm.engine, MODEL)
    with serve(build_app(client, llm.tokenizer, MODEL, api_key=KEY)) as url:
        yield SimpleNamespace(llm=llm, client=client, url=url, headers={"Authorization": f"Bearer {KEY}"},
                              oa=openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30))
    client.close()


@pytest.fixture(scope="module")
def ref(tiny_ckpt):
    """A second engine on the same checkpoint for offline references (the served one runs in its thread)."""
    return LLM(tiny_ckpt("qwen3"), **ENGINE)


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, **kw)


def stats(srv) -> dict:
    return asyncio.run(srv.client.stats())


def wait_idle(srv, timeout: float = 5.0) -> dict:
    end = time.time() + timeout
    while (s := stats(srv))["num_running"] + s["num_waiting"] > 0 and time.time() < end:
        time.sleep(0.02)
    return s


# --- pieces, no server ------------------------------------------------------------------------
def test_incremental_detokenizer_equals_whole_decode(ref):
    """Random ids incl. special tokens, lone UTF-8 bytes and ids past the tokenizer's vocab."""
    tok, rng = ref.tokenizer, random.Random(0)
    for trial in range(30):
        ids = [rng.randrange(1001) for _ in range(rng.randint(1, 60))]
        d, out = Detokenizer(tok), ""
        k = 0
        while k < len(ids):
            step = rng.randint(1, 4)
            out += d.push(ids[k:k + step], final=k + step >= len(ids))
            k += step
        assert out == tok.decode(ids), trial
    text = "héllo wörld 中文 🙂"  # characters split over byte tokens: no U+FFFD ever goes out
    d = Detokenizer(tok)
    pieces = [d.push([i]) for i in tok.encode(text)]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_tool_call_filter_char_by_char():
    text = ('Sure.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n'
            '<tool_call>{"name": "g"}</tool_call>')
    content, calls = parse_tool_calls(text)
    assert content == "Sure.\n\n" and [c["function"]["name"] for c in calls] == ["f", "g"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"x": 1} and calls[1]["function"]["arguments"] == "{}"
    f, got, names = ToolCallFilter(), "", []
    for i, ch in enumerate(text):
        c, cs = f.feed(ch, final=i == len(text) - 1)
        assert "<" not in c
        got += c
        names += [x["function"]["name"] for x in cs]
    assert got == content and names == ["f", "g"]
    assert parse_tool_calls("a <tool_call>not json</tool_call> b")[0] == "a <tool_call>not json</tool_call> b"
    assert parse_tool_calls('<tool_call>{"name": "h", "arguments": {}}')[1][0]["function"]["name"] == "h"  # unclosed


# --- the server -------------------------------------------------------------------------------
def test_models_and_health(srv):
    assert [m.id for m in srv.oa.models.list().data] == [MODEL]
    assert srv.oa.models.retrieve(MODEL).id == MODEL
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}


def test_chat_greedy_equals_llm_chat_streamed_and_not(srv, ref):
    want = ref.chat(CHAT, greedy(max_tokens=24))[0]
    r = srv.oa.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=24)
    c = r.choices[0]
    assert c.message.content == want.text and c.message.role == "assistant" and c.finish_reason == want.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(want.prompt_token_ids), len(want.token_ids))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(srv.oa.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_completion_tokens=24,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == \
        [want.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)


@pytest.mark.parametrize("prompt", ["The quick brown fox", [5, 17, 300, 42, 7]])
def test_completions_greedy_equals_llm_generate(srv, ref, prompt):
    want = ref.generate(prompt, greedy(max_tokens=30, ignore_eos=True))[0]
    r = srv.oa.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=30,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(want.prompt_token_ids), 30)
    chunks = list(srv.oa.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=30, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks) == want.text and len(chunks) > 3
    assert chunks[-1].choices[0].finish_reason == "length"


def test_concurrent_requests_batch_and_match_offline(srv, ref):
    prompts = ["Hello", "The sky is", "def add(a, b):", "Numbers: 0 1 2", "Mixture of experts", "I am fine"]
    want = [o.text for o in ref.generate(prompts, greedy(max_tokens=16, ignore_eos=True))]
    kw = dict(model=MODEL, temperature=0, max_tokens=16, extra_body={"ignore_eos": True})

    def one(i: int) -> str:
        if i % 2:
            return "".join(c.choices[0].text for c in srv.oa.completions.create(prompt=prompts[i], stream=True, **kw))
        return srv.oa.completions.create(prompt=prompts[i], **kw).choices[0].text

    steps = stats(srv)["steps"]
    with ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(one, range(len(prompts)))) == want
    assert stats(srv)["steps"] - steps <= len(prompts) * 16 // 2  # they shared engine steps (16 when all at once)


def test_n_choices_and_seed(srv, ref):
    prompt = "Hello, world!"
    want = ref.generate([prompt] * 2, [SamplingParams(temperature=1.0, seed=7 + j, max_tokens=12, ignore_eos=True)
                                       for j in range(2)])
    kw = dict(model=MODEL, prompt=prompt, n=2, temperature=1.0, seed=7, max_tokens=12, extra_body={"ignore_eos": True})
    r = srv.oa.completions.create(**kw)
    assert [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens == 24
    assert [c.text for c in r.choices] == [w.text for w in want] and want[0].text != want[1].text
    texts = ["", ""]
    for ch in srv.oa.completions.create(**kw, stream=True):
        for c in ch.choices:
            texts[c.index] += c.text
    assert texts == [w.text for w in want]
    chat = srv.oa.chat.completions.create(model=MODEL, messages=CHAT, n=2, temperature=0, max_tokens=8)
    assert len(chat.choices) == 2 and chat.choices[0].message.content == chat.choices[1].message.content


def test_stop_strings_cut_and_never_leak_into_streams(srv, ref):
    prompt = "The weather is nice and"
    out = ref.generate(prompt, greedy(max_tokens=40, ignore_eos=True))[0]
    pieces = [ref.tokenizer.decode([t]) for t in out.token_ids]
    # a stop string across a token boundary: its first half arrives one token before the engine stops
    k = next(i for i in range(2, len(pieces) - 1) if pieces[i][-2:].isalpha() and len(pieces[i]) >= 2
             and pieces[i + 1][:2].isalpha() and len(pieces[i + 1]) >= 2)
    stop, full = pieces[k][-2:] + pieces[k + 1][:2], out.text
    want = full[:full.find(stop)]
    for stops in (stop, [stop, "zzzz-never"]):
        kw = dict(model=MODEL, prompt=prompt, temperature=0, max_tokens=40, stop=stops, extra_body={"ignore_eos": True})
        r = srv.oa.completions.create(**kw)
        assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
        pieces = [ch.choices[0].text for ch in srv.oa.completions.create(**kw, stream=True)]
        assert "".join(pieces) == want and not any(stop in p for p in pieces)
    assert stats(srv)["kv_blocks_free"] == stats(srv)["kv_blocks_total"] or wait_idle(srv)


def test_logprobs_shapes_and_values(srv, ref):
    want = ref.chat(CHAT, greedy(max_tokens=10, logprobs=3))[0]
    r = srv.oa.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=10, logprobs=True,
                                       top_logprobs=3)
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens == len(want.logprobs)
    for e, w in zip(lp, want.logprobs):
        assert len(e.top_logprobs) == 3 and e.logprob == pytest.approx(w["token"], abs=1e-4)
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-6)  # greedy = the most likely
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
    assert "".join(e.token for e in lp) == ref.tokenizer.decode(want.token_ids, skip_special_tokens=False)
    streamed = [e for ch in srv.oa.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=10,
                                                           logprobs=True, stream=True)
                if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in lp] and all(e.top_logprobs == [] for e in streamed)
    c = srv.oa.completions.create(model=MODEL, prompt="The quick", temperature=0, max_tokens=6, logprobs=2).choices[0]
    assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) == len(c.logprobs.top_logprobs) == 6
    assert all(1 <= len(t) <= 2 for t in c.logprobs.top_logprobs) and c.logprobs.text_offset[0] == 0
    assert srv.oa.completions.create(model=MODEL, prompt="a", max_tokens=2).choices[0].logprobs is None


def test_bad_requests_are_openai_errors_and_the_server_keeps_serving(srv):
    post = lambda path, body, **kw: httpx.post(srv.url + path, content=body, headers={**srv.headers, **kw})
    r = post("/v1/chat/completions", b'{"model": "tiny-qwen3", "messages": [')
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = post("/v1/completions", b'[1, 2]')
    assert r.status_code == 400 and "object" in r.json()["error"]["message"]
    r = post("/v1/chat/completions", json.dumps({"messages": "hi"}).encode())
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = post("/v1/completions", json.dumps({"prompt": "a", "temperature": "hot"}).encode())
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    assert httpx.get(srv.url + "/v1/nothing-here").json()["error"]["code"] == "not_found"
    with pytest.raises(openai.NotFoundError) as e:
        srv.oa.chat.completions.create(model="gpt-17", messages=CHAT)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        srv.oa.completions.create(model=MODEL, prompt="a", max_tokens=-3)
    assert e.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        srv.oa.chat.completions.create(model=MODEL, messages=CHAT, temperature=7)
    with pytest.raises(openai.BadRequestError) as e:
        srv.oa.completions.create(model=MODEL, prompt=[3] * 250, max_tokens=10)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        srv.oa.completions.create(model=MODEL, prompt=[3, 5000], max_tokens=3)  # id past the vocab: engine refuses
    assert "token ids" in e.value.message
    with pytest.raises(openai.BadRequestError):  # same, streaming: an HTTP error, not a 200 stream
        list(srv.oa.completions.create(model=MODEL, prompt=[3, 5000], max_tokens=3, stream=True))
    for key in ("wrong", None):
        hdr = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "a"}, headers=hdr)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
    r = srv.oa.completions.create(model=MODEL, prompt="still alive", temperature=0, max_tokens=4,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 4
    s = wait_idle(srv)
    assert s["kv_blocks_free"] == s["kv_blocks_total"]


def test_client_disconnect_aborts_stream_and_waiting_request(srv):
    before = stats(srv)["aborted"]
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, headers=srv.headers) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines).startswith("data: ") and next(l for l in lines if l).startswith("data: ")
    s = wait_idle(srv)
    assert s["aborted"] == before + 1 and s["kv_blocks_free"] == s["kv_blocks_total"]
    body = {"model": MODEL, "prompt": "The quick", "max_tokens": 250, "ignore_eos": True}  # ~0.3 s at the
    # tiny model's fastest: the client gives up well before (at 0.3 s a quiet machine sometimes finished first)
    with pytest.raises(httpx.ReadTimeout):  # non-streaming: the client gives up before the answer
        httpx.post(srv.url + "/v1/completions", json=body, headers=srv.headers, timeout=0.15)
    s = wait_idle(srv)
    assert s["aborted"] == before + 2 and s["kv_blocks_free"] == s["kv_blocks_total"]


def test_metrics(srv):
    srv.oa.completions.create(model=MODEL, prompt="metrics", max_tokens=3)
    assert httpx.post(srv.url + "/v1/completions", content=b"{", headers=srv.headers).status_code == 400
    text = httpx.get(srv.url + "/metrics").text
    for needle in ('nanoforge_requests_total{endpoint="/v1/completions",status="200"}',
                   'nanoforge_requests_total{endpoint="/v1/completions",status="400"}',
                   "nanoforge_prompt_tokens_total", "nanoforge_generation_tokens_total",
                   'nanoforge_time_to_first_token_seconds_bucket{le="+Inf"}',
                   "nanoforge_inter_token_latency_seconds_sum", "nanoforge_kv_cache_usage_ratio",
                   "nanoforge_prefix_cache_hit_rate", "# TYPE nanoforge_requests_total counter"):
        assert needle in text, needle
    gen = next(l for l in text.splitlines() if l.startswith("nanoforge_generation_tokens_total"))
    assert float(gen.split()[-1]) >= 3
    SAMPLE = r'([a-z_][a-z0-9_]*)(\{[a-z_]+="[^"]*"(?:,[a-z_]+="[^"]*")*\})? (\S+)'
    types = {l.split()[2]: l.split()[3] for l in text.splitlines() if l.startswith("# TYPE ")}
    for line in text.splitlines():  # every sample well-formed and of a declared family
        if line.startswith("#"):
            continue
        name, _, value = re.fullmatch(SAMPLE, line).groups()
        float(value)
        assert name in types or types.get(re.sub(r"_(bucket|sum|count)$", "", name)) == "histogram", line


# --- tool calls: a scripted engine emits a call, the template renders tools and the tool result --
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools><|im_end|>\n"
    "{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n{{ m.content or '' }}"
    "{% for tc in m.tool_calls %}<tool_call>\n{\"name\": \"{{ tc.function.name }}\", \"arguments\": "
    "{{ tc.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


class ScriptedClient:
    """An EngineClient that 'generates' fixed token ids, 3 per delta, and records the prompts."""

    def __init__(self, ids: list[int], max_model_len: int, fail: bool = False):
        self.ids, self.model_name, self.max_model_len, self.prompts = ids, MODEL, max_model_len, []
        self.fail = fail  # fail after the first delta, like an engine step that raised

    async def generate(self, request):
        self.prompts.append(list(request.prompt_ids))
        for k in range(0, len(self.ids), 3):
            await asyncio.sleep(0)
            if self.fail and k:
                yield TokenDelta(request.request_id, finish_reason="error", error="engine step failed: boom")
                return
            yield TokenDelta(request.request_id, self.ids[k:k + 3], None,
                             "stop" if k + 3 >= len(self.ids) else None, len(request.prompt_ids))

    async def abort(self, request_id: str) -> None:
        pass

    async def stats(self) -> dict:
        return {}


def test_tool_call_round_trip(srv):
    tok = copy.copy(srv.llm.tokenizer)
    tok.chat_templates, tok._compiled = {"default": TOOL_TEMPLATE}, {}
    said = "Let me check.\n" + CALL
    ids = tok.encode(said, add_special_tokens=False)
    assert tok.decode(ids) == said  # the forced output survives the round trip
    fake = ScriptedClient(ids, 4096)
    with serve(build_app(fake, tok, MODEL, api_key=None)) as url:
        oa = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        msgs = [{"role": "user", "content": "Weather in Paris?"}]
        r = oa.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content == "Let me check."
        (call,) = c.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
        assert json.loads(call.function.arguments) == {"city": "Paris"}
        rendered = tok.decode(fake.prompts[-1], skip_special_tokens=False)
        assert '"name": "get_weather"' in rendered and rendered.startswith("<|im_start|>system\n<tools>")

        content, calls, reasons = "", [], []
        for ch in oa.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, stream=True):
            d = ch.choices[0].delta
            content += d.content or ""
            calls += d.tool_calls or []
            reasons += [ch.choices[0].finish_reason] if ch.choices[0].finish_reason else []
        assert content == "Let me check.\n" and reasons == ["tool_calls"] and len(calls) == 1
        assert calls[0].index == 0 and calls[0].function.name == "get_weather"
        assert json.loads(calls[0].function.arguments) == {"city": "Paris"}

        msgs += [c.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'}]
        oa.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS)
        rendered = tok.decode(fake.prompts[-1], skip_special_tokens=False)
        assert '<tool_response>\n{"temp_c": 21}\n</tool_response>' in rendered
        assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in rendered

        r = oa.chat.completions.create(model=MODEL, messages=msgs[:1], tools=TOOLS, tool_choice="none")
        assert r.choices[0].message.content == said and not r.choices[0].message.tool_calls


def test_engine_failure_mid_request_is_a_server_error(srv):
    tok = srv.llm.tokenizer
    with serve(build_app(ScriptedClient(tok.encode("one two three four five"), 4096, fail=True), tok, MODEL,
                         api_key=None)) as url:
        oa = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError):
            oa.completions.create(model=MODEL, prompt="x")
        with pytest.raises(openai.APIError, match="engine step failed"):  # the 200 stream carries an error event
            list(oa.completions.create(model=MODEL, prompt="x", stream=True))
        assert httpx.get(url + "/health").status_code == 200


def test_serve_command_binds_localhost_by_default():
    from nanoforge.cli import build_parser

    a = build_parser().parse_args(["serve", "some/plan"])
    assert (a.host, a.port, a.api_key, a.served_model_name) == ("127.0.0.1", 8000, None, None)


def test_bench_serve_against_the_server(srv, tmp_path):
    """`nanoforge bench serve`: Poisson arrivals against the live server; every request streams
    its tokens, percentiles are ordered, the JSON lands in the results dir, no blocks leak."""
    from nanoforge.tools.bench_serve import ServeWorkload, bench_serve

    w = ServeWorkload(num_prompts=8, rate=50.0, input_len=12, output_len=6, vocab=500, seed=1)
    r = bench_serve(srv.url, MODEL, w, tmp_path, api_key=KEY)
    assert r["completed"] == 8 and r["num_errors"] == 0 and r["output_tokens"] == 8 * 6
    assert 0 < r["ttft_s"]["p50"] <= r["ttft_s"]["p99"] and r["itl_s"]["p50"] <= r["itl_s"]["p99"]
    assert json.loads(Path(r["path"]).read_text())["workload"]["rate"] == 50.0
    for _ in range(100):
        if stats(srv)["num_running"] == 0:
            break
        time.sleep(0.02)
    assert stats(srv)["kv_blocks_free"] == stats(srv)["kv_blocks_total"]


def test_bench_serve_closed_loop_against_the_server(srv, tmp_path):
    """Closed loop (`--concurrency 4 --duration 3`): clients keep one stream each in flight until the
    deadline; no errors, /metrics shows every block free again (leaked_blocks 0), the JSON is written."""
    from nanoforge.tools.bench_serve import bench_serve, workload_from_flags

    w = workload_from_flags(rate=None, num_prompts=None, concurrency=4, duration=3.0, input_len=12, output_len=6,
                            vocab=500, seed=2)
    t0 = time.perf_counter()
    r = bench_serve(srv.url, MODEL, w, tmp_path, api_key=KEY)
    assert time.perf_counter() - t0 >= 3.0 and r["duration_s"] >= 3.0
    assert r["num_errors"] == 0 and r["errors"] == [] and r["completed"] == r["requests"] > 4
    assert r["output_tokens"] == 6 * r["completed"] and r["output_tok_s"] > 0
    assert 0 < r["itl_s"]["p50"] <= r["itl_s"]["p99"] and r["leaked_blocks"] == 0 and "leak_note" not in r
    saved = json.loads(Path(r["path"]).read_text())
    assert (saved["mode"], saved["concurrency"], saved["duration"], saved["leaked_blocks"]) == ("closed-loop", 4, 3.0, 0)
    assert saved["url"] == srv.url and saved["model"] == MODEL and "platform" in saved["machine"]
    assert saved["kv_blocks"]["after"]["free"] == saved["kv_blocks"]["after"]["total"]


@pytest.mark.parametrize("argv, flag", [
    (["--concurrency", "4", "--duration", "3", "--rate", "5"], "exclude each other"),
    (["--num-prompts", "8", "--duration", "3"], "exclude each other"),
    (["--concurrency", "4"], "--duration missing"),
    (["--duration", "3"], "--concurrency missing"),
    (["--concurrency", "0", "--duration", "3"], "--concurrency must be"),
    (["--concurrency", "2", "--duration", "-1"], "--duration must be"),
    (["--concurrency", "2", "--duration", "inf"], "--duration must be"),
    (["--rate", "0"], "--rate must be"),
    (["--num-prompts", "0"], "--num-prompts must be"),
    (["--output-len", "0"], "--output-len must be"),
])
def test_bench_serve_bad_flags_are_one_line_errors(argv, flag, capsys, tmp_path):
    """Checked before any request: the URL points at a closed port, so reaching the network would fail."""
    from nanoforge.cli import main

    code = main(["bench", "serve", "--url", "http://127.0.0.1:9", "--model", MODEL, "--results-dir", str(tmp_path),
                 *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: bench serve: ") and flag in err and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())


def test_bench_serve_counts_stream_errors_and_reports_no_gauges(srv, tmp_path):
    """An engine that fails mid-stream: every request is an error with the event's message; a server
    whose /metrics has no engine gauges gets leaked_blocks None and a note, not a guess."""
    from nanoforge.tools.bench_serve import ServeWorkload, bench_serve

    tok = srv.llm.tokenizer
    with serve(build_app(ScriptedClient(tok.encode("one two three four five"), 4096, fail=True), tok, MODEL,
                         api_key=None)) as url:
        r = bench_serve(url, MODEL, ServeWorkload(input_len=4, output_len=4, concurrency=2, duration=0.5), tmp_path)
    assert r["requests"] > 0 and r["num_errors"] == r["requests"] and r["completed"] == 0
    assert r["errors"][0].startswith("error event: engine step failed")
    assert r["leaked_blocks"] is None and "lacks the gauges" in r["leak_note"]


def test_bench_serve_leak_check_sees_blocks_not_freed(srv, tmp_path):
    """The leak check is not vacuous: an engine whose free-block gauge drops by one per request (and
    never recovers) is reported as leaking exactly that many blocks, after waiting leak_wait_s."""
    from nanoforge.tools.bench_serve import ServeWorkload, bench_serve

    class Leaky(ScriptedClient):
        async def stats(self) -> dict:
            return {"num_running": 0, "num_waiting": 0, "kv_blocks_free": 100 - len(self.prompts),
                    "kv_blocks_total": 100}

    tok = srv.llm.tokenizer
    with serve(build_app(Leaky(tok.encode("one two three four five"), 4096), tok, MODEL, api_key=None)) as url:
        r = bench_serve(url, MODEL, ServeWorkload(num_prompts=3, input_len=4, output_len=4), tmp_path, leak_wait_s=0.3)
    assert r["mode"] == "poisson" and r["num_errors"] == 0 and r["completed"] == 3
    assert r["leaked_blocks"] == 3 and r["kv_blocks"]["after"]["free"] == 97
