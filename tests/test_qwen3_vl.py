"""Qwen3-VL: a tiny random Qwen3VLForConditionalGeneration (saved with save_pretrained, plus its tokenizer
and image processor config) against transformers on CPU: preprocessing, the traced `encode` + `forward`,
greedy tokens and logits of image prompts batched with a text-only one, the image-embedding cache, and
prefix caching never sharing KV between image requests."""
from __future__ import annotations

import numpy as np
import pytest
import torch

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from hf_fixtures import make_tokenizer  # noqa: E402
from nanoforge.errors import NanoForgeError  # noqa: E402
from nanoforge.runtime.sampling_params import SamplingParams  # noqa: E402

PAD = "<|vision_start|><|image_pad|><|vision_end|>"
PROCESSOR = dict(patch_size=16, temporal_patch_size=2, merge_size=2, min_pixels=32 * 32, max_pixels=96 * 96,
                 image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def _pil_processor(**kw):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(**{**PROCESSOR, **kw})


def make_tiny_vl(out, moe: bool = False) -> None:
    """With `moe`, a Qwen3VLMoeForConditionalGeneration: 4 experts top-2 (fused on disk), layer 1 dense."""
    import transformers as tf

    tok = make_tokenizer(500)
    specials = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok.add_special_tokens({"additional_special_tokens": specials})
    ids = tok.convert_tokens_to_ids(specials)
    text = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                 "mrope_interleaved": True})
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, mlp_only_layers=[1])
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, temporal_patch_size=2,
                  spatial_merge_size=2, out_hidden_size=64, num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
    config_cls, model_cls = ((tf.Qwen3VLMoeConfig, tf.Qwen3VLMoeForConditionalGeneration) if moe
                             else (tf.Qwen3VLConfig, tf.Qwen3VLForConditionalGeneration))
    cfg = config_cls(text_config=text, vision_config=vision, image_token_id=ids[2], video_token_id=ids[3],
                     vision_start_token_id=ids[0], vision_end_token_id=ids[1], tie_word_embeddings=False)
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a wrong one shows
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):  # routers far from uniform, so the top-k choice matters
                p.copy_(0.5 * torch.randn_like(p))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    _pil_processor().save_pretrained(out)


def images():
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    g = np.linspace(0, 255, 90 * 40, dtype=np.float32).reshape(40, 90)
    gradient = Image.fromarray(np.stack([g, g[::-1], 255 - g], -1).astype(np.uint8))
    other = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    return noise, gradient, other


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    import transformers as tf

    from nanoforge.llm import LLM

    ckpt = tmp_path_factory.mktemp("qwen3_vl")
    make_tiny_vl(ckpt)
    hf = tf.Qwen3VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    tok = tf.AutoTokenizer.from_pretrained(ckpt)
    llm = LLM(ckpt, dtype="f32", progress=False, block_size=4)
    return ckpt, hf, tok, llm


def hf_inputs(hf, ids: list[int], imgs: list):
    """What HF's Qwen3VLProcessor would give: placeholders expanded by the image processor's grids."""
    img_id = hf.config.image_token_id
    if not imgs:
        return torch.tensor([ids]), {}
    feats = _pil_processor()(images=imgs, return_tensors="pt")
    counts = iter((feats["image_grid_thw"].prod(-1) // 4).tolist())
    out = [x for t in ids for x in ([img_id] * next(counts) if t == img_id else [t])]
    inp = torch.tensor([out])
    return inp, dict(pixel_values=feats["pixel_values"], image_grid_thw=feats["image_grid_thw"],
                     mm_token_type_ids=(inp == img_id).int())


@torch.inference_mode()
def hf_greedy(hf, ids, imgs, n=8):
    inp, extra = hf_inputs(hf, ids, imgs)
    out = hf.generate(input_ids=inp, attention_mask=torch.ones_like(inp), max_new_tokens=n, do_sample=False, **extra)
    return out[0, inp.shape[1]:].tolist()


def test_preprocessing_matches_hf():
    from nanoforge.runtime.vision_inputs import VisionSpec, preprocess

    spec = VisionSpec(16, 2, 2, 32 * 32, 96 * 96, (0.5,) * 3, (0.5,) * 3, 0, 0)
    rgba = Image.fromarray(np.random.default_rng(1).integers(0, 256, (33, 200, 4), dtype=np.uint8), "RGBA")
    gray = Image.fromarray(np.random.default_rng(2).integers(0, 256, (17, 20), dtype=np.uint8), "L")
    for img in (*images(), rgba, gray):
        ref = _pil_processor()(images=[img], return_tensors="pt")
        got = preprocess(img, spec)
        assert list(got.grid) == ref["image_grid_thw"][0].tolist()
        assert torch.equal(got.pixels, ref["pixel_values"])
        assert got.num_tokens == int(ref["image_grid_thw"][0].prod()) // 4


def test_dump_shows_encode_and_forward(vl):
    from nanoforge.ir.printer import format_module

    text = format_module(vl[3].plan.module)
    assert "func encode(%pixels: f32[P,1536], %grid: i64[I,3])" in text and "func forward(" in text
    for op in ("patch_embed", "vision_pos_embed", "vision_attention", "merge_patches", "vision_embed", "mrope",
               "deepstack_add(%"):
        assert op in text, op


def test_greedy_matches_hf_batched_with_text(vl):
    ckpt, hf, tok, llm = vl
    noise, gradient, _ = images()
    prompts = [tok.encode(f"Look: {PAD} what is it?"), tok.encode(f"Two {PAD} and {PAD} ok"),
               tok.encode("The quick brown fox jumps")]
    imgs = [[noise], [gradient, noise], []]
    ref = [hf_greedy(hf, p, i) for p, i in zip(prompts, imgs)]
    before = llm.engine.runner.vision.encoded
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                        images=[i or None for i in imgs])
    assert [o.token_ids for o in outs] == ref
    assert llm.engine.runner.vision.encoded - before == 2  # the repeated noise image ran through encode once


@torch.inference_mode()
def test_first_logits_match_hf(vl):
    ckpt, hf, tok, llm = vl
    _, gradient, other = images()  # grids 2x6 and 4x4 patches: 1x3 and 2x2 tokens, so h, w and t all differ
    ids = tok.encode(f"See {PAD} and {PAD} here")
    inp, extra = hf_inputs(hf, ids, [other, gradient])
    ref = hf(input_ids=inp, **extra).logits[0, -1]
    flat = hf(input_ids=inp, position_ids=torch.arange(inp.shape[1]).expand(3, 1, -1), **extra).logits[0, -1]
    assert (flat - ref).abs().max() > 1e-2  # plain 1-D positions would show
    llm.engine.keep_logits = True
    try:
        seq = llm.engine.add_request(ids, SamplingParams(temperature=0, max_tokens=1), images=[other, gradient])
        llm.engine.run_until_done()
    finally:
        llm.engine.keep_logits = False
    assert seq.token_ids[:seq.num_prompt] == inp[0].tolist()
    torch.testing.assert_close(seq.logits, ref, rtol=1e-4, atol=1e-4)
    text_only = hf(input_ids=inp).logits[0, -1]  # the same tokens without the image: far from it
    assert (text_only - ref).abs().max() > 1e-2


def test_different_images_never_share_kv(vl):
    ckpt, hf, tok, llm = vl
    noise, _, other = images()
    ids = tok.encode(f"{PAD} The quick brown fox jumps over the lazy dog")  # many full blocks of 4 tokens
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    a = llm.generate([ids], params, images=[[noise]])[0]
    b = llm.generate([ids], params, images=[[other]])[0]
    assert b.num_cached_tokens == 0 and a.num_cached_tokens == 0
    assert a.token_ids == hf_greedy(hf, ids, [noise], 6) and b.token_ids == hf_greedy(hf, ids, [other], 6)
    assert a.token_ids != b.token_ids  # the image changes the answer, so shared KV would show
    text = tok.encode("The quick brown fox jumps over the lazy dog again")
    llm.generate([text], params)
    assert llm.generate([text], params)[0].num_cached_tokens > 0  # text-only requests still share prefixes


def test_bad_images_are_named(vl):
    ckpt, hf, tok, llm = vl
    ids = tok.encode(f"{PAD} hi")
    with pytest.raises(NanoForgeError, match="image 0: not a readable image"):
        llm.engine.add_request(ids, SamplingParams(max_tokens=2), images=[b"not an image"])
    with pytest.raises(NanoForgeError, match="1 image placeholders .* for 2 images"):
        llm.engine.add_request(ids, SamplingParams(max_tokens=2), images=list(images()[:2]))
    with pytest.raises(NanoForgeError, match="no such file"):
        llm.engine.add_request(ids, SamplingParams(max_tokens=2), images=["/nonexistent.png"])


def test_vision_rope_tables_are_built_once_a_forward(monkeypatch):
    """Every block of a forward reads the same grid tensor: the 2-D rotary tables are built for the first
    and reused by the rest (same output as building them anew), and a new grid (a new forward) rebuilds."""
    from nanoforge.kernels import vision_ref

    calls = []
    real = vision_ref._merge_order
    monkeypatch.setattr(vision_ref, "_merge_order", lambda *a: calls.append(a) or real(*a))
    g = torch.Generator().manual_seed(5)
    grid = torch.tensor([[1, 4, 6], [2, 2, 2]])
    qkv = torch.randn(4 * 6 + 2 * 2 * 2, 3 * 2 * 8, generator=g)
    first = vision_ref.vision_attention(qkv, grid, heads=2, head_dim=8, theta=10000.0, merge=2)
    assert len(calls) == 2  # one per image
    again = vision_ref.vision_attention(qkv, grid, heads=2, head_dim=8, theta=10000.0, merge=2)
    assert len(calls) == 2 and torch.equal(first, again)
    fresh = vision_ref.vision_attention(qkv, grid.clone(), heads=2, head_dim=8, theta=10000.0, merge=2)
    assert len(calls) == 4 and torch.equal(first, fresh)
    other = vision_ref.vision_attention(qkv, grid, heads=2, head_dim=8, theta=500.0, merge=2)
    assert len(calls) == 6 and not torch.allclose(first, other)  # another theta: its own tables
