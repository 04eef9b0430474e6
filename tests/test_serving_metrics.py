"""/metrics counts what happened to each request: a request refused as the client's fault (HTTP 400)
is not an engine error nor served prompt tokens, and a client that closes a stream mid-way is a
client disconnect (as well as an abort in the engine)."""
from __future__ import annotations

import re
import time

import httpx
import pytest

from nanoforge import LLM
from nanoforge.serving.inprocess import InProcessClient
from nanoforge.serving.openai_api import build_app
from serving_fixtures import serve
from test_openai_server import ENGINE, MODEL


@pytest.fixture(scope="module")
def url(tiny_ckpt):
    llm = LLM(tiny_ckpt("qwen3"), **ENGINE)
    client = InProcessClient(llm.engine, MODEL)
    with serve(build_app(client, llm.tokenizer, MODEL)) as u:
        yield u
    client.close()


def scrape(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[re.sub(r'model_name="[^"]*",?', "", name).replace("{}", "")] = float(value)
    return out


def settle(url: str, timeout: float = 5.0) -> dict[str, float]:
    end = time.time() + timeout
    while ((m := scrape(url))["nanoforge_num_requests_running"] or m["nanoforge_num_requests_waiting"]) \
            and time.time() < end:
        time.sleep(0.02)
    return m


@pytest.mark.parametrize("stream", [False, True])
def test_refused_request_is_a_client_error_not_an_engine_error(url, stream):
    before = settle(url)
    r = httpx.post(url + "/v1/completions", json={"prompt": [3, 5000], "max_tokens": 3, "stream": stream})
    assert r.status_code == 400 and "token ids" in r.json()["error"]["message"]
    after = settle(url)
    assert after['nanoforge_requests_total{endpoint="/v1/completions",status="400"}'] == \
        before.get('nanoforge_requests_total{endpoint="/v1/completions",status="400"}', 0) + 1
    assert after["nanoforge_engine_rejected_total"] == before["nanoforge_engine_rejected_total"] + 1
    assert after["nanoforge_engine_errors_total"] == before["nanoforge_engine_errors_total"]
    assert after["nanoforge_prompt_tokens_total"] == before["nanoforge_prompt_tokens_total"]  # nothing served
    assert after["nanoforge_e2e_request_latency_seconds_count"] == before["nanoforge_e2e_request_latency_seconds_count"]


def test_client_closing_a_stream_is_a_client_disconnect(url):
    before = settle(url)
    body = {"model": MODEL, "prompt": "The quick", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines).startswith("data: ") and next(l for l in lines if l).startswith("data: ")
    end = time.time() + 5
    while (after := settle(url))["nanoforge_client_disconnects_total"] == before["nanoforge_client_disconnects_total"] \
            and time.time() < end:
        time.sleep(0.02)
    assert after["nanoforge_engine_aborted_total"] == before["nanoforge_engine_aborted_total"] + 1
    assert after["nanoforge_client_disconnects_total"] == before["nanoforge_client_disconnects_total"] + 1
    assert after["nanoforge_engine_errors_total"] == before["nanoforge_engine_errors_total"]
    # a stream read to its end is no disconnect
    with httpx.stream("POST", url + "/v1/completions", json={**body, "max_tokens": 3}) as r:
        assert [l for l in r.iter_lines() if l][-1] == "data: [DONE]"
    done = settle(url)
    assert done["nanoforge_client_disconnects_total"] == after["nanoforge_client_disconnects_total"]
