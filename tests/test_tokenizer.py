"""Tokenizer and chat template against transformers' AutoTokenizer: a real GGUF (SmolLM2, vocab
rebuilt from tokenizer.ggml.* metadata) and a small HF directory saved by transformers itself."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from nanoforge.errors import NanoForgeError
from nanoforge.models.checkpoint import open_checkpoint
from nanoforge.runtime.tokenizer import Tokenizer

STRINGS = [
    "Hello world", "12345", " 123 4567.89 and 3.14159", "  leading   spaces\t\ttabs\n\n\nnewlines  ",
    "def f(x):\n    return x**2  # square\n", "café naïve 日本語 中文 emoji 😀👍🏽",
    "<|im_start|>user\nhi<|im_end|>\n", "I'm you'll they'd WE'RE", "a<|endoftext|>b", "   ", "",
    "https://example.com/a?b=c&d=e#frag", "\u200b zero-width\r\n CRLF", "ÀÉÎ ǅ ﬁ Ωmega Привет мир",
    "<|im_start|><|im_end|><|im_start|>", '{"key": [1, 2, {"x": null}]}',
]
UNICODE_DIGITS = "x² ³ ١٢٣ Ⅻ ½"  # numerics outside 0-9 (Unicode category N)
CHAT = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4, of course."}]


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    from gguf_fixtures import hf_gguf_tokenizer

    hf = hf_gguf_tokenizer(smollm2_gguf)
    ours = Tokenizer.from_checkpoint(open_checkpoint(smollm2_gguf))
    return ours, hf


@pytest.mark.parametrize("add_special", [True, False])
def test_gguf_encode_matches_hf(smol, add_special):
    ours, hf = smol
    for s in STRINGS:
        assert ours.encode(s, add_special_tokens=add_special) == hf.encode(s, add_special_tokens=add_special), s
    assert ours.encode("<|im_start|>")[0] == 1  # special tokens in text are parsed, as in HF


def test_gguf_unicode_digits_split_like_the_original(smol):
    """SmolLM2's own tokenizer.json (and llama.cpp's 'smollm' pre-tokenizer) split every Unicode
    numeric char before byte-level BPE; transformers' GGUF converter drops that step, so the reference
    here is HF's converted tokenizer with the Digits step put back."""
    from tokenizers import Tokenizer as Raw
    from tokenizers import pre_tokenizers

    ours, hf = smol
    raw = Raw.from_str(hf.backend_tokenizer.to_str())
    raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), raw.pre_tokenizer])
    assert ours.encode(UNICODE_DIGITS) == raw.encode(UNICODE_DIGITS).ids


def test_gguf_decode(smol):
    ours, hf = smol
    for s in STRINGS + [UNICODE_DIGITS]:
        ids = ours.encode(s)
        assert ours.decode(ids, skip_special_tokens=False) == s
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), s


def test_gguf_chat_template_matches_hf(smol):
    ours, hf = smol
    for msgs in (CHAT, [{"role": "system", "content": "Be brief."}] + CHAT):
        for gen in (True, False):
            assert ours.apply_chat_template(msgs, add_generation_prompt=gen) == \
                hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert ours.apply_chat_template(CHAT).endswith("<|im_start|>assistant\n")


def test_gguf_special_ids(smol):
    ours, hf = smol
    assert ours.eos_token_ids[0] == 2 == hf.convert_tokens_to_ids("<|im_end|>")
    assert set(ours.eos_token_ids) == {hf.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    assert ours.bos_token_id == 1 and ours.vocab_size == len(hf) == 49152


# --- an HF directory written by transformers ----------------------------------------------------

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('bad role: ' + m['role']) }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if tools %}\n  {% for t in tools %}tool: {{ t | tojson }}\n  {% endfor %}{% endif %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SENTENCES = ["hello world, the quick brown fox", "jumps over the lazy dog 12345", "café ünïcödé 日本",
             "def main():\n    print('hi')\n"] * 4


def _write_hf_dir(d: Path) -> Path:
    from tokenizers import Tokenizer as Raw
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Raw(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(SENTENCES, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", raw.token_to_id("<s>"))])
    PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                            chat_template=TEMPLATE).save_pretrained(str(d))
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "eos_token_id": 3}))
    return d


@pytest.fixture
def hf_dir(tmp_path) -> Path:
    return _write_hf_dir(tmp_path / "tok")


def _pair(d: Path):
    from transformers import AutoTokenizer
    return Tokenizer.from_checkpoint(open_checkpoint(d, config_only=True)), AutoTokenizer.from_pretrained(str(d))


def test_hf_dir_matches_autotokenizer(hf_dir):
    ours, hf = _pair(hf_dir)
    for s in STRINGS + SENTENCES[:4]:
        for add in (True, False):
            assert ours.encode(s, add_special_tokens=add) == hf.encode(s, add_special_tokens=add), (s, add)
        ids = ours.encode(s)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)
    assert ours.encode("hi")[0] == ours.bos_token_id == hf.bos_token_id
    assert ours.vocab_size == len(hf)


def test_hf_dir_chat_template(hf_dir):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Météo <b>&</b>",
                                               "parameters": {"type": "object", "properties": {}}}}]
    variants = {"jinja file": None, "tokenizer_config": TEMPLATE.replace("<|im_start|>assistant", "<|im_start|>bot")}
    for where, tc_template in variants.items():
        if tc_template is not None:  # move the template into tokenizer_config.json
            (hf_dir / "chat_template.jinja").unlink()
            tc = json.loads((hf_dir / "tokenizer_config.json").read_text())
            (hf_dir / "tokenizer_config.json").write_text(json.dumps({**tc, "chat_template": tc_template}))
        ours, hf = _pair(hf_dir)
        for kw in ({}, {"tools": tools}, {"add_generation_prompt": False}):
            expect = hf.apply_chat_template(CHAT, tokenize=False, **{"add_generation_prompt": True, **kw})
            assert ours.apply_chat_template(CHAT, **kw) == expect, (where, kw)
        assert ("<|im_start|>bot" in ours.apply_chat_template(CHAT)) == (tc_template is not None)
    assert "Météo <b>&</b>" in ours.apply_chat_template(CHAT, tools=tools)  # HF's tojson: no escaping


def test_hf_dir_template_errors_are_one_line(hf_dir):
    ours, _ = _pair(hf_dir)
    with pytest.raises(NanoForgeError, match="bad role: robot"):
        ours.apply_chat_template([{"role": "robot", "content": "x"}])
    ours.chat_templates["default"] = "{{ ''.__class__.__mro__[1].__subclasses__() }}"  # sandbox
    ours._compiled.clear()
    with pytest.raises(NanoForgeError):
        ours.apply_chat_template(CHAT)
    ours.chat_templates.clear()
    with pytest.raises(NanoForgeError, match="no chat template"):
        ours.apply_chat_template(CHAT)


def test_hf_dir_eos_precedence(hf_dir):
    ck = open_checkpoint(hf_dir, config_only=True)
    assert Tokenizer.from_checkpoint(ck).eos_token_ids == [3]  # config.json
    (hf_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 2]}))
    assert Tokenizer.from_checkpoint(ck).eos_token_ids == [3, 2]  # generation_config.json wins
    (hf_dir / "generation_config.json").unlink()
    (hf_dir / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    tok = Tokenizer.from_checkpoint(open_checkpoint(hf_dir, config_only=True))
    assert tok.eos_token_ids == [tok.token_to_id("</s>")] == [1]  # tokenizer_config's eos_token


def test_hf_dir_without_tokenizer_json(hf_dir):
    (hf_dir / "tokenizer.json").unlink()
    ck = open_checkpoint(hf_dir, config_only=True)  # fine without a tokenizer ...
    with pytest.raises(NanoForgeError, match="tokenizer.json"):  # ... until one is asked for
        Tokenizer.from_checkpoint(ck)
