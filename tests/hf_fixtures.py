"""Tiny random HF checkpoints + a HF-transformers reference harness (transformers==5.17.0).

Every numerical test of the engine compares against these. Four architectures, each built with
``AutoModelForCausalLM.from_config`` from a seeded RNG and written with ``save_pretrained``:

    ckpt = make_tiny_checkpoint("qwen3", tmp_dir)          # config.json, generation_config.json,
    model = hf_model(ckpt)                                  # *.safetensors, tokenizer.json, ...
    ref = hf_last_logits(model, random_prompts(1001, [5, 9], seed=0))   # [2, vocab] float32
    ids = hf_greedy(model, prompt, max_new_tokens=8)        # exactly 8 ids, eos ignored

The exact forward math of each architecture (norms, rope, attention scale, routers) is written up
in ``tests/HF_REFERENCE_NOTES.md``; this docstring is about the files.

Tiny configs (``tiny_config``)
------------------------------
========== ======= ====== ===== ======== =========== ====================================================
arch       hidden  layers heads kv heads head dim    odd things covered
========== ======= ====== ===== ======== =========== ====================================================
qwen3      128     3      6     2        80          head_dim != hidden/heads, GQA 3, vocab 1001 (tokenizer
                                                     only has 990 ids: ids 990..1000 decode to nothing),
                                                     q_norm/k_norm, untied lm_head, theta 1e6,
                                                     generation_config eos is a list [im_end, endoftext]
qwen3_moe  96      4      4     2        32          head_dim 32 != 96/4, vocab 777, 6 experts top-3,
                                                     norm_topk_prob, decoder_sparse_step=2 +
                                                     mlp_only_layers=[3] -> layer 1 is MoE, layers 0, 2, 3
                                                     dense; moe_intermediate 48 != intermediate 160
deepseek_v3 128    3      4     4 (MLA)  q/k 16+8,   q_lora 48, kv_lora 32, YaRN (factor 4, orig 128,
                                         v 16        mscale 1.0 != mscale_all_dim 0.8, so the cos/sin
                                                     "attention_factor" is != 1), rope_interleave, 16
                                                     routed experts (4 groups of 4, see below) top-3,
                                                     topk_group 2, routed_scaling 2.5, 1 shared expert,
                                                     layer 0 dense, layers 1-2 MoE, random nonzero
                                                     e_score_correction_bias, + an MTP layer 3 on disk
llama      192     3      6     2        32          SmolLM2-like: GQA 3, tied embeddings, eps 1e-5,
                                                     theta 1e5, vocab 1024 (a multiple of 64)
========== ======= ====== ===== ======== =========== ====================================================

Deviation from the brief: DeepSeek uses 16 routed experts, not 8. With 8 experts and n_group 4 every
group holds exactly 2 experts, so "sum of the top-2 scores of a group" equals "sum of the group" and a
wrong group score would go unnoticed; with 4 experts a group the top-2 rule is really exercised.

All weights are ``normal(0, initializer_range)`` as HF initialises them, with initializer_range
raised from 0.02 to 0.12: with 0.02 greedy decoding of these random models falls into 1-2 token loops
(llama repeated one token 30 times), which would hide KV-cache bugs; with 0.12 a 32-token greedy run has
~20-32 distinct tokens, logits have std ~1.3 and argmax / expert top-k gaps are far above fp32 noise.
In addition every RMSNorm weight is ``1 + 0.1 * randn`` (an engine that drops a norm weight is caught)
and DeepSeek's ``e_score_correction_bias`` is ``0.1 * randn`` (measured: ignoring the bias, ignoring the
group limit, or scoring groups by sum / max instead of top-2 sum each change the chosen experts of
25-90% of tokens). Same ``seed`` -> bit-identical tensors.

Helpers besides the brief's API: ``hf_all_logits`` (all positions), ``hf_greedy(..., return_logits=True)``,
``expected_keys`` / ``disk_shapes`` (the key table below as code), ``moe_layers``, ``to_legacy_config``,
``hf_mtp_model`` / ``hf_mtp_logits`` (DeepSeek MTP reference; in mtp_fixtures.py).

Files written (``make_tiny_checkpoint``)
----------------------------------------
``config.json`` and ``generation_config.json`` (save_pretrained), ``tokenizer.json``,
``tokenizer_config.json``, ``chat_template.jinja`` (tokenizer save_pretrained), and the weights:

* qwen3 / qwen3_moe / llama, shards=1: ``model.safetensors`` (no index).
* shards>1: ``model-0000k-of-0000N.safetensors`` + ``model.safetensors.index.json``
  (``{"metadata": {"total_parameters", "total_size"}, "weight_map": {key: file}}``); N >= 2.
* deepseek_v3 always uses the indexed layout, like the real DeepSeek-V3 repo: the main weights in
  ``model-00001..`` files and the MTP layer alone in the last file ``model-0000N-of-0000N``;
  the index lists every key, MTP keys included.

Tensors are saved in ``dtype`` (default float32) except DeepSeek's ``e_score_correction_bias``
which stays float32 (as in the real checkpoint; HF keeps it fp32 via ``_keep_in_fp32_modules_strict``).
safetensors header metadata is ``{"format": "pt"}``.

On-disk keys (verified by tests/test_hf_fixtures.py against ``expected_keys``)
-----------------------------------------------------------------------------
All linear weights are ``[out_features, in_features]`` (y = x @ W.T); no biases anywhere.
H = hidden, I = intermediate, Im = moe_intermediate, E = experts, V = vocab, L = num_hidden_layers.

Common (all archs)::

    model.embed_tokens.weight                      [V, H]
    model.norm.weight                              [H]
    lm_head.weight                                 [V, H]   (NOT written for llama: tied -> use embed)
    model.layers.{i}.input_layernorm.weight        [H]
    model.layers.{i}.post_attention_layernorm.weight [H]

llama / qwen3 / qwen3_moe attention (D = head_dim, nh, nkv)::

    model.layers.{i}.self_attn.q_proj.weight       [nh*D, H]
    model.layers.{i}.self_attn.k_proj.weight       [nkv*D, H]
    model.layers.{i}.self_attn.v_proj.weight       [nkv*D, H]
    model.layers.{i}.self_attn.o_proj.weight       [H, nh*D]
    model.layers.{i}.self_attn.q_norm.weight       [D]      (qwen3, qwen3_moe only)
    model.layers.{i}.self_attn.k_norm.weight       [D]      (qwen3, qwen3_moe only)

dense MLP (llama, qwen3 all layers; qwen3_moe dense layers; deepseek layers < first_k_dense_replace)::

    model.layers.{i}.mlp.gate_proj.weight          [I, H]
    model.layers.{i}.mlp.up_proj.weight            [I, H]
    model.layers.{i}.mlp.down_proj.weight          [H, I]

qwen3_moe MoE layers (layer i is MoE iff ``i not in mlp_only_layers and num_experts > 0 and
(i + 1) % decoder_sparse_step == 0`` -- Qwen3MoeDecoderLayer.__init__)::

    model.layers.{i}.mlp.gate.weight               [E, H]   router, no bias
    model.layers.{i}.mlp.experts.{e}.gate_proj.weight [Im, H]
    model.layers.{i}.mlp.experts.{e}.up_proj.weight   [Im, H]
    model.layers.{i}.mlp.experts.{e}.down_proj.weight [H, Im]

deepseek_v3 attention (MLA; nh heads, dn = qk_nope_head_dim, dr = qk_rope_head_dim, dv = v_head_dim,
rq = q_lora_rank, rkv = kv_lora_rank)::

    model.layers.{i}.self_attn.q_a_proj.weight         [rq, H]
    model.layers.{i}.self_attn.q_a_layernorm.weight    [rq]
    model.layers.{i}.self_attn.q_b_proj.weight         [nh*(dn+dr), rq]  per head: [nope | rope]
    model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight [rkv+dr, H]     rows: [latent rkv | k_rope dr]
    model.layers.{i}.self_attn.kv_a_layernorm.weight   [rkv]
    model.layers.{i}.self_attn.kv_b_proj.weight        [nh*(dn+dv), rkv] per head: [k_nope | v]
    model.layers.{i}.self_attn.o_proj.weight           [H, nh*dv]

deepseek_v3 MoE layers (i >= first_k_dense_replace; DeepseekV3DecoderLayer.__init__)::

    model.layers.{i}.mlp.gate.weight                   [E, H]
    model.layers.{i}.mlp.gate.e_score_correction_bias  [E]   float32, persistent buffer -> saved
    model.layers.{i}.mlp.experts.{e}.{gate,up}_proj.weight [Im, H]
    model.layers.{i}.mlp.experts.{e}.down_proj.weight  [H, Im]
    model.layers.{i}.mlp.shared_experts.{gate,up}_proj.weight [Im*n_shared, H]
    model.layers.{i}.mlp.shared_experts.down_proj.weight [H, Im*n_shared]

deepseek_v3 MTP layer, written by us (transformers does not create MTP weights in
DeepseekV3ForCausalLM; config.json has ``num_nextn_predict_layers: 1``), at index L
(= num_hidden_layers = 3), mirroring ``model.layers.61.*`` of the real DeepSeek-V3 repo::

    model.layers.{L}.embed_tokens.weight         [V, H]   copy of model.embed_tokens.weight
    model.layers.{L}.enorm.weight                [H]      RMSNorm of the token embedding
    model.layers.{L}.hnorm.weight                [H]      RMSNorm of the main model's hidden state
    model.layers.{L}.eh_proj.weight              [H, 2H]  input = cat([enorm(emb), hnorm(h)])
    model.layers.{L}.shared_head.norm.weight     [H]      final norm of the MTP layer
    model.layers.{L}.shared_head.head.weight     [V, H]   copy of lm_head.weight
    model.layers.{L}.<a full MoE decoder layer: input_layernorm, self_attn.*, post_attention_layernorm,
                       mlp.gate.*, mlp.experts.*, mlp.shared_experts.*> (fresh random weights)

HF loads the main model and reports the ``model.layers.3.*`` keys as unexpected (only
``model.layers.61.*`` is in DeepseekV3's ``_keys_to_ignore_on_load_unexpected``); ``hf_model``
silences that. ``hf_mtp_model`` (mtp_fixtures.py) loads the MTP layer through transformers' own ``MtpModel``
(modeling_layers.py), which gives a HF reference for MTP drafts (``hf_mtp_logits``).

Never on disk: rotary ``inv_freq`` / ``original_inv_freq`` (non-persistent buffers, recomputed from
config), the fused 3-D expert tensors (see quirk 1), attention masks.

transformers 5.17 quirks we hit (and that the engine's loader must know)
------------------------------------------------------------------------
1. MoE experts are fused in memory: ``mlp.experts.gate_up_proj`` [E, 2*Im, H] (gate rows first, then
   up rows: ``gate, up = linear(x, W[e]).chunk(2, -1)``) and ``mlp.experts.down_proj`` [E, H, Im].
   ``save_pretrained`` reverts the conversion (``conversion_mapping.py``, pattern "qwen2_moe", used for
   qwen3_moe and deepseek_v3) and writes the per-expert layout
   ``mlp.experts.{e}.{gate,up,down}_proj.weight``; loading re-fuses them. So disk = classic layout.
2. Config spelling: 5.x writes ``rope_parameters: {rope_type, rope_theta, ...}`` (no top-level
   ``rope_theta`` / ``rope_scaling``). Hub checkpoints use the legacy spelling (``rope_theta`` +
   ``rope_scaling: {"type": "yarn", ...}`` or null); HF 5.17 reads both (``standardize_rope_params``).
   ``make_tiny_checkpoint(..., config_style="legacy")`` writes the legacy spelling so the engine's
   config reader can be tested on both. YaRN keys: ``factor``, ``original_max_position_embeddings``,
   ``mscale``, ``mscale_all_dim``, ``beta_fast``, ``beta_slow`` (+ optional ``attention_factor``,
   ``truncate`` (default True)).
3. Qwen3MoeConfig writes the expert count as ``num_local_experts`` (its attribute_map maps
   ``num_experts`` -> ``num_local_experts``); hub Qwen3-MoE configs say ``num_experts``. Read both.
   Qwen3MoeConfig has no ``head_dim`` field; it is kept as an extra attribute (attention uses
   ``getattr(config, "head_dim", hidden // heads)``) and is written to config.json.
4. DeepseekV3Config.__post_init__ sets ``head_dim = qk_rope_head_dim`` (it is the *rope* dim, used by
   the rotary init) and ``qk_head_dim = nope + rope``; both are written to config.json. Do not read
   ``head_dim`` as the attention head size for DeepSeek. ``num_mtp_layers`` is written as
   ``num_nextn_predict_layers`` (default 1).
5. ``e_score_correction_bias`` is an ``nn.Buffer`` (persistent) initialised to zeros by
   ``_init_weights``; it IS saved; it is kept fp32 even in a bf16 model.
6. Defaults on CPU are ``attn_implementation="sdpa"`` and ``experts_implementation="grouped_mm"``;
   ``hf_model`` forces ``"eager"`` for both so the reference is the plain code in modeling_*.py.
7. ``tie_word_embeddings=True`` (llama): ``lm_head.weight`` is not written to disk at all.
8. Tokenizer: ``PreTrainedTokenizerFast.save_pretrained`` in 5.17 writes the chat template to
   ``chat_template.jinja`` (not into tokenizer_config.json) and ``tokenizer_class:
   "TokenizersBackend"``; ``apply_chat_template(tokenize=True)`` returns a BatchEncoding (dict).
9. Rotary: ``rope_interleave=True`` (DeepSeek) means the rope dims of q/k are rotated as adjacent
   pairs (x0,x1),(x2,x3).. by frequency j = pair index, and the OUTPUT is de-interleaved:
   ``cat([x_even*cos - x_odd*sin, x_odd*cos + x_even*sin])`` (apply_rotary_pos_emb_interleave). The
   k_rope stored in HF's cache is that de-interleaved (neox-layout) tensor. Qwen3/Llama use
   rotate_half (neox) on the whole head_dim. Details in HF_REFERENCE_NOTES.md.
10. HF's MTP (``MtpModel`` + ``MTPCandidateGenerator``) feeds the MTP layer the main model's
    ``last_hidden_state`` *after* the final ``model.norm`` (``output_hidden_states=[L-1]`` is tied to
    last_hidden_state by ``capture_outputs``), renames ``shared_head.norm`` -> ``post_norm``, and
    ignores ``shared_head.head`` / ``embed_tokens`` of the MTP layer (uses the main model's).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
from pathlib import Path

import torch

ARCHS = ["qwen3", "qwen3_moe", "deepseek_v3", "llama"]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 in every tokenizer
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 0, 1, 2
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# tokenizer vocab per arch (<= config vocab; qwen3 deliberately smaller, like real Qwen checkpoints)
TOKENIZER_VOCAB = {"qwen3": 990, "qwen3_moe": 777, "deepseek_v3": 1000, "llama": 1024}

INIT_STD = 0.12
NORM_WEIGHT_STD = 0.1
E_BIAS_STD = 0.1


# --------------------------------------------------------------------------------------------- configs
def tiny_config(arch: str):
    """The tiny transformers config of ``arch`` (one of ARCHS)."""
    import transformers as tf

    common = dict(
        bos_token_id=ENDOFTEXT_ID,
        eos_token_id=IM_END_ID,
        pad_token_id=None,  # a pad id would zero that embedding row (nn.Embedding padding_idx)
        initializer_range=INIT_STD,
        hidden_act="silu",
        attention_bias=False,
        attention_dropout=0.0,
    )
    if arch == "qwen3":
        return tf.Qwen3Config(
            vocab_size=1001, hidden_size=128, intermediate_size=288, num_hidden_layers=3,
            num_attention_heads=6, num_key_value_heads=2, head_dim=80,
            max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, **common,
        )
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            vocab_size=777, hidden_size=96, intermediate_size=160, moe_intermediate_size=48,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            num_experts=6, num_experts_per_tok=3, norm_topk_prob=True,
            decoder_sparse_step=2, mlp_only_layers=[3],
            max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, **common,
        )
    if arch == "deepseek_v3":
        return tf.DeepseekV3Config(
            vocab_size=1000, hidden_size=128, intermediate_size=192, moe_intermediate_size=48,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
            q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2,
            routed_scaling_factor=2.5, n_shared_experts=1, first_k_dense_replace=1,
            norm_topk_prob=True, rope_interleave=True, num_nextn_predict_layers=1,
            max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                "original_max_position_embeddings": 128, "mscale": 1.0, "mscale_all_dim": 0.8,
                "beta_fast": 32, "beta_slow": 1,
            },
            **common,
        )
    if arch == "llama":
        return tf.LlamaConfig(
            vocab_size=1024, hidden_size=192, intermediate_size=320, num_hidden_layers=3,
            num_attention_heads=6, num_key_value_heads=2, head_dim=32,
            max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 100_000.0},
            mlp_bias=False, **common,
        )
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def moe_layers(arch: str, config=None) -> list[int]:
    """Indices of the decoder layers HF builds as MoE (the rule of each *DecoderLayer.__init__)."""
    c = config if config is not None else tiny_config(arch)
    n = c.num_hidden_layers
    if arch == "qwen3_moe":
        return [i for i in range(n)
                if i not in c.mlp_only_layers and c.num_experts > 0 and (i + 1) % c.decoder_sparse_step == 0]
    if arch == "deepseek_v3":
        return [i for i in range(n) if i >= c.first_k_dense_replace]
    return []


# ------------------------------------------------------------------------------------------ tokenizer
_CORPUS_TEXT = """\
The quick brown fox jumps over the lazy dog. A compiler turns a program into another program;
an inference engine turns a checkpoint into tokens. Hello, world! How are you today? I am fine,
thank you. The weather is nice and the sky is blue. Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2025.
def add(a, b):
    return a + b

for i in range(10):
    print(i * i)

{"role": "user", "content": "What is the capital of France?"} The capital of France is Paris.
Attention is all you need. Mixture of experts routes each token to a few experts.
Rotary position embeddings rotate pairs of dimensions by an angle that grows with position.
"""
_SYLLABLES = ("ka lo mi ne ta ru so vi de pa ri go ze lu ma xo qui ber tan sil nor gra fen dul "
              "pro ton ex an ing ed er ly tion ment able ous ive ful less ness ship ward").split()


def _corpus() -> list[str]:
    rng = random.Random(1234)
    words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(600)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) + rng.choice([".", "!", "?", ","]) for _ in range(400)]
    return [_CORPUS_TEXT] * 4 + lines


def make_tokenizer(vocab_size: int):
    """A byte-level BPE (GPT-2 style) trained on the built-in corpus; special tokens get ids 0, 1, 2
    (<|endoftext|>, <|im_start|>, <|im_end|>), then 256 byte tokens, then merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=1,
    )
    tok.train_from_iterator(_corpus(), trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer trained to {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", unk_token=None, model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# ------------------------------------------------------------------------------------------ checkpoints
def _randomize_extras(model, seed: int) -> None:
    """RMSNorm weights -> 1 + 0.1*randn, e_score_correction_bias -> E_BIAS_STD*randn (seeded, in place)."""
    g = torch.Generator().manual_seed(seed + 1_000_003)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if type(mod).__name__.endswith("RMSNorm"):
                w = mod.weight
                w.copy_(1.0 + NORM_WEIGHT_STD * torch.randn(w.shape, generator=g, dtype=torch.float32))
            bias = getattr(mod, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_(E_BIAS_STD * torch.randn(bias.shape, generator=g, dtype=torch.float32))


def _mtp_tensors(config, main_sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The DeepSeek-V3 style MTP layer ``model.layers.{L}.*`` (see module docstring).

    The decoder block copies the key names and shapes of the last (MoE) main layer and gets fresh
    random weights (normal(0, initializer_range); norms 1 + 0.1*randn; e-bias E_BIAS_STD*randn)."""
    L = config.num_hidden_layers
    H = config.hidden_size
    g = torch.Generator().manual_seed(seed + 2_000_003)
    std = config.initializer_range

    def rand_like(name: str, shape) -> torch.Tensor:
        if name.endswith("e_score_correction_bias"):
            return E_BIAS_STD * torch.randn(shape, generator=g)
        if len(shape) == 1:  # every 1-D weight here is an RMSNorm weight
            return 1.0 + NORM_WEIGHT_STD * torch.randn(shape, generator=g)
        return std * torch.randn(shape, generator=g)

    src = f"model.layers.{L - 1}."
    assert L - 1 >= config.first_k_dense_replace, "the MTP block copies the layout of a MoE layer"
    out: dict[str, torch.Tensor] = {}
    for k in sorted(main_sd):
        if k.startswith(src):
            suffix = k[len(src):]
            out[f"model.layers.{L}.{suffix}"] = rand_like(suffix, tuple(main_sd[k].shape))
    p = f"model.layers.{L}."
    out[p + "embed_tokens.weight"] = main_sd["model.embed_tokens.weight"].clone()
    out[p + "enorm.weight"] = rand_like("enorm.weight", (H,))
    out[p + "hnorm.weight"] = rand_like("hnorm.weight", (H,))
    out[p + "eh_proj.weight"] = rand_like("eh_proj.weight", (H, 2 * H))
    out[p + "shared_head.norm.weight"] = rand_like("shared_head.norm.weight", (H,))
    out[p + "shared_head.head.weight"] = main_sd["lm_head.weight"].clone()
    return out


def _read_all(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for f in sorted(Path(ckpt_dir).glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def _add_mtp_files(out_dir: Path, config, seed: int, dtype) -> None:
    """Rewrite a DeepSeek save into the indexed layout with the MTP layer in its own last file."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    index_path = out_dir / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        old_files = sorted(set(index["weight_map"].values()))
    else:
        old_files = ["model.safetensors"]
    main_sd = _read_all(out_dir)
    mtp = _mtp_tensors(config, main_sd, seed)
    mtp = {k: (v.to(torch.float32) if k.endswith("e_score_correction_bias") else v.to(dtype)).contiguous()
           for k, v in mtp.items()}

    n = len(old_files) + 1
    new_names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map: dict[str, str] = {}
    total_size = 0
    tmp_names = []
    for old, new in zip(old_files, new_names[:-1]):
        with safe_open(str(out_dir / old), "pt") as f:
            for k in f.keys():
                weight_map[k] = new
        tmp = out_dir / (new + ".tmp")
        os.replace(out_dir / old, tmp)
        tmp_names.append((tmp, out_dir / new))
    for tmp, final in tmp_names:
        os.replace(tmp, final)
    save_file(mtp, str(out_dir / new_names[-1]), metadata={"format": "pt"})
    for k in mtp:
        weight_map[k] = new_names[-1]
    for v in list(main_sd.values()) + list(mtp.values()):
        total_size += v.numel() * v.element_size()
    n_params = sum(v.numel() for v in main_sd.values()) + sum(v.numel() for v in mtp.values())
    index = {"metadata": {"total_parameters": n_params, "total_size": total_size},
             "weight_map": dict(sorted(weight_map.items()))}
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def to_legacy_config(cfg: dict) -> dict:
    """Rewrite a 5.x config.json dict into the spelling of hub checkpoints (rope_theta + rope_scaling,
    num_experts, torch_dtype; DeepSeek without the derived head_dim / qk_head_dim)."""
    cfg = dict(cfg)
    rp = cfg.pop("rope_parameters", None)
    if rp is not None:
        rp = dict(rp)
        cfg["rope_theta"] = rp.pop("rope_theta")
        rtype = rp.pop("rope_type", "default")
        cfg["rope_scaling"] = None if rtype == "default" else {"type": rtype, **rp}
    if cfg.get("model_type") == "qwen3_moe" and "num_local_experts" in cfg:
        cfg["num_experts"] = cfg.pop("num_local_experts")
    if cfg.get("model_type") == "deepseek_v3":
        cfg.pop("head_dim", None)
        cfg.pop("qk_head_dim", None)
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    return dict(sorted(cfg.items()))


def make_tiny_checkpoint(arch: str, out_dir: Path, seed: int = 0, dtype=torch.float32, shards: int = 1,
                         config_style: str = "hf5") -> Path:
    """Build the tiny random ``arch`` model (seeded), save it with ``save_pretrained`` + tokenizer +
    generation_config into ``out_dir`` and return ``out_dir``.

    shards > 1 -> ``max_shard_size`` is chosen so that save_pretrained writes >= 2 shard files.
    Existing *.safetensors / index files in out_dir are deleted first.
    config_style "legacy" rewrites config.json with hub-style keys (see ``to_legacy_config``)."""
    import transformers as tf

    if config_style not in ("hf5", "legacy"):
        raise ValueError(f"config_style must be 'hf5' or 'legacy', got {config_style!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob("*.safetensors"), *out_dir.glob("*.safetensors.index.json")]:
        stale.unlink()  # a previous checkpoint in out_dir must not leak into this one
    config = tiny_config(arch)
    torch.manual_seed(seed)
    with _quiet_transformers():
        model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    _randomize_extras(model, seed)
    if dtype != torch.float32:
        model = model.to(dtype)
        for mod in model.modules():  # keep the router bias fp32, as HF does on load
            b = getattr(mod, "e_score_correction_bias", None)
            if isinstance(b, torch.Tensor):
                mod.e_score_correction_bias = b.to(torch.float32)

    eos = [IM_END_ID, ENDOFTEXT_ID] if arch == "qwen3" else IM_END_ID
    model.generation_config = tf.GenerationConfig(
        bos_token_id=ENDOFTEXT_ID, eos_token_id=eos, pad_token_id=ENDOFTEXT_ID,
    )
    save_kw = {}
    if shards > 1:
        total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        save_kw["max_shard_size"] = max(1, math.ceil(total / shards * 0.9))
    with _quiet_transformers():
        model.save_pretrained(out_dir, safe_serialization=True, **save_kw)
    if arch == "deepseek_v3":
        _add_mtp_files(out_dir, config, seed, dtype)
    make_tokenizer(TOKENIZER_VOCAB[arch]).save_pretrained(out_dir)
    if config_style == "legacy":
        p = out_dir / "config.json"
        p.write_text(json.dumps(to_legacy_config(json.loads(p.read_text())), indent=2) + "\n")
    return out_dir


def weight_files(ckpt_dir: Path) -> list[Path]:
    return sorted(Path(ckpt_dir).glob("*.safetensors"))


def disk_shapes(ckpt_dir: Path) -> dict[str, tuple[int, ...]]:
    """{key: shape} of every tensor in every *.safetensors file of ckpt_dir."""
    from safetensors import safe_open

    out: dict[str, tuple[int, ...]] = {}
    for f in weight_files(ckpt_dir):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                if k in out:
                    raise AssertionError(f"{k} in two files")
                out[k] = tuple(h.get_slice(k).get_shape())
    return out


def expected_keys(arch: str, config=None) -> dict[str, tuple[int, ...]]:
    """The documented on-disk {key: shape} table of ``arch`` (module docstring), computed from the
    config. tests/test_hf_fixtures.py checks it equals what make_tiny_checkpoint wrote."""
    c = config if config is not None else tiny_config(arch)
    H, V, L = c.hidden_size, c.vocab_size, c.num_hidden_layers
    moe = set(moe_layers(arch, c))
    k: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not c.tie_word_embeddings:
        k["lm_head.weight"] = (V, H)

    def dense(p, inter):
        k[p + "mlp.gate_proj.weight"] = (inter, H)
        k[p + "mlp.up_proj.weight"] = (inter, H)
        k[p + "mlp.down_proj.weight"] = (H, inter)

    def layer(i):
        p = f"model.layers.{i}."
        k[p + "input_layernorm.weight"] = (H,)
        k[p + "post_attention_layernorm.weight"] = (H,)
        if arch == "deepseek_v3":
            nh, dn, dr, dv = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
            a = p + "self_attn."
            k[a + "q_a_proj.weight"] = (c.q_lora_rank, H)
            k[a + "q_a_layernorm.weight"] = (c.q_lora_rank,)
            k[a + "q_b_proj.weight"] = (nh * (dn + dr), c.q_lora_rank)
            k[a + "kv_a_proj_with_mqa.weight"] = (c.kv_lora_rank + dr, H)
            k[a + "kv_a_layernorm.weight"] = (c.kv_lora_rank,)
            k[a + "kv_b_proj.weight"] = (nh * (dn + dv), c.kv_lora_rank)
            k[a + "o_proj.weight"] = (H, nh * dv)
        else:
            D, nh, nkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
            a = p + "self_attn."
            k[a + "q_proj.weight"] = (nh * D, H)
            k[a + "k_proj.weight"] = (nkv * D, H)
            k[a + "v_proj.weight"] = (nkv * D, H)
            k[a + "o_proj.weight"] = (H, nh * D)
            if arch in ("qwen3", "qwen3_moe"):
                k[a + "q_norm.weight"] = (D,)
                k[a + "k_norm.weight"] = (D,)
        is_moe = i in moe or (arch == "deepseek_v3" and i >= L)  # the MTP layer is MoE
        if not is_moe:
            dense(p, c.intermediate_size)
            return
        E, Im = (c.num_experts, c.moe_intermediate_size) if arch == "qwen3_moe" else (c.n_routed_experts, c.moe_intermediate_size)
        k[p + "mlp.gate.weight"] = (E, H)
        for e in range(E):
            q = f"{p}mlp.experts.{e}."
            k[q + "gate_proj.weight"] = (Im, H)
            k[q + "up_proj.weight"] = (Im, H)
            k[q + "down_proj.weight"] = (H, Im)
        if arch == "deepseek_v3":
            k[p + "mlp.gate.e_score_correction_bias"] = (E,)
            S = Im * c.n_shared_experts
            k[p + "mlp.shared_experts.gate_proj.weight"] = (S, H)
            k[p + "mlp.shared_experts.up_proj.weight"] = (S, H)
            k[p + "mlp.shared_experts.down_proj.weight"] = (H, S)

    for i in range(L):
        layer(i)
    if arch == "deepseek_v3":
        for j in range(c.num_nextn_predict_layers):
            layer(L + j)
            p = f"model.layers.{L + j}."
            k[p + "embed_tokens.weight"] = (V, H)
            k[p + "enorm.weight"] = (H,)
            k[p + "hnorm.weight"] = (H,)
            k[p + "eh_proj.weight"] = (H, 2 * H)
            k[p + "shared_head.norm.weight"] = (H,)
            k[p + "shared_head.head.weight"] = (V, H)
    return k


# ------------------------------------------------------------------------------------------ HF reference
@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' info/warnings and progress bars (load reports, unexpected MTP keys)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def hf_model(ckpt_dir: Path, dtype=torch.float32):
    """AutoModelForCausalLM.from_pretrained in eval mode with eager attention and eager experts."""
    import transformers as tf

    cfg = tf.AutoConfig.from_pretrained(ckpt_dir)
    kw = {}
    if getattr(cfg, "model_type", "") in ("qwen3_moe", "deepseek_v3"):
        kw["experts_implementation"] = "eager"
    with _quiet_transformers():
        model = tf.AutoModelForCausalLM.from_pretrained(
            ckpt_dir, dtype=dtype, attn_implementation="eager", **kw
        )
    model.eval()
    return model


@torch.inference_mode()
def hf_all_logits(model, prompt: list[int]) -> torch.Tensor:
    """[len(prompt), vocab] float32 logits of every position of one prompt (no padding, no cache)."""
    ids = torch.tensor([list(prompt)], dtype=torch.long)
    return model(input_ids=ids, use_cache=False).logits[0].float()


@torch.inference_mode()
def hf_last_logits(model, prompts: list[list[int]]) -> torch.Tensor:
    """[B, vocab] float32 logits of the last token of each prompt; each prompt runs on its own."""
    return torch.stack([hf_all_logits(model, p)[-1] for p in prompts])


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], max_new_tokens: int, return_logits: bool = False):
    """Greedy decoding with HF's KV cache (DynamicCache): prefill the prompt, then one token per
    forward. Never stops early (eos ignored): returns exactly ``max_new_tokens`` generated ids (and,
    with return_logits, the [max_new_tokens, vocab] float32 logits each id was the argmax of)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids = torch.tensor([list(prompt)], dtype=torch.long)
    out_ids: list[int] = []
    logits: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        last = out.logits[0, -1].float()
        nxt = int(torch.argmax(last))
        out_ids.append(nxt)
        logits.append(last)
        ids = torch.tensor([[nxt]], dtype=torch.long)
    if return_logits:
        return out_ids, (torch.stack(logits) if logits else torch.empty(0, model.config.vocab_size))
    return out_ids


def random_prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    """Prompts of the given lengths with ids uniform in [0, vocab) (seeded, torch.Generator)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
