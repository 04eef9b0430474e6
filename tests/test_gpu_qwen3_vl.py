"""On the GPU: the tiny random Qwen3-VL checkpoints (dense and MoE; tests/test_qwen3_vl.py makes them) give the
CPU path's greedy tokens for image + text prompts batched with a text-only one, with CUDA graphs and eagerly.
With graphs, decode-only steps replay them (a generated token's multimodal rope position is its index plus the
prompt's delta on all three axes: a plain position the captured mrope reads) while steps with an image
request's prompt tokens run eagerly. Run with `pytest -m gpu`."""
from __future__ import annotations

import pytest
import torch

PIL = pytest.importorskip("PIL")

from nanoforge import LLM, SamplingParams  # noqa: E402
from nanoforge.runtime.chat_images import IMAGE_PLACEHOLDER as PAD  # noqa: E402
from test_qwen3_vl import images, make_tiny_vl  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.timeout(600)]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
ENGINE = dict(progress=False, max_model_len=256, max_num_seqs=8)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3_vl_gpu")
    make_tiny_vl(root / "dense")
    make_tiny_vl(root / "moe", moe=True)
    return {"dense": root / "dense", "moe": root / "moe"}


def cases(llm: LLM) -> tuple[list[list[int]], list]:
    tok = llm.tokenizer
    noise, gradient, other = images()
    ids = lambda text: tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]),  # noqa: E731
                                  add_special_tokens=False)
    prompts = [ids(f"Look: {PAD} what is it?"), ids(f"{PAD} or {PAD}?"), ids("Words only, no image here."),
               ids(f"{PAD} again")]
    return prompts, [[noise], [gradient, other], None, [noise]]


@pytest.mark.parametrize("arch", ["dense", "moe"])
def test_gpu_greedy_equals_cpu_path_with_and_without_graphs(ckpts, arch):
    cpu = LLM(ckpts[arch], **ENGINE)
    prompts, imgs = cases(cpu)
    want = [o.token_ids for o in cpu.generate(prompts, GREEDY, images=imgs)]
    for eager in (False, True):
        llm = LLM(ckpts[arch], device="cuda", enforce_eager=eager, kv_cache_memory=128 << 20, **ENGINE)
        got = [o.token_ids for o in llm.generate(prompts, GREEDY, images=imgs)]
        batches = dict(llm.metrics()["batches"])
        info = f"{arch} eager={eager}: graphs {llm.engine.runner_info()}, batches {batches}"
        assert got == want, f"{info}\n  cpu {want}\n  gpu {got}"
        if eager:
            assert "graph" not in batches, info
        else:
            assert llm.engine.runner.graphs is not None and batches.get("graph", 0) > 0, info
        assert llm.engine.stats()["images_encoded"] == 3, info  # noise (twice), gradient, other: once each
        del llm
        torch.cuda.empty_cache()



def _chat_case(ckpts):
    noise = images()[0]
    pil = [{"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "image", "image": noise},
                                        {"type": "text", "text": " what is it?"}]}]
    want = LLM(ckpts["dense"], **ENGINE).chat([pil], SamplingParams(**CHAT_GREEDY))[0]
    return noise, pil, want, LLM(ckpts["dense"], device="cuda", kv_cache_memory=128 << 20, **ENGINE)


CHAT_GREEDY = dict(temperature=0, max_tokens=8, ignore_eos=True)


def test_gpu_llm_chat_with_a_pil_image_equals_the_cpu_path(ckpts):
    """The acceptance's "same on one H100" for `LLM.chat` with a PIL image part."""
    _, pil, want, llm = _chat_case(ckpts)
    assert llm.chat([pil], SamplingParams(**CHAT_GREEDY))[0].token_ids == want.token_ids


def test_gpu_openai_server_with_a_base64_image_equals_the_cpu_path(ckpts):
    """The same for the OpenAI chat API with a base64 `data:` URL, on a CUDA engine (fastapi and uvicorn
    travel in .whl/ to the GPU machine: docs/gpu.md)."""
    pytest.importorskip("fastapi")
    import httpx
    from nanoforge.serving.inprocess import InProcessClient
    from nanoforge.serving.openai_api import build_app
    from serving_fixtures import serve
    from test_qwen3_vl_api import data_url, image_chat

    noise, _, want, llm = _chat_case(ckpts)
    client = InProcessClient(llm.engine, "tiny-vl")
    try:
        with serve(build_app(client, llm.tokenizer, "tiny-vl")) as url:
            r = httpx.post(url + "/v1/chat/completions", timeout=120,
                           json={"model": "tiny-vl", "messages": image_chat(data_url(noise)), **CHAT_GREEDY})
    finally:
        client.close()
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == want.text
