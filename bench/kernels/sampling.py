"""GPU benchmark of the Triton sampler (nanoforge/kernels/triton/sampling.py) against the torch
sampler of nanoforge/runtime/sampler.py: bench_sampling (bench/gpu_check.sh stage `sampling`).
Kept out of the kernel module, which imports nothing from the runtime."""
from __future__ import annotations

import torch

from nanoforge.kernels.triton.sampling import sample_tokens


def bench_sampling(B: int, V: int = 151936, **kw) -> dict:
    """Median ms (triton.testing.do_bench) of sample_tokens vs the torch sampler's per-row path on
    the same batch (rows cycle through top-p, top-k + top-p, min-p and plain-temperature settings).
    kw (block, probes, num_warps) go to sample_tokens, for tuning."""
    from triton.testing import do_bench

    from nanoforge.runtime.sampler import SampleRequest, _sample_torch, sample
    from nanoforge.runtime.sampling_params import SamplingParams

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    logits = torch.randn(B, V, generator=gen, device=dev) * 4
    kinds = [SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(temperature=0.8, top_k=50, top_p=0.95),
             SamplingParams(temperature=1.0, min_p=0.05), SamplingParams(temperature=1.0)]
    params = [kinds[i % len(kinds)] for i in range(B)]
    reqs = [SampleRequest(p, [], [], None, []) for p in params]
    cols = [torch.tensor(c, device=dev) for c in zip(*[(p.temperature, p.top_k, p.top_p, p.min_p) for p in params])]
    u = torch.rand(B, generator=gen, device=dev)
    fast = lambda: sample_tokens(logits, *cols, u, **kw)  # noqa: E731
    ms = do_bench(fast, warmup=25, rep=200, return_mode="median")
    ref_ms = do_bench(lambda: _sample_torch(logits, reqs), warmup=1, rep=50, return_mode="median")
    e2e_ms = do_bench(lambda: sample(logits, reqs), warmup=5, rep=100, return_mode="median") if not kw else None
    return {"B": B, "V": V, "triton_ms": ms, "torch_ms": ref_ms, "speedup": ref_ms / ms,
            "sampler_fast_path_ms": e2e_ms,  # runtime.sampler.sample: host params, copy, kernel, .tolist()
            "device": torch.cuda.get_device_name(dev), **kw}
