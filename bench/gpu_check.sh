#!/usr/bin/env bash
# On a GPU machine, from the repo root: install carried wheels (.whl/), run the GPU tests and the
# benchmarks, write everything under $OUT (default bench/results/gpu-<date>) and print a summary.
#   bench/gpu_check.sh [tests] [attention] [decode] [mixed] [offline] [elementwise] [moe] [sampling] [libs] [compare]
#                      [fp8_gemm]  (block-FP8 GEMM: Triton W8A8 vs bf16 cuBLAS vs DeepGEMM, DeepSeek-V3 shapes)
#                      [mla]  (MLA decode, DeepSeek-V3 absorbed shapes: FlashMLA vs Triton -> $OUT/mla_decode-*.json)
#                      [mla_prefill]  (MLA prefill of one sequence: absorbed Triton vs expanded SDPA per backend, V as
#                                      is or padded -> $OUT/mla_prefill-*.json)
#                      [deepseek_layers]  (DeepSeek-V3 layers at real size, FP8 vs bf16: decode floor, prefill TFLOP/s)
#                      [fp8_moe]  (DeepSeek-V3's block-FP8 experts: DeepGEMM FP8 grouped vs Triton bf16, T 1..4096;
#                                  ~45 GB of GPU memory -> $OUT/fp8_moe.json; then fp8_moe_small)
#                      [fp8_moe_small]  (the same experts at T 1..64: Triton small-batch FP8 kernels vs DeepGEMM
#                                  masked, tile sweep; 12 GB, < 1 min -> $OUT/fp8_moe_small.json)
#                      [kv_fp8_attention] [kv_fp8_decode] [kv_fp8_offline]  (issue 16: FP8 vs bf16 KV, same run)
#                      [offline_chunks]  (offline workloads at 4096 and 8192 tokens a step, no HF baseline)
#                      [decode_order]  (ragged decode batches in drawn order, sorted longest first, and through the
#                                       decode_order argument (DECODE_LONGEST_FIRST's path) -> $OUT/decode_order.json)
#                      [decode_tune]  (decode attention tiles at the offline workload's ragged contexts -> $OUT/decode_tune.json)
#                      [knob_ab]  (KNOB=fuse_kv_store|prefill_longest_first|decode_longest_first|pdl: an off-by-default knob's GPU tests with it
#                                  on, then the offline workload base/knob/base/knob; KNOB_QUICK=1: base/knob only;
#                                  KNOB_DECODE=qwen3-8b: also that preset's decode step at batch 1 / 64, twice each)
#                      [prefill_varlen]  (fresh-prompt prefill attention: Triton paged in both grid orders vs torch's
#                                         FlashAttention varlen, and the prefill tile sweep -> $OUT/prefill_varlen-*.json)
#                      [kv_fp8_tune]  (FP8 KV decode tile sweep against bf16's default -> $OUT/kv_fp8_tune.json)
#                      [moe_parallel]  (2 GPUs: Qwen3-MoE-shaped decode tok/s, tp=1 vs tp=2 vs ep=2)
#                      [dsa_decode]  (issue 20: one DeepSeek-V3.2 layer, sparse vs dense MLA decode, 8k-64k, batch 16)
#                      [pd] [migration]  (issue 18: PD vs co-located under Poisson load; KV migration GB/s tcp/ipc, and dlslime where it imports)
#                      [speculative]  (issue 17: prompt-lookup speculation on SmolLM2-shaped random weights)
#                      [hybrid_decode]  (issue 19: Qwen3.5-MoE vs Qwen3-30B-A3B-shaped layers, decode step at batch
#                                    1/64/256 -> $OUT/hybrid_decode/hybrid_vs_moe.json)
#                      [gdn_kernels]  (issue 19: GDN decode step Triton vs torch ref, batch 1/64/256; prefill tok/s
#                                      Triton chunk 32/64/128 vs torch ref, 4k/16k tokens)
#                      [vision]  (issue 21: Qwen3-VL-8B vision tower img/s ours vs HF; image TTFT co-located vs EPD)
#                      [ep8_deepep] [ep8_dsv3] [ep8_qwen3]  (8 GPUs, issue 7: one per run call)
# (default: all but libs and compare). libs: the library adapters' GPU tests (flashinfer, deep_gemm,
# flash_mla; each skipped when it does not import). compare: triton vs flashinfer paged decode and
# triton vs deep_gemm grouped MoE -> $OUT/compare.json, skipping a library that does not import.
# flashinfer's wheels (~62 MiB) travel in their own folder: WHEEL_DIRS=".whl .whl-flashinfer".
set -uo pipefail
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
WHEELS=$(for d in ${WHEEL_DIRS:-.whl}; do ls "$d"/*.whl 2>/dev/null; done)  # e.g. WHEEL_DIRS=".whl .whl-flashinfer"
if python3 -c "import pytest" 2>/dev/null; then  # keep the machine's pytest (its plugins need it)
  WHEELS=$(echo "$WHEELS" | grep -vE '/(pytest|pluggy|iniconfig)-')
fi
if [ -n "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $WHEELS \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
STAGES=${*:-tests attention decode offline elementwise moe}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
gpu_tests() {  # one pytest per file, GPU_TEST_JOBS (8) at a time, the slowest file first: Triton compiles on
  # the CPU cores (all ~30 files started at once on a fresh H200, 2026-12-07: the e2e file had run 6 of its tests
  # after 9 minutes, against 75-186 s for all of them on H100s before)
  local files=${GPU_TEST_FILES:-$(for f in tests/test_gpu_e2e.py tests/test_gpu_*.py tests/test_triton_*.py \
                                      tests/test_lib_*.py; do [ -f "$f" ] && echo "$f"; done | awk '!seen[$0]++')}
  local rc=0 running=0
  for f in $files; do
    if [ "$running" -ge "${GPU_TEST_JOBS:-8}" ]; then wait -n || rc=1; running=$((running - 1)); fi
    python3 -m pytest -m gpu -q -p no:cacheprovider --durations=5 "$f" > "$OUT/pytest-$(basename "$f" .py).log" 2>&1 &
    running=$((running + 1))
  done
  while [ "$running" -gt 0 ]; do wait -n || rc=1; running=$((running - 1)); done
  for f in $files; do echo "--- $f"; tail -n 25 "$OUT/pytest-$(basename "$f" .py).log"; done
  return $rc
}
declare -A STATUS
run() {  # name, command...
  local name=$1; shift
  echo "== $name"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$OUT/$name.log"
  STATUS[$name]="rc=${PIPESTATUS[0]} $((SECONDS - t0))s"
}
for s in $STAGES; do
  case $s in
    tests) run gpu_tests gpu_tests ;;
    attention) run attention python3 bench/attention.py --out "$OUT" ;;
    decode) run decode_step python3 bench/decode_step.py --model qwen3-8b --batch 1 64 ${DECODE_PROFILE:+--profile} --out "$OUT" ;;
    mixed) run mixed_step python3 bench/decode_step.py --model qwen3-0.6b --batch 256 --context 512 --mixed-chunk 3840 \
             --profile --out "$OUT" ;;
    offline) run offline python3 -m nanoforge.cli bench offline --device cuda --model qwen3-0.6b \
               --hf-num-prompts 16 --hf-batch-size 16 --results-dir "$OUT" ;;
    offline_chunks)  # the reference workload and its fixed-128-output variant, 4096 vs 8192 tokens a step, no HF
      run offline_chunks bash -c 'for n in 4096 8192; do for o in "100 1024" "128 128"; do set -- $o
        python3 -m nanoforge.cli bench offline --device cuda --model qwen3-0.6b --hf-num-prompts 0 \
          --max-num-batched-tokens $n --min-output $1 --max-output $2 --results-dir "$0" 2>&1 \
          | grep -E "output tok/s|roofline" | sed "s/^/offline tokens $n out $1..$2: /"; done; done' "$OUT" ;;
    elementwise) run elementwise python3 -c "import json; from bench.kernels.elementwise import bench_elementwise as b; print(json.dumps(b(), indent=1))" ;;
    moe) run moe python3 -c "import json; import importlib; b = importlib.import_module('bench.kernels.moe').bench_moe; print(json.dumps([b(t, 128, 8, 2048, 768) for t in (1, 64, 2048)], indent=1))" ;;
    sampling) run sampling python3 -c "import json; from bench.kernels.sampling import bench_sampling as b; print(json.dumps([b(n) for n in (1, 64, 256)], indent=1))" ;;
    fp8_gemm) run fp8_gemm python3 -m bench.kernels.fp8_gemm --out "$OUT" ;;
    mla) run mla python3 -m bench.kernels.mla_decode --out "$OUT" ;;
    mla_prefill) run mla_prefill python3 -m bench.kernels.mla_prefill --out "$OUT" ;;
    deepseek_layers) run deepseek_layers python3 bench/deepseek_layers.py --out "$OUT" ;;
    fp8_moe) run fp8_moe python3 - "$OUT" <<'PY'
import json, sys
from bench.kernels.libs import bench_deep_gemm_fp8_grouped

try:
    rows = bench_deep_gemm_fp8_grouped()
except ImportError as exc:  # deep_gemm absent or not the pinned build
    rows = [{"error": f"{type(exc).__name__}: {exc}"[:300]}]
for r in rows:
    if "T" not in r:
        print(f"fp8_moe skipped: {r['error']}")
        continue
    line = f"fp8 moe T {r['T']:5d} ({r['layout']}, {r['active_experts']} experts):"
    for k in ("deep_gemm", "deep_gemm_w13", "triton_bf16"):
        line += (f" {k} {r[k + '_ms'] * 1e3:.1f} us {r[k + '_tflops']:.1f} TF/s {r[k + '_gbps']:.0f} GB/s |"
                 if k + "_ms" in r else f" {k} failed: {r.get(k + '_error', '?')[:80]} |")
    print(line + f" rel_diff {r.get('rel_diff', float('nan')):.3f}", flush=True)
with open(f"{sys.argv[1]}/fp8_moe.json", "w") as fh:
    json.dump(rows, fh, indent=1)
PY
      run fp8_moe_small python3 -c "from bench.kernels.libs import run_fp8_experts_small as r; r('$OUT')" ;;
    fp8_moe_small) run fp8_moe_small python3 -c "from bench.kernels.libs import run_fp8_experts_small as r; r('$OUT')" ;;
    # issue 16, FP8 KV vs bf16 KV in the same run: paged decode attention at 4k, Qwen3-8B decode at 32k
    # (batch 16; bf16 KV may not fit an 80 GB card: the row says so), the reference offline workload
    kv_fp8_attention) run kv_fp8_attention python3 bench/attention.py --kv-dtype both --contexts 4096 \
                        --batches 32 64 128 --out "$OUT" ;;
    kv_fp8_decode) run kv_fp8_decode python3 bench/decode_step.py --model qwen3-8b --batch 1 16 --context 32768 \
                     --skip-prefill --kv-dtype auto fp8 --out "$OUT" ;;
    knob_ab) run "knob_ab_${KNOB:?KNOB=a name of bench/knob_ab.py KNOBS}" python3 bench/knob_ab.py "$KNOB" \
               ${KNOB_QUICK:+--quick} ${KNOB_DECODE:+--decode-step "$KNOB_DECODE"} --out "$OUT/knob_ab_$KNOB" ;;
    prefill_varlen) run prefill_varlen python3 -m bench.kernels.prefill_varlen --tune --out "$OUT" ;;
    decode_order) run decode_order python3 -c "from bench.kernels.attention import decode_order_ab as d; d('$OUT/decode_order.json')" ;;
    decode_tune) run decode_tune python3 -c "from bench.kernels.attention import tune_short_decode as t; t('$OUT/decode_tune.json')" ;;
    kv_fp8_tune) run kv_fp8_tune python3 -c "from bench.kernels.attention import tune_fp8_decode as t; t('$OUT/kv_fp8_tune.json')" ;;
    kv_fp8_offline)
      for kv in auto fp8; do
        run "offline_kv_$kv" python3 -m nanoforge.cli bench offline --device cuda --model qwen3-0.6b --kv-dtype $kv \
          --hf-num-prompts 0 --results-dir "$OUT/offline_kv_$kv"
      done
      run kv_fp8_offline python3 - "$OUT" <<'PY'
import glob, json, sys
runs = {kv: json.load(open(sorted(glob.glob(f"{sys.argv[1]}/offline_kv_{kv}/*.json"))[-1])) for kv in ("auto", "fp8")}
row = {kv: {"output_tok_s": r["nanoforge"]["output_tok_s"], "roofline_output_tok_s": r["roofline"]["output_tok_s"],
            "fraction_of_roofline": r["fraction_of_ceiling"], "kv_cache": r["nanoforge"]["engine"]["kv_cache"],
            "preemptions": r["nanoforge"]["engine"]["preemptions"]} for kv, r in runs.items()}
row["speedup_fp8_over_bf16"] = row["fp8"]["output_tok_s"] / row["auto"]["output_tok_s"]
row["machine"] = runs["fp8"]["machine"]
print(f"offline kv: bf16 {row['auto']['output_tok_s']:.0f} tok/s, fp8 {row['fp8']['output_tok_s']:.0f} tok/s "
      f"-> {row['speedup_fp8_over_bf16']:.3f}x")
json.dump(row, open(f"{sys.argv[1]}/kv_fp8_offline.json", "w"), indent=1)
PY
      ;;
    moe_parallel) run moe_parallel python3 bench/moe_parallel.py --out "$OUT" ;;
    dsa_decode) run dsa_decode python3 bench/dsa_decode.py --out "$OUT/dsa_decode" ;;
    pd) run pd python3 -m nanoforge.cli bench pd --device cuda --rate ${PD_RATES:-4 16 64} --num-prompts 128 \
          --input-len 2048 --output-len 128 ${PD_MPS:+--mps-split $PD_MPS} --results-dir "$OUT/pd" ;;
    migration) run migration python3 -m nanoforge.cli bench migration --device cuda --transport tcp ipc \
                 $(python3 -c "import dlslime" 2>/dev/null && echo dlslime) \
                 --prompt-len 4096 --num-prompts ${MIGRATION_PROMPTS:-8} --results-dir "$OUT/migration" ;;
    speculative) run speculative python3 bench/speculative.py --model-preset smollm2-135m --device cuda --prompts 8 \
                   --batches 1 16 --k 3 --out "$OUT/speculative" ;;
    hybrid_decode)
      for m in qwen3.5-moe-8l qwen3-30b-a3b-8l; do
        run "decode_$m" python3 bench/decode_step.py --model "$m" --batch 1 64 256 --context 1024 --out "$OUT/hybrid_decode"
      done
      run hybrid_decode python3 - "$OUT/hybrid_decode" <<'PY'
import glob, json, sys
runs = {m: json.load(open(sorted(glob.glob(f"{sys.argv[1]}/decode_step-{m}-*.json"))[-1]))
        for m in ("qwen3.5-moe-8l", "qwen3-30b-a3b-8l")}
rows = []
for b in (1, 64, 256):
    h, q = ({r["batch"]: r for r in runs[m]["rows"]}.get(b, {}) for m in runs)
    if "step_s" in h and "step_s" in q:
        rows.append({"batch": b, "qwen3.5_moe_step_ms": 1e3 * h["step_s"], "qwen3_30b_a3b_step_ms": 1e3 * q["step_s"],
                     "hybrid_over_moe": h["step_s"] / q["step_s"]})
        print(f"hybrid decode batch {b}: qwen3.5-moe {rows[-1]['qwen3.5_moe_step_ms']:.3f} ms, "
              f"qwen3-30b-a3b {rows[-1]['qwen3_30b_a3b_step_ms']:.3f} ms -> {rows[-1]['hybrid_over_moe']:.2f}x")
json.dump({"benchmark": "hybrid_decode", "layers": 8, "context": 1024, "machine": runs["qwen3-30b-a3b-8l"]["machine"],
           "rows": rows}, open(f"{sys.argv[1]}/hybrid_vs_moe.json", "w"), indent=1)
PY
      ;;
    gdn_kernels) run gdn_kernels python3 bench/gdn_kernels.py --out "$OUT/gdn_kernels" ;;
    vision) run vision python3 bench/vision.py --device cuda --out "$OUT/vision" ;;
    # issue 7, an 8-GPU host, one stage per run call (each fits the 10-minute limit): DeepEP EP8 latency,
    # then DeepSeek-V3 (3 layers, ~51 GB: the 1-GPU reference fits) and Qwen3-30B-A3B layers, tp=1 vs 8x8
    ep8_deepep) run ep8_deepep env NANOFORGE_EP_RANKS=8 OUT="$OUT" python3 -m pytest -m gpu -q -s -p no:cacheprovider \
                  tests/test_gpu_deepep.py ;;
    ep8_dsv3) run ep8_dsv3 python3 bench/moe_parallel.py --model deepseek-v3 --layers 3 --layouts tp1 ep8 ep8-deepep \
                --batch 128 1024 --timeout 180 --out "$OUT" ;;
    ep8_qwen3) run ep8_qwen3 python3 bench/moe_parallel.py --model qwen3-30b-a3b --layers 8 --layouts tp1 ep8 ep8-deepep \
                 --batch 128 1024 --timeout 180 --out "$OUT" ;;
    libs) run libs python3 -m pytest -m gpu -q -p no:cacheprovider -rs tests/test_lib_*.py ;;
    compare) run compare python3 - "$OUT" <<'PY'
import importlib, json, sys
import torch
from bench.kernels.attention import bench_paged_decode
from bench.kernels.libs import bench_deep_gemm_grouped, bench_flashinfer_decode
from bench.kernels.moe import bench_moe

def lib(name):
    try:
        return importlib.import_module(f"nanoforge.kernels.libs.{name}"), None
    except ImportError as exc:
        print(f"{name} skipped: {exc}", flush=True)
        return None, str(exc)

def err(exc):
    return {"error": f"{type(exc).__name__}: {exc}"[:300]}

res = {"device": torch.cuda.get_device_name(), "decode": [], "moe": []}
fi, res["flashinfer_skipped"] = lib("flashinfer_attn")
dg, res["deep_gemm_skipped"] = lib("deep_gemm_ops")
for b in (32, 64, 128):  # Qwen3-0.6B attention: 16 q / 8 kv heads, head_dim 128, bf16, block 16
    t = bench_paged_decode(b, 4096)
    row, line = {"batch": b, "ctx_len": 4096, "triton": t}, f"decode ctx 4096 batch {b:4d}: triton {t['tb_s']:.2f} TB/s"
    for key, tc in (("flashinfer", False), ("flashinfer_tc", True)) if fi else ():
        try:
            f = row[key] = bench_flashinfer_decode(b, 4096, use_tensor_cores=tc)
            line += f" | {key} {f['tb_s']:.2f} TB/s, time {key}/triton {f['ms'] / t['ms']:.2f}"
        except Exception as exc:
            row[key] = err(exc)
            line += f" | {key} failed: {row[key]['error'][:80]}"
    res["decode"].append(row)
    print(line, flush=True)
    torch.cuda.empty_cache()
for T in (1, 64, 2048):  # Qwen3-30B-A3B MoE layer
    t = bench_moe(T, 128, 8, 2048, 768)
    row, line = {"T": T, "triton": t}, f"moe T {T:5d}: triton experts {t['experts_graph_ms'] * 1e3:.1f} us"
    if dg:
        try:
            d = row["deep_gemm"] = bench_deep_gemm_grouped(T, 128, 8, 2048, 768)
            line += f" | deep_gemm GEMMs {d['ms'] * 1e3:.1f} us ({d['ms'] / t['experts_graph_ms']:.2f}x triton)"
            if "experts_ms" in d:
                line += f", experts {d['experts_ms'] * 1e3:.1f} us ({d['experts_ms'] / t['experts_graph_ms']:.2f}x)"
        except Exception as exc:
            row["deep_gemm"] = err(exc)
            line += f" | deep_gemm failed: {row['deep_gemm']['error'][:80]}"
    res["moe"].append(row)
    print(line, flush=True)
    torch.cuda.empty_cache()
with open(f"{sys.argv[1]}/compare.json", "w") as fh:
    json.dump(res, fh, indent=1, default=str)
PY
    ;;
    *) echo "unknown stage $s" ;;
  esac
done
echo "== summary ($OUT)"
for k in "${!STATUS[@]}"; do printf '%-12s %s\n' "$k" "${STATUS[$k]}"; done
for f in "$OUT"/pytest-*.log; do [ -e "$f" ] && printf '%-40s %s\n' "$(basename "$f")" "$(tail -n 1 "$f")"; done
grep -hE "TB/s" "$OUT/attention.log" 2>/dev/null | tail -8
grep -hE "floor|prefill tok/s" "$OUT/decode_step.log" "$OUT/mixed_step.log" 2>/dev/null
grep -hE "tok/s|ratio|roofline" "$OUT/offline.log" 2>/dev/null
grep -hE "^offline tokens" "$OUT/offline_chunks.log" 2>/dev/null
grep -hE "passed|failed|error" "$OUT/libs.log" 2>/dev/null | tail -2
grep -hE "^(decode ctx|moe T|[a-z_]+ skipped:)" "$OUT/compare.log" 2>/dev/null
grep -hE "^fp8 moe T|^fp8_moe skipped" "$OUT/fp8_moe.log" 2>/dev/null
grep -hE "^fp8 moe small" "$OUT/fp8_moe_small.log" 2>/dev/null
grep -hE "^heads .* ctx .* batch" "$OUT/mla.log" 2>/dev/null
grep -hE "fp8|bf16|speedup" "$OUT/kv_fp8_attention.log" 2>/dev/null | tail -6
grep -hE "floor|skipped" "$OUT/kv_fp8_decode.log" 2>/dev/null
grep -hE "^offline kv" "$OUT/kv_fp8_offline.log" 2>/dev/null
grep -hE "^dsa decode|capture failed" "$OUT/dsa_decode.log" 2>/dev/null
grep -hE "^gdn (decode|prefill)|capture failed" "$OUT/gdn_kernels.log" 2>/dev/null
grep -hE "^hybrid decode" "$OUT/hybrid_decode.log" 2>/dev/null
grep -hE "^vision (encoder|ttft)" "$OUT/vision.log" 2>/dev/null
grep -hE "^decode tune" "$OUT/decode_tune.log" 2>/dev/null
grep -hE "^decode order" "$OUT/decode_order.log" 2>/dev/null
grep -hE "^knob ab" "$OUT"/knob_ab_*.log 2>/dev/null
grep -hE "^prefill |best configs" "$OUT/prefill_varlen.log" 2>/dev/null
