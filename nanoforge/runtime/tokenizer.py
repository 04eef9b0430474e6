"""Text <-> token ids and chat templates, without transformers: an HF directory's tokenizer.json
(+ tokenizer_config.json), or a byte-level BPE rebuilt from a GGUF's `tokenizer.ggml.*` metadata.
Both behave like `transformers.AutoTokenizer` on the same checkpoint (tests compare them)."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.models import BPE

from ..errors import NanoForgeError
from ..models.checkpoint import Checkpoint

# tokenizer.ggml.pre -> (regex splits before byte-level, byte-level's own GPT-2 regex?, NFC?), after
# llama.cpp's llama-vocab.cpp, which names the pre-tokenizer each model was trained with.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGITS = "digits"
PRETOKENIZERS: dict[str, tuple[list[str], bool, bool]] = {
    "gpt2": ([], True, False), "default": ([], True, False),
    **{k: ([_DIGITS], True, False) for k in ("smollm", "starcoder", "refact", "codeshell")},
    **{k: ([_LLAMA3], False, False) for k in ("llama-bpe", "llama3", "smaug-bpe", "dbrx")},
    **{k: ([_QWEN2], False, True) for k in ("qwen2", "deepseek-r1-qwen")},
}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what serving needs: special ids and the chat template."""

    def __init__(self, tok: _HFTokenizer, *, where: str, chat_templates: dict[str, str],
                 special_tokens: dict[str, str], eos_token_ids: list[int], bos_token_id: int | None):
        self._tok, self.where = tok, where
        self.chat_templates = chat_templates          # name -> jinja source ("default" first)
        self.special_tokens = special_tokens          # bos_token, eos_token, ... as the template sees them
        self.eos_token_ids = eos_token_ids
        self.bos_token_id = bos_token_id
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self._compiled: dict[str, jinja2.Template] = {}

    # --- construction ------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> "Tokenizer":
        return cls._from_gguf(ckpt) if ckpt.kind == "gguf" else cls._from_hf_dir(ckpt)

    @classmethod
    def _from_hf_dir(cls, ckpt: Checkpoint) -> "Tokenizer":
        d = ckpt.path
        tj = d / "tokenizer.json"
        if not tj.is_file():
            raise NanoForgeError(f"{d}: tokenizer.json not found (a tokenizer is needed to encode text)")
        try:
            tok = _HFTokenizer.from_file(str(tj))
        except Exception as e:
            raise NanoForgeError(f"{tj}: cannot load tokenizer ({e})") from e
        tc = _json(d / "tokenizer_config.json")
        special = {k: s for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                   if (s := _content(tc.get(k))) is not None}
        templates = _templates(tc.get("chat_template"))
        if (d / "chat_template.jinja").is_file():  # a template file wins over tokenizer_config, as in HF
            templates["default"] = (d / "chat_template.jinja").read_text(encoding="utf-8")
        for p in sorted((d / "additional_chat_templates").glob("*.jinja")):
            templates[p.stem] = p.read_text(encoding="utf-8")
        eos = ckpt.generation_config().get("eos_token_id")
        if eos is None:
            eos = ckpt.config.get("eos_token_id")
        if eos is None and "eos_token" in special:
            eos = tok.token_to_id(special["eos_token"])
        bos = tok.token_to_id(special["bos_token"]) if "bos_token" in special else ckpt.config.get("bos_token_id")
        return cls(tok, where=str(d), chat_templates=templates, special_tokens=special,
                   eos_token_ids=_id_list(eos), bos_token_id=bos)

    @classmethod
    def _from_gguf(cls, ckpt: Checkpoint) -> "Tokenizer":
        """GPT-2 style byte-level BPE from tokens + merges; control tokens become special tokens.

        Like transformers, no BOS is prepended even where `tokenizer.ggml.add_bos_token` is set
        (SmolLM2's GGUF sets it, with <|im_start|> as BOS, which its original tokenizer never adds)."""
        from ..models.gguf_file import eog_token_ids

        g, name = ckpt.gguf, ckpt.path.name
        model = g.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise NanoForgeError(f"{name}: GGUF tokenizer model {model!r} is not supported "
                                 "(only 'gpt2' byte-level BPE)")
        pre = g.get("tokenizer.ggml.pre", "default")
        if pre not in PRETOKENIZERS:
            raise NanoForgeError(f"{name}: GGUF pre-tokenizer {pre!r} is not supported; known: "
                                 + ", ".join(sorted(PRETOKENIZERS)))
        tokens: list[str] = g.get("tokenizer.ggml.tokens") or []
        merges = [tuple(m.split(" ", 1)) for m in g.get("tokenizer.ggml.merges") or []]
        if not tokens or not merges:
            raise NanoForgeError(f"{name}: GGUF has no tokenizer.ggml.tokens / tokenizer.ggml.merges")
        types = g.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        splits, gpt2_regex, nfc = PRETOKENIZERS[pre]
        tok = _HFTokenizer(BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=splits == [_LLAMA3]))
        steps = [pre_tokenizers.Digits(individual_digits=True) if s == _DIGITS else
                 pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=gpt2_regex))
        tok.pre_tokenizer = pre_tokenizers.Sequence(steps) if len(steps) > 1 else steps[0]
        if nfc:
            tok.normalizer = normalizers.NFC()
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == CONTROL])
        tok.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, ty in zip(tokens, types) if ty == USER_DEFINED])
        special = {}
        for k in ("bos", "eos", "unknown", "padding"):
            i = g.get(f"tokenizer.ggml.{k}_token_id")
            if i is not None and 0 <= int(i) < len(tokens):
                special[{"unknown": "unk", "padding": "pad"}.get(k, k) + "_token"] = tokens[int(i)]
        template = g.get("tokenizer.chat_template")
        return cls(tok, where=name, chat_templates={"default": template} if template else {},
                   special_tokens=special, eos_token_ids=eog_token_ids(g), bos_token_id=ckpt.config.get("bos_token_id"))

    # --- use ---------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list | None = None, **kwargs: Any) -> str:
        """Render like transformers' `apply_chat_template(..., tokenize=False)`, in a jinja sandbox."""
        name = "tool_use" if tools is not None and "tool_use" in self.chat_templates else "default"
        source = self.chat_templates.get(name)
        if source is None:
            raise NanoForgeError(f"{self.where}: no chat template (needed to format chat messages)")
        if name not in self._compiled:
            try:
                self._compiled[name] = _ENV.from_string(source)
            except jinja2.TemplateSyntaxError as e:
                raise NanoForgeError(f"{self.where}: chat template line {e.lineno}: {e.message}") from e
        try:
            return self._compiled[name].render(
                messages=messages, tools=tools, documents=kwargs.pop("documents", None),
                add_generation_prompt=add_generation_prompt, **{**self.special_tokens, **kwargs})
        except jinja2.TemplateError as e:
            raise NanoForgeError(f"chat template of {self.where}: {e}") from e


# --- the jinja sandbox, as transformers sets it up ---------------------------------------------

class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask marker): render the body as is."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise(message: str):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


_ENV = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                     extensions=[_Generation, "jinja2.ext.loopcontrols"])
_ENV.filters["tojson"] = _tojson
_ENV.globals["raise_exception"] = _raise
_ENV.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)


# --- helpers -----------------------------------------------------------------------------------

def _json(p: Path) -> dict:
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NanoForgeError(f"{p}: invalid JSON ({e})") from e
    return data if isinstance(data, dict) else {}


def _content(tok: Any) -> str | None:
    """A special token in tokenizer_config.json: a string or an AddedToken dict."""
    return tok.get("content") if isinstance(tok, dict) else tok


def _templates(t: Any) -> dict[str, str]:
    """tokenizer_config's chat_template: one string, or a list of {name, template}."""
    if isinstance(t, str):
        return {"default": t}
    if isinstance(t, list):
        return {d["name"]: d["template"] for d in t if isinstance(d, dict) and "name" in d}
    return {}


def _id_list(v: Any) -> list[int]:
    if v is None:
        return []
    return [int(i) for i in (v if isinstance(v, (list, tuple)) else [v])]
