"""Ceilings measured on the machine at hand, and the roofline of a decode workload built on them.

Bandwidth: a large device-to-device copy, counting bytes read plus written. Matmul: a large bf16
(f32 on CPU) product. The simulated ceiling schedules the workload as an ideal engine would (all
sequences together, up to max_num_seqs) and charges each decode step the bytes it must read
(weights + the KV of every active sequence) and each prefill its FLOPs."""
from __future__ import annotations

import time

import torch


def _time(fn, device: torch.device, reps: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
    else:
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def measure_ceilings(device: str = "cuda") -> dict[str, float]:
    dev = torch.device(device)
    n = (1 << 30) if dev.type == "cuda" else (1 << 26)  # 1 GiB on GPU, 64 MiB on CPU
    src = torch.randn(n // 4, device=dev)
    dst = torch.empty_like(src)
    copy_s = _time(lambda: dst.copy_(src), dev, 20)
    m = 8192 if dev.type == "cuda" else 1024
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a, b = torch.randn(m, m, device=dev, dtype=dtype), torch.randn(m, m, device=dev, dtype=dtype)
    mm_s = _time(lambda: a @ b, dev, 10)
    return {"copy_bytes_per_s": 2 * n / copy_s, "matmul_flop_per_s": 2 * m**3 / mm_s,
            "matmul_dtype": str(dtype).replace("torch.", "")}


def simulate_ceiling(input_lens: list[int], output_lens: list[int], *, weight_bytes: int, kv_bytes_per_token: int,
                     flops_per_token: float, bandwidth: float, flops: float, max_num_seqs: int) -> dict[str, float]:
    """Output tok/s of an ideal engine: prefill at the matmul ceiling; a decode step at the slower of
    the bandwidth ceiling (weights + KV read once) and the matmul one (a big batch on a CPU is
    compute bound: 32 rows of a 135M model are 8.6 GFLOP a step)."""
    prefill_s = sum(input_lens) * flops_per_token / flops
    pending = sorted(zip(input_lens, output_lens), key=lambda io: io[1])
    active: list[list[int]] = []  # [context length, tokens left]
    decode_s, steps = 0.0, 0
    while pending or active:
        while pending and len(active) < max_num_seqs:
            i, o = pending.pop()
            active.append([i, o])
        kv = sum(c for c, _ in active) * kv_bytes_per_token
        decode_s += max((weight_bytes + kv) / bandwidth, len(active) * flops_per_token / flops)
        steps += 1
        for a in active:
            a[0] += 1
            a[1] -= 1
        active = [a for a in active if a[1] > 0]
    total = prefill_s + decode_s
    return {"output_tok_s": sum(output_lens) / total, "decode_steps": steps, "prefill_s": prefill_s,
            "decode_s": decode_s}
