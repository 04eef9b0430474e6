#!/usr/bin/env bash
# One device call, several gpu_check.sh stages, each under its own time limit, results packed into
# $OUT/results.tgz, refreshed after each stage (the device machine hands back at most 8 files):
#   bench/gpu_batch.sh tests:220 fp8_moe_small:70 dsa_decode:100
# (GPU_TEST_FILES picks the test files of the `tests` stage, as for gpu_check.sh.)
set -uo pipefail
DEST=${OUT:-bench/results/gpu-batch-$(date +%Y%m%d-%H%M%S)}
WORK=$(mktemp -d)
mkdir -p "$DEST"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
for spec in "$@"; do
  stage=${spec%%:*} limit=${spec#*:}
  [ "$limit" = "$spec" ] && limit=300
  t0=$SECONDS
  WHEEL_DIRS=/nonexistent OUT="$WORK" timeout "$limit" bench/gpu_check.sh "$stage" > "$WORK/stage-$stage.txt" 2>&1
  echo "== stage $stage: rc=$? in $((SECONDS - t0))s (limit ${limit}s)"
  sed -n '/^== summary/,$p' "$WORK/stage-$stage.txt" | tail -n +2
  tar czf "$DEST/results.tgz" -C "$WORK" .  # after every stage: a call cut short still brings back the rest
done
