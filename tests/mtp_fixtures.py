"""The DeepSeek MTP reference: transformers' own MtpModel over a tiny checkpoint of hf_fixtures,
its logits, a step-by-step check of the engine's drafts against it, and a checkpoint whose every
draft is accepted (make_bigram_deepseek)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from hf_fixtures import _quiet_transformers


def hf_mtp_model(model):
    """transformers' own MtpModel for a tiny DeepSeek checkpoint loaded with ``hf_model``.

    MtpModel.from_pretrained finds MTP keys through the main model's _keys_to_ignore_on_load_unexpected
    (only ``model.layers.61`` for DeepseekV3), so point it at our layer L first (instance attribute)."""
    from transformers.modeling_layers import MtpModel

    L = model.config.num_hidden_layers
    model._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{L}\..*"]
    with _quiet_transformers():
        mtp = MtpModel.from_pretrained(model, device_map={"": "cpu"})
    mtp.config._attn_implementation = "eager"
    mtp.config._experts_implementation = "eager"
    mtp.eval()
    return mtp


@torch.inference_mode()
def hf_mtp_logits(model, mtp, prompt: list[int], next_token: int) -> torch.Tensor:
    """[len(prompt), vocab] float32 logits of the (single) MTP layer for a prefill of ``prompt``.

    Row i predicts token i+2 from the main model's final-normed hidden state h_i and the embedding of
    token i+1 (tokens = prompt + [next_token], where next_token is the main model's prediction after the
    prompt). Positions given to the MTP layer are those of the embedded tokens (1..n), as HF does; RoPE
    is relative, so any uniform shift gives the same result."""
    from transformers.masking_utils import create_causal_mask

    ids = torch.tensor([list(prompt)], dtype=torch.long)
    h = model.model(input_ids=ids, use_cache=False).last_hidden_state  # after model.norm
    toks = torch.tensor([list(prompt[1:]) + [int(next_token)]], dtype=torch.long)
    emb = model.model.embed_tokens(toks)
    n = toks.shape[1]
    pos = torch.arange(1, n + 1)[None]
    pe = model.model.rotary_emb(emb, position_ids=pos)
    mask = create_causal_mask(config=mtp.config, inputs_embeds=emb, attention_mask=None,
                              past_key_values=None, position_ids=pos)
    x = mtp.layers[0](emb, h, position_embeddings=pe, attention_mask=mask, position_ids=pos,
                      past_key_values=None)
    return model.lm_head(x)[0].float()


def check_mtp_drafts(llm, prompts: list[list[int]], reference, tie_margin: float | None = None) -> int:
    """Run greedy requests of 6 tokens step by step; after every step, each live sequence's draft
    must be the argmax of `reference(history, next_token)[-1]` (the reference MTP head over the
    sequence's whole history). With tie_margin, drafts whose top two reference logits are that
    close are skipped. Returns how many drafts were checked."""
    from nanoforge import SamplingParams

    eng, checked = llm.engine, 0
    seqs = [eng.add_request(p, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)) for p in prompts]
    while eng.has_work():
        eng.step()
        for seq in seqs:
            d = seq.draft
            if d is None or seq.finish_reason is not None:
                continue
            want = reference(seq.token_ids[:d.position + 1], seq.token_ids[d.position + 1])[-1]
            top2 = want.topk(2).values
            if tie_margin is not None and top2[0] - top2[1] <= tie_margin:
                continue
            assert d.token == int(want.argmax()), (seq.seq_id, d.position)
            checked += 1
    return checked


def make_bigram_deepseek(src: Path, out: Path) -> Path:
    """The tiny DeepSeek-V3 checkpoint at `src` with every o_proj and down_proj zeroed, written to `out`:
    its logits depend on the last token only. Its MTP layer reads only the next token's embedding
    (eh_proj = [I | 0], enorm = 1) and shares the final norm, so it predicts exactly the token the model
    emits after that one: every MTP draft is accepted."""
    from safetensors.torch import load_file, save_file

    config = json.loads((src / "config.json").read_text())
    L, H = config["num_hidden_layers"], config["hidden_size"]
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    for k, t in tensors.items():
        if k.endswith(("o_proj.weight", "down_proj.weight")):
            tensors[k] = torch.zeros_like(t)
    tensors[f"model.layers.{L}.eh_proj.weight"] = torch.cat([torch.eye(H), torch.zeros(H, H)], dim=1)
    tensors[f"model.layers.{L}.enorm.weight"] = torch.ones(H)
    tensors[f"model.layers.{L}.shared_head.norm.weight"] = tensors["model.norm.weight"].clone()
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("model") and f.suffix in (".json", ".txt", ".model", ".jinja"):
            (out / f.name).write_bytes(f.read_bytes())
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"})
    return out
