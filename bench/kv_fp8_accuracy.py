"""What FP8 KV costs in accuracy (issue 16), on the real SmolLM2-135M-Instruct weights (GGUF Q4_1,
dequantized; `scripts/fetch_smollm2.py`), model-dtype KV vs `--kv-dtype fp8`, same weights and run:

  * perplexity over a text the repository ships (docs/design.md), read in chunks of `--chunk`
    tokens like chunked prefill, so every chunk attends to the earlier ones through the cache;
  * greedy agreement over 16 prompts x 128 tokens: the model-dtype run's greedy continuation is the
    reference; the FP8 run predicts every position of it with the reference prefix given (so one
    divergence counts as one miss, not as every token after it), plus where free-running FP8
    greedy first leaves the reference.

    python bench/kv_fp8_accuracy.py --device cpu --out bench/results/kv_fp8
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nanoforge import LLM, SamplingParams  # noqa: E402
from nanoforge.tools.bench_offline import machine_info  # noqa: E402


def smollm2_gguf(path: str | None) -> str:
    """`path`, else SmolLM2-135M-Instruct's GGUF, fetched into .cache/smollm2 the first time."""
    if path is not None:
        return path
    sys.path.insert(0, str(ROOT / "scripts"))
    from fetch_smollm2 import fetch

    return str(fetch(ROOT / ".cache" / "smollm2"))


def write_result(out_dir: str, stem: str, result: dict) -> Path:
    """result as bench/results JSON: `out_dir/<stem>-<time>.json`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return path


def all_logits(llm: LLM, tokens: list[int], chunk: int) -> torch.Tensor:
    """Logits f32[len(tokens), vocab] of one sequence fed in chunks through the paged cache."""
    runner, bs = llm.engine.runner, llm.engine.runner.block_size
    blocks = list(range(-(-len(tokens) // bs)))
    out = []
    for start in range(0, len(tokens), chunk):
        piece = tokens[start:start + chunk]
        end = start + len(piece)
        out.append(runner.run(piece, [(len(piece), end, blocks[: -(-end // bs)])], list(range(len(piece)))).float())
    return torch.cat(out)


def perplexity(llm: LLM, tokens: list[int], chunk: int) -> float:
    logits = all_logits(llm, tokens, chunk)[:-1]
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(tokens[1:]), reduction="mean")
    return math.exp(nll.item())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=None, help="SmolLM2-135M-Instruct .gguf (default: fetched into .cache/smollm2)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--text", default=str(ROOT / "docs" / "design.md"))
    ap.add_argument("--max-tokens", type=int, default=4096, help="of the text, for the perplexity")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--out", default="bench/results/kv_fp8")
    a = ap.parse_args()
    a.gguf = smollm2_gguf(a.gguf)
    t0 = time.perf_counter()
    text = Path(a.text).read_text()
    llms = {kv: LLM(a.gguf, device=a.device, kv_dtype=kv, progress=False, max_num_seqs=a.prompts)
            for kv in ("auto", "fp8")}
    tokens = llms["auto"].tokenizer.encode(text)[: a.max_tokens]
    ppl = {kv: perplexity(llm, tokens, a.chunk) for kv, llm in llms.items()}
    stride = max((len(tokens) - a.prompt_len) // a.prompts, 1)
    prompts = [tokens[i * stride: i * stride + a.prompt_len] for i in range(a.prompts)]
    greedy = SamplingParams(temperature=0, max_tokens=a.gen, ignore_eos=True)
    ref = [o.token_ids for o in llms["auto"].generate(prompts, greedy)]
    free = [o.token_ids for o in llms["fp8"].generate(prompts, greedy)]
    hits, first_miss = 0, []
    for p, r, f in zip(prompts, ref, free):
        pred = all_logits(llms["fp8"], p + r, a.chunk)[len(p) - 1: -1].argmax(-1).tolist()
        hits += sum(x == y for x, y in zip(pred, r))
        first_miss.append(next((i for i, (x, y) in enumerate(zip(f, r)) if x != y), len(r)))
    kv = {k: {"dtype": llm.plan.kv_contract.dtype, "bytes_per_token": llm.plan.memory.kv_bytes_per_token}
          for k, llm in llms.items()}
    result = {
        "bench": "kv_fp8_accuracy", "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)",
        "machine": machine_info(a.device), "device": a.device, "model_dtype": llms["auto"].plan.model.dtype,
        "kv": kv, "text": str(Path(a.text).relative_to(ROOT)) if Path(a.text).is_relative_to(ROOT) else a.text,
        "text_tokens": len(tokens), "chunk": a.chunk,
        "perplexity": ppl, "perplexity_ratio": ppl["fp8"] / ppl["auto"],
        "greedy": {"prompts": a.prompts, "prompt_len": a.prompt_len, "tokens": a.gen,
                   "teacher_forced_agreement": hits / (a.prompts * a.gen),
                   "free_running_first_divergence": first_miss,
                   "free_running_identical_sequences": sum(m == a.gen for m in first_miss)},
        "goals": {"perplexity_within_1pct": abs(ppl["fp8"] / ppl["auto"] - 1) <= 0.01,
                  "agreement_at_least_95pct": hits / (a.prompts * a.gen) >= 0.95},
        "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps({k: result[k] for k in ("perplexity", "perplexity_ratio", "greedy", "goals", "seconds")}, indent=1))
    write_result(a.out, f"kv_fp8_accuracy-{a.device}", result)


if __name__ == "__main__":
    main()
