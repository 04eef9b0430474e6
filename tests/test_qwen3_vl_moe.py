"""Qwen3-VL-MoE: a tiny random Qwen3VLMoeForConditionalGeneration (save_pretrained writes its experts fused,
[E, H, 2I] and [E, I, H]) against transformers on CPU: the checkpoint reader's per-expert views, and greedy
tokens of an image prompt batched with a text-only one."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("PIL")

from test_qwen3_vl import PAD, hf_greedy, images, make_tiny_vl  # noqa: E402

from nanoforge.runtime.sampling_params import SamplingParams  # noqa: E402


@pytest.fixture(scope="module")
def vl_moe(tmp_path_factory):
    import transformers as tf

    from nanoforge.llm import LLM

    ckpt = tmp_path_factory.mktemp("qwen3_vl_moe")
    make_tiny_vl(ckpt, moe=True)
    hf = tf.Qwen3VLMoeForConditionalGeneration.from_pretrained(
        ckpt, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager").eval()
    tok = tf.AutoTokenizer.from_pretrained(ckpt)
    return ckpt, hf, tok, LLM(ckpt, dtype="f32", progress=False, block_size=4)


def _check_views(path, hf) -> None:
    from nanoforge.models.checkpoint import open_checkpoint

    c = open_checkpoint(path)
    fused = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    assert fused in c.sources and fused not in c.tensors
    assert not any("layers.1.mlp.experts" in k for k in c.tensors)  # mlp_only_layers=[1]: dense
    experts = hf.model.language_model.layers[2].mlp.experts
    prefix = "model.language_model.layers.2.mlp.experts.3."
    keys = [prefix + k for k in ("gate_proj.weight", "up_proj.weight", "down_proj.weight")]
    got = dict(c.read(keys, progress=False))
    gate, up = experts.gate_up_proj[3].detach().chunk(2, 0)  # HF holds [E, 2I, H] in memory
    down = experts.down_proj[3].detach()
    for key, want in zip(keys, (gate, up, down)):
        assert torch.equal(got[key], want), key
    sliced = dict(c.read_slices([(keys[1], (slice(8, 20), slice(None))), (keys[2], (slice(None), slice(0, 16)))],
                                progress=False))
    assert torch.equal(sliced[0], up[8:20]) and torch.equal(sliced[1], down[:, :16])


def test_fused_experts_read_as_per_expert_views(vl_moe, tmp_path):
    """Both orientations: save_pretrained's [E, 2I, H] / [E, H, I] and the hub's [E, H, 2I] / [E, I, H]."""
    import shutil

    from safetensors.torch import load_file, save_file

    ckpt, hf, _, _ = vl_moe
    _check_views(ckpt, hf)
    hub = tmp_path / "hub"
    shutil.copytree(ckpt, hub)
    tensors = load_file(hub / "model.safetensors")
    assert tensors["model.language_model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 48, 64)
    save_file({k: v.transpose(1, 2).contiguous() if ".mlp.experts." in k else v for k, v in tensors.items()},
              hub / "model.safetensors", metadata={"format": "pt"})
    _check_views(hub, hf)


def test_greedy_matches_hf_batched_with_text(vl_moe):
    ckpt, hf, tok, llm = vl_moe
    noise, gradient, _ = images()
    prompts = [tok.encode(f"Look: {PAD} what is it?"), tok.encode("The quick brown fox jumps")]
    imgs = [[noise], []]
    ref = [hf_greedy(hf, p, i) for p, i in zip(prompts, imgs)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                        images=[i or None for i in imgs])
    assert [o.token_ids for o in outs] == ref
    assert llm.plan.module.functions["encode"].nodes  # the vision tower traced as its own function
    assert sum(n.op == "moe" for n in llm.plan.module.functions["forward"].nodes) == 2
