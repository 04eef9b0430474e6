"""Prompt-lookup speculative decoding on SmolLM2-135M-Instruct (real weights, GGUF Q4_1 dequantized),
on a workload whose answer repeats its prompt: "repeat this paragraph with one word changed", over
paragraphs of the repository's own docs. Output tok/s with and without `--speculative ngram` in the
same run, at batch 1 and 16, greedy, and whether the texts are identical (they must be).

    python bench/speculative.py --device cpu --out bench/results/speculative
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.kv_fp8_accuracy import smollm2_gguf, write_result  # noqa: E402
from nanoforge import LLM, SamplingParams  # noqa: E402
from nanoforge.models.random_checkpoint import preset_checkpoint  # noqa: E402
from nanoforge.tools.bench_offline import machine_info  # noqa: E402


def paragraphs(n: int) -> list[str]:
    """n prose paragraphs of 30..120 words from the repository's docs (code marks dropped)."""
    text = (ROOT / "docs" / "design.md").read_text() + "\n\n" + (ROOT / "README.md").read_text()
    out = []
    for block in re.split(r"\n\s*\n", text):
        block = " ".join(line.strip("-* ") for line in block.splitlines()).replace("`", "")
        words = block.split()
        if 30 <= len(words) <= 120 and "|" not in block and "│" not in block and not block.startswith("#"):
            out.append(block)
    return out[:n]


def requests(llm: LLM, n: int) -> list[list[int]]:
    tok = llm.tokenizer
    out = []
    for para in paragraphs(n):
        word = max(para.split(), key=len).strip(".,;:()")
        msg = [{"role": "user", "content": f"Repeat the following paragraph exactly, but replace the word "
                                           f"\"{word}\" with \"thing\":\n\n{para}"}]
        out.append(tok.encode(tok.apply_chat_template(msg, add_generation_prompt=True), add_special_tokens=False))
    return out


def repeating_prompts(vocab: int, n: int, seed: int = 0) -> list[list[int]]:
    """Token prompts for a random-weight preset (no tokenizer): a random 40..100-token passage said
    three times, so the model's continuation can echo it as the chat workload's answers do."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        passage = torch.randint(0, vocab, (int(torch.randint(40, 101, (1,), generator=g)),), generator=g).tolist()
        out.append(passage * 3)
    return out


def timed(llm: LLM, prompts: list[list[int]], batch: int, max_tokens: int) -> tuple[float, list[list[int]], int]:
    sp = SamplingParams(temperature=0, max_tokens=max_tokens)
    llm.engine.reset_prefix_cache()
    start, outs = time.perf_counter(), []
    for i in range(0, len(prompts), batch):
        outs += [o.token_ids for o in llm.generate(prompts[i:i + batch], sp, use_tqdm=False)]
    if llm.engine.runner.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, outs, sum(map(len, outs))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--model-preset", default=None, help="random weights of a preset instead of SmolLM2's real "
                    "ones (where the GGUF cannot travel): acceptance is then whatever the random model repeats")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--k", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--out", default="bench/results/speculative")
    a = ap.parse_args()
    model = preset_checkpoint(a.model_preset, device=a.device) if a.model_preset else smollm2_gguf(a.gguf)
    opts = dict(device=a.device, progress=False, max_num_seqs=max(a.batches))
    if a.device == "cuda":  # the baseline engine and one speculating engine share the card
        opts["kv_cache_memory"] = 4 << 30
    base = LLM(model, **opts)
    prompts = repeating_prompts(base.plan.model.vocab_size, a.prompts) if a.model_preset else requests(base, a.prompts)
    timed(base, prompts[:2], 2, 8)  # warm-up (kernels, graphs)
    rows = []
    for b in a.batches:
        t0, ref, n0 = timed(base, prompts, b, a.max_tokens)
        row = {"batch": b, "baseline": {"seconds": t0, "output_tokens": n0, "tok_s": n0 / t0,
                                        "batches": base.metrics()["batches"]}}
        for k in a.k:
            spec = LLM(model, speculative="ngram", num_speculative_tokens=k, **opts)
            timed(spec, prompts[:2], 2, 8)
            t1, got, n1 = timed(spec, prompts, b, a.max_tokens)
            m = spec.metrics()["speculative"]
            row[f"ngram_k{k}"] = {"seconds": t1, "output_tokens": n1, "tok_s": n1 / t1, "speedup": t0 / t1,
                                  "identical_tokens": got == ref, "mean_accepted_length": m["mean_accepted_length"],
                                  "acceptance_rate_per_position": m["acceptance_rate_per_position"],
                                  "batches": spec.metrics()["batches"]}  # how steps ran: graphs, or why eager
            print(f"batch {b:>3} k {k}: {n0 / t0:8.1f} -> {n1 / t1:8.1f} tok/s ({t0 / t1:.2f}x), identical "
                  f"{got == ref}, mean accepted length {m['mean_accepted_length']:.2f}", flush=True)
            del spec
            if a.device == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    name = f"{a.model_preset} (random weights)" if a.model_preset else "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)"
    workload = f"{len(prompts)} token prompts: a random passage said three times" if a.model_preset else \
        f"{len(prompts)} chat requests: repeat a docs paragraph with one word replaced"
    result = {"bench": "speculative_ngram", "model": name,
              "machine": machine_info(a.device), "device": a.device, "dtype": base.plan.model.dtype,
              "workload": f"{workload}; greedy, max_tokens {a.max_tokens}", "rows": rows}
    write_result(a.out, f"speculative-{a.model_preset + '-' if a.model_preset else ''}{a.device}", result)


if __name__ == "__main__":
    main()
