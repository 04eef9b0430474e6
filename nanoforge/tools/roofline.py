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


ROW_BINS = (1, 16, 32, 64, 128, 256)  # decode steps grouped by rows: (prev, bound]


def step_breakdown(m, *, weight_bytes: int, kv_bytes_per_token: int, flops_per_token: float, bandwidth: float,
                   flops: float, since: int = 0) -> dict:
    """A run's steps (EngineMetrics `m`) against their own floors: decode-only steps grouped by
    batch rows, then the mixed steps. A step's floor is the slower of its bytes (weights once, every
    row's context of K/V) and its FLOPs, as simulate_ceiling charges them. The run's total says how
    far it is from its ceiling; this says which batches lose the time. `since`: the first step counted
    (a benchmark leaves its warm-up out)."""
    def floor_s(tokens: int, kv: int) -> float:
        return max((weight_bytes + kv * kv_bytes_per_token) / bandwidth, tokens * flops_per_token / flops)

    def group(label: str, steps: list[tuple[float, int, int, int]]) -> dict:
        t, fl = sum(s[0] for s in steps), sum(floor_s(s[1], s[3]) for s in steps)
        n = max(len(steps), 1)
        return {"rows": label, "steps": len(steps), "seconds": t, "floor_s": fl,
                "mean_ms": 1e3 * t / n, "mean_floor_ms": 1e3 * fl / n,
                "mean_tokens": sum(s[1] for s in steps) / n, "mean_kv_positions": sum(s[3] for s in steps) / n,
                "fraction_of_floor": fl / t if t else None}

    steps = list(zip(m.step_times, m.tokens_per_step, m.rows_per_step, m.kv_per_step))[since:]
    flags = m.decode_flags[since:]
    decode = [s for s, d in zip(steps, flags) if d]
    out, lo = [], 0
    for hi in ROW_BINS + (1 << 62,):
        picked = [s for s in decode if lo < s[2] <= hi]
        if picked:
            out.append(group(f">{lo}" if hi == 1 << 62 else f"{lo + 1}-{hi}" if lo + 1 < hi else str(hi), picked))
        lo = hi
    mixed = [s for s, d in zip(steps, flags) if not d]
    return {"decode": out, "mixed": group("any", mixed) if mixed else None, "all": group("any", steps)}
