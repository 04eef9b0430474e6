"""Qwen3-VL benchmarks of issue 21, on one card, random bf16 weights (models/presets.py `qwen3-vl-8b-2l`:
Qwen3-VL-8B's vision tower at full size, its text model cut to 2 layers):

  * encoder: images/s of the vision tower at 448x448 (batch 8) and 1024x1024 (batch 2) through our `encode`
    function (one call for the batch, and one call per image as the runtime's VisionEncoder runs it today) vs
    transformers' Qwen3VLVisionModel built from the same config with the same weights, in the same process; the
    outputs of both (merged embeddings and every deepstack feature) are compared: max |ours - HF| / max |HF|.
    Pixels are random patches (preprocessing is not timed). CUDA events, warm-up, median of a few reps.
  * ttft: time to first token of one 448x448 image + a 16-token question (max_tokens 1), sequential requests
    after warm-up, through a Router in this process: co-located (one engine process, role both) vs EPD (encode,
    prefill and decode engine processes) vs PD whose prefill engine encodes, all on one GPU. Each request has
    its own image (no embedding cache hits); the text model is 2 layers, so the numbers are the pipeline's
    overhead (preprocessing, the tower, the hops between engines), not a full model's prefill.

    python bench/vision.py --device cuda --out bench/results/vision     # H100, 1-2 minutes (most: engine start)
    python bench/vision.py --device cpu --smoke --out /tmp/vision       # tiny model, CPU, end to end
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for bench.*

from bench.kv_fp8_accuracy import write_result  # noqa: E402
from nanoforge.compiler import CompileOptions, compile_checkpoint  # noqa: E402
from nanoforge.models.presets import PRESETS  # noqa: E402
from nanoforge.models.random_checkpoint import RandomCheckpoint  # noqa: E402
from nanoforge.runtime.vision_inputs import ImageInput  # noqa: E402
from nanoforge.runtime.vision_runner import VisionEncoder  # noqa: E402
from nanoforge.tools.bench_offline import machine_info  # noqa: E402

PRESET, SMOKE_PRESET = "qwen3-vl-8b-2l", "qwen3-vl-tiny"
SHAPES = ((448, 8), (1024, 2))  # (image side in pixels, images per batch)
SMOKE_SHAPES = ((64, 3), (128, 1))
QUESTION_TOKENS = 16


def check_vision_config(vision: dict[str, Any]) -> dict[str, Any]:
    """Where the preset's vision tower differs from the pinned transformers' Qwen3VLVisionConfig defaults
    (only out_hidden_size is expected to: the defaults carry 3584, Qwen3-VL-8B's config.json 4096)."""
    try:
        import transformers as tf

        d = tf.Qwen3VLVisionConfig().to_dict()
    except (ImportError, AttributeError) as exc:
        return {"error": f"transformers' Qwen3VLVisionConfig unavailable: {exc}"}
    return {"transformers": tf.__version__,
            "differs_from_defaults": {k: {"preset": v, "transformers_default": d.get(k)}
                                      for k, v in vision.items() if d.get(k) != v}}


# -- part 1: the vision tower ------------------------------------------------------------------------------------

def timed_s(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int = 2) -> list[float]:
    """Seconds of each of `reps` calls after `warmup` ones: CUDA events around each on a GPU."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def hf_tower(vision: dict[str, Any], ckpt: RandomCheckpoint, device: torch.device, dtype: torch.dtype):
    """transformers' Qwen3VLVisionModel of the same config, holding the checkpoint's weights (model.visual.*)."""
    import transformers as tf
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    with torch.device(device):
        model = Qwen3VLVisionModel._from_config(tf.Qwen3VLVisionConfig(**vision), attn_implementation="sdpa",
                                                dtype=dtype).eval().to(device)
    keys = list(model.state_dict())
    missing = [k for k in keys if f"model.visual.{k}" not in ckpt.tensors]
    if missing:
        raise RuntimeError(f"HF's vision tower has tensors the checkpoint lacks: {missing[:5]}")
    weights = dict(ckpt.read([f"model.visual.{k}" for k in keys], dtype, progress=False))
    model.load_state_dict({k: weights[f"model.visual.{k}"] for k in keys}, strict=True)
    return model


def rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-12)).item()


def bench_encoder(preset: str, shapes: tuple, device: torch.device, dtype: str, reps: int) -> dict[str, Any]:
    config = PRESETS[preset]
    vision = config["vision_config"]
    tdtype = {"bf16": torch.bfloat16, "f32": torch.float32}[dtype]
    ckpt = RandomCheckpoint(config, preset, dtype, device=device.type)
    plan = compile_checkpoint(ckpt.path, CompileOptions(dtype=dtype, device=device.type), ckpt=ckpt)
    ours = VisionEncoder.load(plan.module, ckpt, device)
    hf = hf_tower(vision, ckpt, device, tdtype)
    p, m = vision["patch_size"], vision["spatial_merge_size"]
    width = vision.get("in_channels", 3) * vision["temporal_patch_size"] * p * p
    g = torch.Generator().manual_seed(0)
    rows = []
    for side, batch in shapes:
        n = (side // p) ** 2  # patches per image
        grid = torch.tensor([[1, side // p, side // p]] * batch)  # host, as the runtime passes it (HF's on the device)
        pixels = (2 * torch.rand(batch * n, width, generator=g) - 1).to(device, tdtype)  # normalised pixels
        images = [ImageInput(pixels[i * n:(i + 1) * n], (1, side // p, side // p), f"bench-{side}-{i}", n // m ** 2)
                  for i in range(batch)]

        def per_image(images: list[ImageInput] = images) -> None:  # the runtime's path: one call per image
            for im in images:
                ours.cache.clear()  # emptied, so each call runs the tower
                ours.embeddings(im)

        def batched(pixels: torch.Tensor = pixels, grid: torch.Tensor = grid) -> Any:
            return ours.fn(ours.params, None, pixels, grid.clone())  # a fresh grid, as each runtime forward has:
            # the rotary tables hang on it (vision_ref.py), built once a forward, not once a benchmark

        def reference(pixels: torch.Tensor = pixels, grid: torch.Tensor = grid.to(device)) -> Any:
            return hf(pixels, grid)

        with torch.inference_mode():
            got, ref = batched(), reference()
            diffs = {name: rel_diff(a, b) for name, a, b in zip(
                ["merged"] + [f"deepstack_{i}" for i in range(len(ref.deepstack_features))],
                got, [ref.pooler_output, *ref.deepstack_features])}
            t_ours, t_one, t_hf = (timed_s(f, device, reps) for f in (batched, per_image, reference))
        ms = {k: 1e3 * statistics.median(t) for k, t in (("ours", t_ours), ("ours_per_image", t_one), ("hf", t_hf))}
        row = {"image_side": side, "batch": batch, "patches_per_image": n, "tokens_per_image": n // m ** 2,
               **{f"{k}_ms": v for k, v in ms.items()},
               **{f"{k}_images_per_s": batch / (v / 1e3) for k, v in ms.items()},
               "speedup_ours_over_hf": ms["hf"] / ms["ours"], "max_rel_diff": diffs,
               "max_rel_diff_worst": max(diffs.values())}
        rows.append(row)
        print(f"vision encoder {side}x{side} batch {batch}: ours {row['ours_images_per_s']:.1f} img/s "
              f"(per-image calls {row['ours_per_image_images_per_s']:.1f}) | HF {row['hf_images_per_s']:.1f} img/s | "
              f"{row['speedup_ours_over_hf']:.2f}x | max rel diff {row['max_rel_diff_worst']:.2e}", flush=True)
    providers = Counter(f"{n.op}:{n.provider or 'torch'}" for n in plan.module.functions["encode"].nodes)
    return {"rows": rows, "reps": reps, "warmup": 2, "providers": dict(sorted(providers.items())),
            "hf_attn_implementation": "sdpa", "timing": "CUDA events per call, median" if device.type == "cuda"
            else "perf_counter per call, median", "pixels": "random in [-1, 1], preprocessing not timed"}


# -- part 2: time to first token, co-located vs EPD ----------------------------------------------------------------

def png_image(side: int, seed: int) -> bytes:
    """A distinct side x side RGB image (a gradient under noise), PNG-encoded: what a client sends."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, side, dtype=np.float32)
    base = (ramp[:, None, None] + ramp[None, :, None] * rng.uniform(0.2, 1.0, 3)) / 2
    img = np.clip(base + rng.normal(0, 25, (side, side, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def prompt_ids(config: dict[str, Any], seed: int) -> list[int]:
    """<vision_start><image><vision_end> + a 16-token question (random ids below the special tokens)."""
    top = min(config["vision_start_token_id"], config["text_config"]["vocab_size"])
    q = np.random.default_rng(seed).integers(1, top - 1, QUESTION_TOKENS).tolist()
    return [config["vision_start_token_id"], config["image_token_id"], config["vision_end_token_id"], *q]


def image_tokens(config: dict[str, Any], side: int) -> int:
    """Placeholder tokens a side x side image takes once the engine resized it to the processor's limits."""
    from nanoforge.runtime.vision_inputs import VisionSpec, smart_resize

    spec = VisionSpec.of(config, None)
    f = spec.patch_size * spec.merge_size
    h, w = smart_resize(side, side, f, spec.min_pixels, spec.max_pixels)
    return (h // f) * (w // f)


@contextlib.contextmanager
def engines(preset: str, device: str, roles: dict[str, str], flags: dict[str, Any],
            timeout: float) -> Iterator[dict[str, str]]:
    """Start one engine server process per name (role as given), all at once, and stop them on exit;
    yields name -> ZMQ address."""
    from nanoforge.serving.engine_server import start_engine_server, stop_engine_server, wait_engine_ready

    env = {"OMP_NUM_THREADS": "1"} if device == "cpu" else None  # CPU smoke: four processes share the cores
    procs: dict[str, Any] = {}
    try:
        for name, role in roles.items():
            procs[name] = start_engine_server(None, env=env, model_preset=preset, role=role, device=device,
                                              model_name=preset, **flags)  # an encode engine logs the KV ones
        for proc, addr in procs.values():
            wait_engine_ready(proc, addr, timeout)
        yield {name: addr for name, (_, addr) in procs.items()}
    finally:
        for proc, _ in procs.values():
            stop_engine_server(proc, timeout=10)


async def images_encoded(addr: str) -> int:
    from nanoforge.serving.zmq_client import ZmqEngineClient

    c = await ZmqEngineClient.connect(addr, timeout=10)
    try:
        return int((await c.stats()).get("images_encoded", 0))
    finally:
        c.close()


async def one_request(router: Any, rid: str, prompt: list[int], png: bytes, max_tokens: int) -> dict[str, Any]:
    from nanoforge.serving.protocol import GenerateRequest

    params = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    start, ttft, tokens = time.perf_counter(), None, []
    async for d in router.generate(GenerateRequest(rid, prompt, params, images=[png])):
        if d.finish_reason == "error":
            raise RuntimeError(f"request {rid} failed: {d.error}")
        if d.token_ids and ttft is None:
            ttft = time.perf_counter() - start
        tokens += d.token_ids
    if ttft is None or len(tokens) != max_tokens:
        raise RuntimeError(f"request {rid}: {len(tokens)} of {max_tokens} tokens")
    return {"ttft_s": ttft, "latency_s": time.perf_counter() - start, "tokens": tokens}


def summary_ms(xs: list[float]) -> dict[str, float]:
    ms = [1e3 * x for x in xs]
    return {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)), "mean": statistics.fmean(ms),
            "min": min(ms), "max": max(ms)}


async def run_deployment(name: str, router_kw: dict[str, list[str]], work: list[tuple[list[int], bytes]],
                         warm: list[tuple[list[int], bytes]], max_tokens: int) -> dict[str, Any]:
    """Warm-up requests, then the timed ones one after another; where the images were encoded."""
    from nanoforge.serving.router import Router

    addrs = {"both" if kw == "engines" else kw: a for kw, addr in router_kw.items() for a in addr}
    router = await Router.connect(**router_kw)
    try:
        for i, (prompt, png) in enumerate(warm):
            await one_request(router, f"{name}-warm-{i}", prompt, png, max_tokens)
        before = {role: await images_encoded(a) for role, a in addrs.items()}
        rows = [await one_request(router, f"{name}-{i}", p, png, max_tokens) for i, (p, png) in enumerate(work)]
        after = {role: await images_encoded(a) for role, a in addrs.items()}
    finally:
        router.close()
    out = {"engines": sorted(addrs), "requests": len(rows), "ttft_ms": summary_ms([r["ttft_s"] for r in rows]),
           "latency_ms": summary_ms([r["latency_s"] for r in rows]),
           "images_encoded_by": {role: after[role] - before[role] for role in addrs},
           "first_tokens": [r["tokens"][0] for r in rows]}
    t = out["ttft_ms"]
    print(f"vision ttft {name:<22} p50 {t['p50']:8.2f} ms  p90 {t['p90']:8.2f} ms  (images encoded by "
          f"{out['images_encoded_by']})", flush=True)
    return out


def bench_ttft(preset: str, device: str, side: int, requests: int, warmup: int, max_tokens: int,
               timeout: float) -> dict[str, Any]:
    config = PRESETS[preset]
    flags = {"dtype": "bf16" if device == "cuda" else "f32", "num_blocks": 256,
             "max_model_len": 2048, "max_num_seqs": 4, "max_num_batched_tokens": 2048, "enforce_eager": True}
    work = [(prompt_ids(config, 1000 + i), png_image(side, 1000 + i)) for i in range(requests)]
    warm = [(prompt_ids(config, i), png_image(side, i)) for i in range(warmup)]
    roles = {"both": "both", "encode": "encode", "prefill": "prefill", "decode": "decode"}
    t0 = time.perf_counter()
    with engines(preset, device, roles, flags, timeout) as a:
        startup_s = time.perf_counter() - t0
        deployments = {
            "colocated": {"engines": [a["both"]]},
            "epd": {"prefill": [a["prefill"]], "decode": [a["decode"]], "encode": [a["encode"]]},
            "pd_prefill_encodes": {"prefill": [a["prefill"]], "decode": [a["decode"]]},
        }
        res = {k: asyncio.run(run_deployment(k, kw, work, warm, max_tokens)) for k, kw in deployments.items()}
    co, epd = res["colocated"]["ttft_ms"], res["epd"]["ttft_ms"]
    print(f"vision ttft epd / colocated: p50 {epd['p50'] / co['p50']:.2f}x, p90 {epd['p90'] / co['p90']:.2f}x "
          f"({epd['p50'] - co['p50']:+.2f} ms at p50; engines up in {startup_s:.0f} s)", flush=True)
    same = sum(x == y for x, y in zip(res["colocated"]["first_tokens"], res["epd"]["first_tokens"]))
    return {"config": {"preset": preset, "image_side": side, "question_tokens": QUESTION_TOKENS,
                       "prompt_tokens_after_expansion": len(work[0][0]) - 1 + image_tokens(config, side),
                       "requests": requests, "warmup_requests": warmup, "max_tokens": max_tokens,
                       "engine_flags": flags, "text_part": "2 decoder layers (tiny text part: the point is the "
                       "pipeline overhead of EPD vs co-located, not the language model's prefill)" if preset == PRESET
                       else "tiny smoke model", "sequential": True,
                       "kv_pools": "fixed by --num-blocks, so all engine processes start together on one card",
                       "note": "one image per request, none repeated (no embedding cache hits); the decode "
                               "engine gets no work at max_tokens 1"},
            "engines_startup_s": startup_s, "deployments": res,
            "ratio": {"epd_over_colocated_ttft_p50": epd["p50"] / co["p50"],
                      "epd_over_colocated_ttft_p90": epd["p90"] / co["p90"],
                      "epd_minus_colocated_ttft_p50_ms": epd["p50"] - co["p50"]},
            "same_first_token_colocated_vs_epd": f"{same}/{requests}"}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--parts", nargs="+", choices=["encoder", "ttft"], default=["encoder", "ttft"])
    ap.add_argument("--smoke", action="store_true", help="the tiny Qwen3-VL and small images (CPU ok)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per encoder row (default 5; smoke 2)")
    ap.add_argument("--requests", type=int, default=None, help="timed TTFT requests per deployment (default 10)")
    ap.add_argument("--warmup-requests", type=int, default=None, help="default 3 (smoke 1)")
    ap.add_argument("--max-tokens", type=int, default=1)
    ap.add_argument("--startup-timeout", type=float, default=300.0, help="seconds for the engines to come up")
    ap.add_argument("--out", default="bench/results/vision")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here (use --device cpu --smoke for the tiny CPU run)")
    if a.device == "cpu" and not a.smoke:
        ap.error("--device cpu needs --smoke (the 8B-sized tower would take many minutes on a CPU)")
    for flag, v in (("--reps", a.reps), ("--requests", a.requests), ("--max-tokens", a.max_tokens)):
        if v is not None and v < 1:
            ap.error(f"{flag} must be >= 1, got {v}")
    device = torch.device(a.device)
    preset = SMOKE_PRESET if a.smoke else PRESET
    dtype = "bf16" if a.device == "cuda" else "f32"
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "bench": "vision", "smoke": a.smoke, "device": a.device,
        "card": torch.cuda.get_device_name() if a.device == "cuda" else "cpu", "machine": machine_info(a.device),
        "model": {"preset": preset, "dtype": dtype, "weights": "random (RandomCheckpoint, seed 0)",
                  "vision_config": PRESETS[preset]["vision_config"],
                  "vision_config_check": check_vision_config(PRESETS[preset]["vision_config"])}}
    if "encoder" in a.parts:
        result["encoder"] = bench_encoder(preset, SMOKE_SHAPES if a.smoke else SHAPES, device, dtype,
                                          a.reps or (2 if a.smoke else 5))
        if a.device == "cuda":
            torch.cuda.empty_cache()  # both towers are gone: the engine processes get the card
    if "ttft" in a.parts:
        result["ttft"] = bench_ttft(preset, a.device, 64 if a.smoke else 448, a.requests or (3 if a.smoke else 10),
                                    a.warmup_requests if a.warmup_requests is not None else (1 if a.smoke else 3),
                                    a.max_tokens, a.startup_timeout)
    result["wall_s"] = time.perf_counter() - t0
    write_result(a.out, "vision" + ("-smoke" if a.smoke else ""), result)
    return result


if __name__ == "__main__":
    main()
