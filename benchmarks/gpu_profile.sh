#!/bin/bash
# One profiled training and inference step of each model, static and
# CondConv, on one GPU (bfloat16, batch 128), kept for reading anywhere:
#
#   OUT=/some/folder benchmarks/gpu_profile.sh
#   tar xzf /some/folder/profiles.tgz -C /some/folder  # anywhere, later
#   python benchmarks/profile_step.py --mode train infer \
#       --load /some/folder/profiles/resnet50
#
# The variants compile first, in parallel, into a persistent cache (minutes
# on a GPU), so the profiled processes only load them.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_profile}
PROFILES=$(mktemp -d)  # this run's steps only
mkdir -p "$OUT" "$PROFILES/profiles"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PYTHON:-python3}
CACHE=${CACHE:-/tmp/jax_cache}
MODELS=${MODELS:-efficientnet_b0 resnet50}
SETTINGS="--batch ${BATCH:-128} --dtype ${DTYPE:-bfloat16}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
    >"$OUT/machine.txt" 2>&1
timeout 260 "$PY" benchmarks/model_bench.py --compile-only --compile-jobs 4 \
    --cache-dir "$CACHE" $SETTINGS --models $MODELS >"$OUT/compile.txt" 2>&1
for model in $MODELS; do
  timeout 150 "$PY" benchmarks/profile_step.py --model "$model" $SETTINGS \
      --mode train infer --cache-dir "$CACHE" --top 30 \
      --save "$PROFILES/profiles/$model" >"$OUT/profile_$model.txt" 2>&1
done
tar czf "$OUT/profiles.tgz" -C "$PROFILES" profiles
ls -l "$OUT"
