#!/bin/bash
# The README's GPU numbers and its second-CPU layer table, on one NVIDIA GPU
# machine whose python3 has JAX (CUDA), flax, optax, PyTorch and timm:
#
#   OUT=/some/folder benchmarks/gpu_bench.sh
#
# About 10 minutes on an H200 with 16 host cores (the README's figures came
# from these commands, run in three pieces). One file per run in $OUT
# (default /tmp/gpu_bench); every run has its own timeout, so a slow or
# failing one leaves the others' files. Compiling a model's training step
# takes 30-150 s there, far longer than timing it, so the model variants
# compile first, in parallel, into a persistent cache.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_bench}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PYTHON:-python3}
CACHE=${CACHE:-/tmp/jax_cache}
GPU_CORES=0-13  # the host's last two cores (of 16) run the CPU layer table

pin() {  # cores command...: run pinned to cores, where taskset exists
  local cores=$1; shift
  if command -v taskset >/dev/null; then taskset -c "$cores" "$@"; else "$@"; fi
}

models() {  # name timeout args...: model_bench on the GPU, to $OUT/name.md
  local name=$1 limit=$2; shift 2
  pin $GPU_CORES timeout "$limit" "$PY" benchmarks/model_bench.py \
      --steps 10 --processes 1 --cache-dir "$CACHE" "$@" >"$OUT/$name.md" 2>&1
}

layers() {  # name timeout args...: layer_bench on the GPU, bfloat16
  local name=$1 limit=$2; shift 2
  (cd benchmarks && pin $GPU_CORES timeout "$limit" "$PY" layer_bench.py \
      --dtype bfloat16 --batches 1 8 128 256 --strategies auto direct vmap \
      experts --repeats 3 --target-s 0.05 "$@") >"$OUT/$name.txt" 2>&1
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  grep -m1 'model name' /proc/cpuinfo
  "$PY" -c 'import jax, flax, torch, timm; print(jax.__version__,
flax.__version__, torch.__version__, timm.__version__, jax.devices())'
} >"$OUT/machine.txt" 2>&1

# The CPU layer table on two host cores nobody else uses here, alongside.
(cd benchmarks && JAX_PLATFORMS=cpu pin 14,15 timeout 500 "$PY" \
    layer_bench.py --batches 1 8 64 --strategies auto direct loop vmap \
    >"$OUT/layers_host_cpu.txt" 2>&1) &

# Compile first (both at once), then time one model per process.
for args in "--models resnet50 --cc-strategies auto vmap" \
            "--models efficientnet_b0"; do
  pin $GPU_CORES timeout 200 "$PY" benchmarks/model_bench.py --compile-only \
      --compile-jobs 3 --cache-dir "$CACHE" --batch 128 --dtype bfloat16 \
      $args >>"$OUT/compile.txt" 2>&1 &
done
wait %2 %3
models resnet50_bf16_128 100 --models resnet50 --batch 128 --dtype bfloat16 \
    --cc-strategies auto vmap
models b0_bf16_128 110 --models efficientnet_b0 --batch 128 --dtype bfloat16
layers layers_bf16 80 --cases pw512 pw1024
layers layers_bf16_dw_kxk 80 --cases dw512 conv128
wait
ls -l "$OUT"
