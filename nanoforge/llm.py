"""Offline API: `LLM(plan_dir_or_checkpoint).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence as Seq

from tqdm import tqdm

from .compiler import CompileOptions, compile_checkpoint
from .passes.quantize_kv import kv_dtype_of
from .errors import NanoForgeError
from .models.checkpoint import Checkpoint, fingerprint_mismatches, open_checkpoint
from .plan import Plan, machine_mismatches, read_plan
from .runtime.chat_images import load_offline_image, render_chat, take_images
from .runtime.engine import Engine, EngineConfig
from .runtime.sampling_params import SamplingParams
from .runtime.tokenizer import Tokenizer

if TYPE_CHECKING:
    import torch


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[dict] | None = None
    num_cached_tokens: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)


def load_plan(path: str | Path, checkpoint: str | Path | None = None,
              device: str | None = None) -> tuple[Plan, Checkpoint]:
    """Read a plan and open its checkpoint, naming every way the two (or the machine) disagree."""
    plan = read_plan(path)
    expected = plan.checkpoint.fingerprint
    if expected is None:
        raise NanoForgeError(f"plan {path} was compiled with --config-only and cannot be run; compile it "
                             "against the checkpoint")
    problems = machine_mismatches(plan, device)
    ckpt_path = Path(checkpoint or plan.checkpoint.path)
    if not ckpt_path.exists():
        raise NanoForgeError(f"plan {path} was compiled from {ckpt_path}, which does not exist; pass --checkpoint")
    ckpt = open_checkpoint(ckpt_path)
    problems += fingerprint_mismatches(expected, ckpt.fingerprint())
    if problems:
        raise NanoForgeError(f"plan {path} does not match {ckpt_path}: " + "; ".join(problems))
    return plan, ckpt


def open_model(model: str | Path | Checkpoint, checkpoint: str | Path | None = None, device: str | None = None,
               compile_options: CompileOptions | None = None) -> tuple[Plan, Checkpoint]:
    """A plan dir is loaded and checked; a checkpoint is compiled in memory (for `device`, CPU
    by default)."""
    if not isinstance(model, (str, Path)):  # a Checkpoint-like object (e.g. random weights)
        ckpt = model
    elif (Path(model) / "plan.json").exists():
        return load_plan(model, checkpoint, device)
    else:
        ckpt = open_checkpoint(model)
    opts = compile_options or CompileOptions(device=device or "cpu")
    return compile_checkpoint(ckpt.path, opts, ckpt=ckpt), ckpt


class LLM:
    def __init__(self, model: str | Path | Checkpoint, *, checkpoint: str | Path | None = None, dtype: str = "auto",
                 quantize: str = "auto", fp8_activations: str = "auto", kv_dtype: str = "auto",
                 index_kv_dtype: str = "auto",
                 block_size: int | None = None, device: str | None = None, progress: bool = True, tp: int | None = None,
                 attention_dp: int | None = None, ffn_ep: int | None = None, providers: dict[str, str] | None = None,
                 disable_passes: list[str] | None = None, **engine_options: Any):
        """`model`: a plan dir (runs on the plan's device and ranks) or a checkpoint (compiled in
        memory for `device`, CPU by default, and `tp` / `attention_dp` x `ffn_ep` ranks, with
        `providers` forced as `compile --provider OP=NAME` does, and `disable_passes` skipped as
        `compile --disable-pass NAME` skips them);
        engine_options are EngineConfig fields. A sharded plan starts one worker process per
        rank beyond the first, here (`launcher="local"`) or as Ray actors on a cluster
        (`launcher="ray"`, `ray_address=...`); `close()` (or `with LLM(...)`) stops them."""
        cfg = EngineConfig(**engine_options)
        if disable_passes and isinstance(model, (str, Path)) and (Path(model) / "plan.json").exists():
            raise NanoForgeError(f"disable_passes {', '.join(disable_passes)}: {model} is a plan, compiled already; "
                                 "compile its checkpoint with --disable-pass instead")
        layout = {"tp": tp, "attention_dp": attention_dp, "ffn_ep": ffn_ep}
        opts = CompileOptions(dtype=dtype, quantize=quantize, fp8_activations=fp8_activations, device=device or "cpu",
                              kv_dtype=kv_dtype, index_kv_dtype=index_kv_dtype, block_size=block_size,
                              **({"speculative": "mtp", "num_speculative_tokens": cfg.num_speculative_tokens}
                                 if cfg.speculative == "mtp" else {}),
                              max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
                              providers=dict(providers or {}), disable_passes=list(disable_passes or []),
                              **{k: v for k, v in layout.items() if v is not None})
        self.plan, self.checkpoint = open_model(model, checkpoint, device, opts)
        have = self.plan.parallel
        if wrong := [f"{k}={v}" for k, v in layout.items() if v is not None and v != getattr(have, k)]:
            raise NanoForgeError(f"{model} is a plan for tp={have.tp}, attention_dp={have.attention_dp}, ffn_ep="
                                 f"{have.ffn_ep}, not {', '.join(wrong)}: recompile the checkpoint with those ranks")
        if kv_dtype != "auto" and self.plan.kv_contract.dtype != kv_dtype_of(kv_dtype):
            raise NanoForgeError(f"--kv-dtype {kv_dtype}: {model} is a plan with {self.plan.kv_contract.dtype} KV; "
                                 f"recompile the checkpoint with --kv-dtype {kv_dtype}")
        if index_kv_dtype != "auto" and self.plan.kv_contract.index_dtype() != kv_dtype_of(index_kv_dtype,
                                                                                         "--index-kv-dtype"):
            raise NanoForgeError(f"--index-kv-dtype {index_kv_dtype}: {model} is a plan with "
                                 f"{self.plan.kv_contract.index_dtype() or 'no'} indexer keys; recompile the "
                                 f"checkpoint with --index-kv-dtype {index_kv_dtype}")
        cfg.device = self.plan.target.device
        try:
            self.tokenizer: Tokenizer | None = Tokenizer.from_checkpoint(self.checkpoint)
        except NanoForgeError:
            self.tokenizer = None  # token-id prompts still work; text prompts say why not
        self.engine = Engine(self.plan, self.checkpoint, self.tokenizer, cfg, progress)
        self.progress = progress

    def close(self) -> None:
        """Stop the worker ranks of a sharded plan (nothing to do for one rank); idempotent."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            Tokenizer.from_checkpoint(self.checkpoint)  # raises the reason
        return self.tokenizer  # type: ignore[return-value]

    def generate(self, prompts: str | Seq[str] | Seq[Seq[int]],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool | None = None, images: Seq[Any] | None = None) -> list[RequestOutput]:
        """`images`: per prompt, a list of PIL images or paths (or None), one per image placeholder token
        (`<|image_pad|>` for Qwen3-VL) of that prompt, in order; for a single prompt, its list."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
            images = [images] if images is not None else None
        per_prompt = list(images) if images is not None else [None] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise NanoForgeError(f"{len(per_prompt)} image lists for {len(prompts)} prompts")
        params = sampling_params or SamplingParams()
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise NanoForgeError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
        ids = [self._require_tokenizer().encode(p) if isinstance(p, str) else list(p) for p in prompts]
        seqs = [self.engine.add_request(i, p, images=im) for i, p, im in zip(ids, plist, per_prompt)]
        show = self.progress if use_tqdm is None else use_tqdm
        # counted in tokens, so one long generation moves the bar too; a sequence that stops early
        # counts the tokens it did not need as done
        with tqdm(total=sum(p.max_tokens for p in plist), desc="generate", unit="tok", disable=not show) as bar:
            while self.engine.has_work():
                self.engine.step()
                if not show:
                    continue
                done = sum(s.params.max_tokens if s.finish_reason is not None else s.num_output for s in seqs)
                bar.update(done - bar.n)
                bar.set_postfix_str(f"{sum(s.finish_reason is not None for s in seqs)}/{len(seqs)} requests",
                                    refresh=False)
        for s in seqs:
            self.engine.forget(s)
        return [RequestOutput(s.prompt_ids, s.output_ids, s.text, s.finish_reason,
                              s.logprobs if s.params.logprobs is not None else None, s.num_cached) for s in seqs]

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             tools: list | None = None, use_tqdm: bool | None = None) -> list[RequestOutput]:
        """Content parts may hold images (vision-language models): {"type": "image", "image": a PIL image,
        path or bytes}, or the OpenAI server's {"type": "image_url", "image_url": {"url": ...}} with a
        data: URL, a local path or a file:// URL; each leaves the template's image placeholder in place."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self._require_tokenizer()
        prompts, images = [], []
        for conv in convs:
            conv, imgs = take_images(conv, load_offline_image)  # type: ignore[arg-type]
            text = render_chat(tok, conv, len(imgs), add_generation_prompt=True, tools=tools)
            prompts.append(tok.encode(text, add_special_tokens=False))
            images.append(imgs or None)
        return self.generate(prompts, sampling_params, use_tqdm, images=images if any(images) else None)

    def last_logits(self, prompts: Seq[Seq[int]]) -> "torch.Tensor":
        """f32[len(prompts), vocab]: the logits after each prompt's last token (one batch)."""
        import torch

        self.engine.keep_logits = True
        try:
            seqs = [self.engine.add_request(list(p), SamplingParams(temperature=0, max_tokens=1)) for p in prompts]
            self.engine.run_until_done()
        finally:
            self.engine.keep_logits = False
        for s in seqs:
            self.engine.forget(s)
        return torch.stack([s.logits for s in seqs])

    def metrics(self) -> dict[str, Any]:
        return self.engine.metrics_summary()
