"""EPD for Qwen3-VL (issue 21): an encode engine process (`--role encode`: the vision tower alone), a prefill
and a decode engine process behind the Router give one in-process engine's greedy tokens for image + text
prompts; the images are encoded once, on the encode engine only (its cache by image hash; the prefill and
decode engines run no tower); text requests skip it; without an encode engine the prefill engine encodes
itself; through the OpenAI API with --allowed-local-media-path, file:// URLs and paths under the directory are
read and others are 400s naming the URL; a killed encode engine makes image requests 503s naming it while
text requests are still answered. The embedding maps are checked field by field. One deployment per module."""
from __future__ import annotations

import asyncio
import io
import os
import re
import signal
from types import SimpleNamespace

import httpx
import pytest
import torch

PIL = pytest.importorskip("PIL")

from nanoforge import LLM, SamplingParams  # noqa: E402
from nanoforge.errors import NanoForgeError  # noqa: E402
from nanoforge.runtime.chat_images import IMAGE_PLACEHOLDER as PAD  # noqa: E402
from nanoforge.runtime.image_embeds import ImageEncoder, image_from_wire  # noqa: E402
from nanoforge.runtime.vision_inputs import preprocess  # noqa: E402
from nanoforge.serving.encode_server import serve_encoder  # noqa: E402
from nanoforge.serving.engine_server import (free_tcp_addr, start_engine_server, stop_engine_server,  # noqa: E402
                                             wait_engine_ready)
from nanoforge.serving.openai_api import build_app  # noqa: E402
from nanoforge.serving.protocol import GenerateRequest  # noqa: E402
from nanoforge.serving.router import Router  # noqa: E402
from nanoforge.serving.zmq_client import ZmqEngineClient  # noqa: E402
from serving_fixtures import engine_stats as stats, http_router  # noqa: E402
from test_qwen3_vl import images, make_tiny_vl  # noqa: E402
from test_qwen3_vl_api import data_url, image_chat  # noqa: E402

pytestmark = pytest.mark.timeout(180)
GREEDY = dict(temperature=0, max_tokens=6, ignore_eos=True)
ENGINE = dict(dtype="f32", block_size=4, max_model_len=256)
TEXT = {"role": "user", "content": "Only words here, no image."}


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def epd(tmp_path_factory):
    """Encode, prefill and decode engine processes on the tiny VL checkpoint, and the in-process engine's
    answers (computed while they start)."""
    ckpt = tmp_path_factory.mktemp("qwen3_vl_epd")
    make_tiny_vl(ckpt)
    procs = {role: start_engine_server(ckpt, role=role, model_name="tiny-vl", **ENGINE)
             for role in ("encode", "prefill", "decode")}
    try:
        llm = LLM(ckpt, progress=False, **ENGINE)
        tok, (noise, gradient, other) = llm.tokenizer, images()
        ids = lambda text: tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]),  # noqa: E731
                                      add_special_tokens=False)
        one, two, text = ids(f"Look: {PAD} what is it?"), ids(f"{PAD} or {PAD}, which?"), ids("Only words here.")
        cases = [(one, [noise]), (one, [gradient]), (two, [gradient, other]), (one, [noise]), (text, None)]
        want = llm.generate([p for p, _ in cases], SamplingParams(**GREEDY), images=[im for _, im in cases])
        chat, chat_text = llm.chat([image_chat(data_url(noise)), [TEXT]], SamplingParams(**GREEDY))
        hello = {role: wait_engine_ready(proc, addr, timeout=120) for role, (proc, addr) in procs.items()}
        yield SimpleNamespace(ckpt=ckpt, llm=llm, cases=cases, want=want, chat=chat, chat_text=chat_text,
                              hello=hello, procs=procs,
                              images=(noise, gradient, other), **{r: addr for r, (_, addr) in procs.items()})
    finally:
        for proc, _ in procs.values():
            stop_engine_server(proc, timeout=10)


async def run(router: Router, rid: str, prompt: list[int], imgs: list | None) -> tuple[list[int], object]:
    tokens, last = [], None
    async for d in router.generate(GenerateRequest(rid, prompt, dict(GREEDY), images=[png(i) for i in imgs or ()]
                                                   or None)):
        tokens += d.token_ids
        last = d
    return tokens, last


def test_the_encode_engine_loads_the_tower_alone_and_its_maps_are_checked(epd):
    """In process: ImageEncoder (what --role encode runs) loads only the vision tower's params, encodes a
    repeated image once, and its maps give the engine's own tower's embeddings bit for bit; maps that do not
    fit this model are refused naming the field."""
    enc = ImageEncoder.load(epd.llm.plan, epd.llm.checkpoint)
    assert enc.encoder.params and all(k.startswith("model.visual.") for k in enc.encoder.params)
    noise = epd.images[0]
    maps = enc.encode([png(noise), png(noise)])
    assert enc.stats() == {"images": 2, "images_encoded": 1, "image_cache_hits": 1}
    vision, spec = epd.llm.engine.runner.vision, epd.llm.engine.vision_spec
    got = image_from_wire(maps[1], spec, vision)
    own = vision.embeddings(preprocess(png(noise), spec))
    assert len(got.embeds) == len(own) == 3 and got.pixels is None  # the embeddings + two deepstack levels
    assert all(torch.equal(a, b) for a, b in zip(got.embeds, own))
    m = maps[0]
    n, width = m["num_tokens"], m["shapes"][0][1]
    bad = {"num_tokens": ({"num_tokens": n + 1}, "does not match its grid"),
           "shapes": ({"shapes": [[n, width + 1]] * 3}, f"shapes[0] is [{n}, {width + 1}]"),
           "data": ({"data": [b"\0" * 8] + m["data"][1:]}, "data[0] must be"),
           "levels": ({"shapes": m["shapes"][:2], "data": m["data"][:2]}, "3 outputs of this model's vision encoder"),
           "dtype": ({"dtype": "f64"}, "dtype must be one of"),
           "grid": ({"grid": [1, 3, 4]}, "multiples of the merge size"),
           "nan": ({"data": [torch.full((n, width), float("nan")).numpy().tobytes()] + m["data"][1:]}, "NaN")}
    for name, (change, why) in bad.items():
        with pytest.raises(NanoForgeError, match=re.escape(why)):
            image_from_wire({**m, **change}, spec, vision)


def test_encode_role_mistakes_are_named(epd, tiny_ckpt):
    with pytest.raises(NanoForgeError, match="has no vision encoder"):
        serve_encoder(tiny_ckpt("qwen3"), free_tcp_addr())
    with pytest.raises(NanoForgeError, match="--role encode does not take --tp"):
        serve_encoder(epd.ckpt, free_tcp_addr(), tp=2)

    async def wrong_role():
        with pytest.raises(NanoForgeError, match=f"engine at {epd.encode} is an encode engine; it cannot be "
                                                 "routed as prefill"):
            await Router.connect([epd.encode], [epd.decode])
        with pytest.raises(NanoForgeError, match="no engines: .* \\(encode engines only encode images"):
            await Router.connect(encode=[epd.encode])
        c = await ZmqEngineClient.connect(epd.encode, timeout=5)
        try:
            sent = [d async for d in c.generate(GenerateRequest("g", [1, 2, 3], dict(GREEDY)))]
        finally:
            c.close()
        assert sent[-1].finish_reason == "error" and "this is an encode engine" in sent[-1].error

    asyncio.run(wrong_role())


def test_epd_greedy_tokens_equal_one_engine_and_only_the_encode_engine_encodes(epd):
    assert epd.hello["encode"]["role"] == "encode" and "kv_contract" in epd.hello["encode"]

    async def main():
        router = await Router.connect([epd.prefill], [epd.decode], encode=[epd.encode])
        try:
            outs = await asyncio.gather(*[run(router, f"r{i}", p, im) for i, (p, im) in enumerate(epd.cases)])
            bad = None
            async for d in router.generate(GenerateRequest("bad", epd.cases[0][0], dict(GREEDY),
                                                           images=[b"no image"])):
                bad = d
            return outs, bad, await router.stats()
        finally:
            router.close()

    outs, bad, st = asyncio.run(main())
    for (tokens, last), want in zip(outs, epd.want):
        assert tokens == want.token_ids and last.finish_reason == "length", last.error
        assert last.num_prompt_tokens == len(want.prompt_token_ids)  # the prompt as the engines expanded it
    assert bad.finish_reason == "error" and "image 0: not a readable image" in bad.error  # the client's fault
    encode, prefill, decode = stats(epd.encode), stats(epd.prefill), stats(epd.decode)
    assert encode["images_encoded"] == 3 and encode["image_cache_hits"] == 2  # gradient and noise came again
    assert prefill["images_encoded"] == 0 and decode["images_encoded"] == 0  # no tower ran there
    assert st["router_encode_requests"] == 5 and st["router_pd_requests"] == 5  # the text request skipped it
    assert decode["kv_migrations"] >= 5 and decode["kv_migration_fallbacks"] == 0


def test_pd_without_an_encode_engine_encodes_on_the_prefill_engine(epd):
    before = stats(epd.prefill)["images_encoded"]

    async def main():
        router = await Router.connect([epd.prefill], [epd.decode])
        try:
            return await run(router, "pd", *epd.cases[2])
        finally:
            router.close()

    tokens, last = asyncio.run(main())
    assert tokens == epd.want[2].token_ids and last.num_prompt_tokens == len(epd.want[2].prompt_token_ids)
    assert stats(epd.prefill)["images_encoded"] == before + 2 and stats(epd.decode)["images_encoded"] == 0


def epd_http(media_dir=None, **kw):
    """The OpenAI app (local media under media_dir allowed) over a Router of these engines."""
    return http_router(lambda router: build_app(router, router.tokenizer, "tiny-vl", allowed_local_media_path=media_dir),
                       **kw)


def post(url: str, messages: list[dict]) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json={"model": "tiny-vl", "messages": messages, **GREEDY},
                      timeout=60)


def test_openai_api_over_epd_reads_local_files_only_under_the_allowed_directory(epd, tmp_path):
    media, outside = tmp_path / "media", tmp_path / "outside.png"
    media.mkdir()
    epd.images[0].save(media / "noise.png")
    epd.images[0].save(outside)
    (media / "escape.png").symlink_to(outside)
    with epd_http(media, prefill=[epd.prefill], decode=[epd.decode], encode=[epd.encode]) as url:
        for u in (data_url(epd.images[0]), f"file://{media / 'noise.png'}", str(media / "noise.png"), "noise.png"):
            r = post(url, image_chat(u))
            assert r.status_code == 200, (u, r.text)
            assert r.json()["choices"][0]["message"]["content"] == epd.chat.text
            assert r.json()["usage"]["prompt_tokens"] == len(epd.chat.prompt_token_ids)
        for u, why in ((f"file://{outside}", "is outside --allowed-local-media-path"),
                       (f"file://{media / 'escape.png'}", "is outside --allowed-local-media-path"),
                       ("../outside.png", "is outside --allowed-local-media-path"),
                       (f"file://{media / 'missing.png'}", "no such file under --allowed-local-media-path"),
                       ("https://example.com/noise.png", "not fetched by this server")):
            r = post(url, image_chat(u))
            assert r.status_code == 400, (u, r.text)
            msg = r.json()["error"]["message"]
            assert why in msg and "messages[0].content[1]" in msg and (u in msg or u.startswith("https")), msg
        metrics = httpx.get(url + "/metrics").text
        got = re.search(r"^nanoforge_engine_images_encoded_total\{[^}]*\} (\S+)$", metrics, re.M)
        assert got and float(got[1]) >= 3  # summed over the engines: the encode engine's


def test_a_killed_encode_engine_fails_image_requests_and_text_goes_on(epd):
    """Last in the module: it kills the shared encode engine."""
    proc, _ = epd.procs["encode"]
    with epd_http(prefill=[epd.prefill], decode=[epd.decode], encode=[epd.encode]) as url:
        assert post(url, image_chat(data_url(epd.images[1]))).status_code == 200
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        r = post(url, image_chat(data_url(epd.images[1])))
        assert r.status_code == 503, r.text
        assert f"the encode engine at {epd.encode}" in r.json()["error"]["message"]
        r = post(url, [TEXT])
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == epd.chat_text.text
