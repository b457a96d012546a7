#!/bin/bash
# One profiled training and inference step of each model, static and
# CondConv, on one GPU (bfloat16, batch 128), kept for reading anywhere:
#
#   OUT=/some/folder benchmarks/gpu_profile.sh
#   tar xzf /some/folder/profiles.tgz -C /some/folder  # anywhere, later
#   python -m benchmarks.profile_step --mode train infer \
#       --load /some/folder/profiles/resnet50
#
# Each variant compiles in the process that profiles it (minutes on a GPU;
# compiles side by side autotune side by side on the one device), into a
# persistent cache that a second call on the same machine reuses.
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
for model in $MODELS; do
  timeout 270 "$PY" -m benchmarks.profile_step --model "$model" $SETTINGS \
      --mode train infer --cache-dir "$CACHE" --top 30 \
      --save "$PROFILES/profiles/$model" >"$OUT/profile_$model.txt" 2>&1
  # After each model, so a later one cut off leaves the earlier profiles.
  tar czf "$OUT/profiles.tgz" -C "$PROFILES" profiles
done
ls -l "$OUT"
