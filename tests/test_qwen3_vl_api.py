"""Images through the APIs: a tiny random Qwen3-VL served over HTTP (in-process engine, and an engine
server process over ZMQ) answers a chat completion with a base64 data: URL image with the greedy tokens
LLM.generate gives for the same image and prompt; LLM.chat takes PIL images, paths and data: URLs; http(s)
URLs, bad base64, non-images, too many images, and images sent to a text-only model are 400s naming the
problem."""
from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

PIL = pytest.importorskip("PIL")

from nanoforge import LLM, SamplingParams  # noqa: E402
from nanoforge.runtime.chat_images import IMAGE_PLACEHOLDER as PAD  # noqa: E402
from nanoforge.serving.inprocess import InProcessClient  # noqa: E402
from nanoforge.serving.engine_server import start_engine_server, wait_engine_ready  # noqa: E402
from nanoforge.serving.openai_api import build_app  # noqa: E402
from nanoforge.serving.protocol import GenerateRequest  # noqa: E402
from nanoforge.serving.zmq_client import ZmqEngineClient  # noqa: E402
from serving_fixtures import serve  # noqa: E402
from test_qwen3_vl import images, make_tiny_vl  # noqa: E402

pytestmark = pytest.mark.timeout(120)
GREEDY = dict(temperature=0, max_tokens=6, ignore_eos=True)


def data_url(img, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def image_chat(url: str, text: str = " what is it?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "Look: "},
                                         {"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    """The tiny VL model, its reference answers (computed before the server's engine thread starts on
    the same engine), and its app served by uvicorn."""
    ckpt = tmp_path_factory.mktemp("qwen3_vl_api")
    make_tiny_vl(ckpt)
    proc, addr = start_engine_server(ckpt, dtype="f32", block_size=4, max_model_len=256, model_name="tiny-vl")
    llm = LLM(ckpt, dtype="f32", progress=False, block_size=4, max_model_len=256)
    tok, (noise, gradient, _) = llm.tokenizer, images()
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": f"Look: {PAD} what is it?"}]),
                        add_special_tokens=False)
    ref = llm.generate([prompt], SamplingParams(**GREEDY), images=[[noise]])[0]
    path = ckpt / "noise.png"
    noise.save(path)
    pil = [{"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "image", "image": noise},
                                        {"type": "text", "text": " what is it?"}]}]
    chat = llm.chat([pil, image_chat(str(path)), image_chat(f"file://{path}"), image_chat(data_url(noise))],
                    SamplingParams(**GREEDY))
    client = InProcessClient(llm.engine, "tiny-vl")
    try:
        with serve(build_app(client, llm.tokenizer, "tiny-vl")) as url:
            yield SimpleNamespace(ckpt=ckpt, llm=llm, prompt=prompt, ref=ref, chat=chat, noise=noise,
                                  gradient=gradient, url=url, engine_server=(proc, addr))
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        Path(proc.log_path).unlink(missing_ok=True)


def post(url: str, messages: list[dict], **kw) -> httpx.Response:
    body = {"model": "tiny-vl", "messages": messages, **GREEDY, **kw}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60)


def test_llm_chat_with_pil_images_paths_and_data_urls_equals_generate(vl):
    for out in vl.chat:  # a PIL image part, a path, a file:// URL, a data: URL
        assert out.token_ids == vl.ref.token_ids
        assert out.prompt_token_ids == vl.ref.prompt_token_ids  # the placeholder where the part was, expanded


def test_chat_completion_with_a_data_url_equals_generate(vl):
    r = post(vl.url, image_chat(data_url(vl.noise)))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["choices"][0]["message"]["content"] == vl.ref.text
    assert out["usage"]["completion_tokens"] == len(vl.ref.token_ids) == GREEDY["max_tokens"]
    assert out["usage"]["prompt_tokens"] == len(vl.ref.prompt_token_ids)  # counted with the image's tokens
    other = post(vl.url, image_chat(data_url(vl.gradient)))  # a different image changes the answer
    assert other.status_code == 200 and other.json()["choices"][0]["message"]["content"] != vl.ref.text


def test_default_max_tokens_fits_the_expanded_prompt(vl):
    body = {"model": "tiny-vl", "messages": image_chat(data_url(vl.noise)), "temperature": 0}
    r = httpx.post(vl.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text  # max_tokens counted from the unexpanded prompt would not fit


def test_images_travel_to_an_engine_server_over_zmq(vl):
    """A ZmqEngineClient request with image bytes (msgpack bin on the wire) gives LLM.generate's tokens;
    bytes that are no image end it with an error naming the problem (the HTTP server makes that a 400)."""
    proc, addr = vl.engine_server
    wait_engine_ready(proc, addr, timeout=120)
    buf = io.BytesIO()
    vl.noise.save(buf, format="PNG")

    async def main():
        c = await ZmqEngineClient.connect(addr, timeout=10)
        try:
            got = []
            for rid, img in (("ok", buf.getvalue()), ("bad", b"not an image")):
                got.append([d async for d in c.generate(GenerateRequest(rid, vl.prompt, dict(GREEDY), images=[img]))])
            return got
        finally:
            c.close()

    ok, bad = asyncio.run(main())
    assert [t for d in ok for t in d.token_ids] == vl.ref.token_ids and ok[-1].finish_reason == "length"
    assert ok[-1].num_prompt_tokens == len(vl.ref.prompt_token_ids)
    assert bad[-1].finish_reason == "error" and "image 0: not a readable image" in bad[-1].error


@pytest.mark.parametrize("url, status, why", [
    ("https://example.com/cat.png", 400, "not fetched by this server"),
    ("file:///etc/hostname", 400, "'file:///etc/hostname' is not read by this server (its operator can allow a "
                                  "directory with --allowed-local-media-path DIR)"),
    ("cat.png", 400, "'cat.png' is not read by this server"),  # a plain path, without the flag
    ("data:image/png;base64,@@@not base64@@@", 400, "not valid base64"),
    ("data:text/plain;base64,aGVsbG8=", 400, "not an image type"),
    ("data:image/png;base64," + base64.b64encode(b"hello, not a png").decode(), 400, "not a readable image"),
])
def test_bad_images_are_400s_naming_the_problem(vl, url, status, why):
    r = post(vl.url, image_chat(url))
    assert r.status_code == status, r.text
    assert why in r.json()["error"]["message"]
    assert post(vl.url, image_chat(data_url(vl.noise))).status_code == 200  # the server keeps serving


def test_too_many_images_is_a_400(vl):
    part = {"type": "image_url", "image_url": {"url": data_url(vl.noise)}}
    r = post(vl.url, [{"role": "user", "content": [part] * 9}])
    assert r.status_code == 400 and "9 images in one request; at most 8" in r.json()["error"]["message"]


def test_text_only_model_refuses_images(tiny_ckpt):
    llm = LLM(tiny_ckpt("qwen3"), progress=False, num_blocks=64, max_model_len=128)
    client = InProcessClient(llm.engine, "tiny")
    try:
        with serve(build_app(client, llm.tokenizer, "tiny")) as url:
            img = PIL.Image.new("RGB", (32, 32), (10, 20, 30))
            r = httpx.post(url + "/v1/chat/completions", json={"messages": image_chat(data_url(img)), **GREEDY},
                           timeout=60)
            assert r.status_code == 400 and "takes no images" in r.json()["error"]["message"], r.text
    finally:
        client.close()


# Qwen3-VL's chat template, cut down to its content loop: image parts render as the placeholder in place
QWEN_VL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n"
    "{% if message.content is string %}{{ message.content }}{% else %}{% for content in message.content %}"
    "{% if content.type == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content.type == 'text' %}{{ content.text }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_template_that_renders_images_is_used_as_is(vl):
    from nanoforge.runtime.chat_images import render_chat, take_images, template_renders_images
    from nanoforge.runtime.tokenizer import Tokenizer

    base = vl.llm.tokenizer
    assert not template_renders_images(base)  # the test tokenizer's: the placeholder is inserted for it
    tok = Tokenizer(base._tok, where="qwen-vl", chat_templates={"default": QWEN_VL_TEMPLATE},
                    special_tokens=base.special_tokens, eos_token_ids=base.eos_token_ids,
                    bos_token_id=base.bos_token_id)
    msgs, imgs = take_images(image_chat("data:image/png;base64,AAAA"), lambda part, where: where)
    assert imgs == ["messages[0].content[1]"] and msgs[0]["content"][1] == {"type": "image"}
    want = f"<|im_start|>user\nLook: {PAD} what is it?<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat(tok, msgs, 1, add_generation_prompt=True) == want  # the template's own rendering
    assert render_chat(base, msgs, 1, add_generation_prompt=True) == want  # inserted, to the same text
