#!/bin/bash
# The GPU benchmarks of docs/speed.md, on one NVIDIA GPU machine whose
# python3 has JAX (CUDA), flax, optax, PyTorch and timm:
#
#   OUT=/some/folder PARTS="b0_depthwise" benchmarks/gpu_bench.sh
#
# PARTS (default: all of them, far more than one 10-minute command; each
# part fits one 600 s command): b0_depthwise (CC-EfficientNet-B0 with its
# depthwise CondConv layers in the candidate forms of depthwise_variants.py),
# bf16_128 (ResNet-50 with a vmap twin, EfficientNet-B0: the GPU table in
# docs/speed.md), float32, bf16_256, layers (the 1x1, depthwise and 3x3
# layer rows) and host_cpu (the second-CPU layer table, on two host cores).
# One file per run in $OUT (default /tmp/gpu_bench); every run has its own
# timeout, so a slow or failing one leaves the others' files. Compiling is
# most of the time (docs/speed.md gives the compile times), and compiles
# running side by side autotune side by side on the one GPU. So every
# variant compiles in the process that times it, one after another, into a
# persistent cache ($CACHE) that a second call on the same machine reuses.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_bench}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PYTHON:-python3}
CACHE=${CACHE:-/tmp/jax_cache}
PARTS=${PARTS:-bf16_128 b0_depthwise float32 bf16_256 layers host_cpu}
GPU_CORES=0-13  # the host's last two cores (of 16) run the CPU layer table

pin() {  # cores command...: run pinned to cores, where taskset exists
  local cores=$1; shift
  if command -v taskset >/dev/null; then taskset -c "$cores" "$@"; else "$@"; fi
}

models() {  # name timeout args...: to $OUT/name.md
  local name=$1 limit=$2; shift 2
  pin $GPU_CORES timeout "$limit" "$PY" -m benchmarks.model_bench \
      --steps 10 --processes 1 --cache-dir "$CACHE" "$@" >"$OUT/$name.md" 2>&1
}

layers() {  # name timeout args...: layer_bench on the GPU, bfloat16
  local name=$1 limit=$2; shift 2
  (pin $GPU_CORES timeout "$limit" "$PY" -m benchmarks.layer_bench \
      --dtype bfloat16 --batches 1 8 128 256 --strategies auto direct vmap \
      experts --repeats 3 --target-s 0.05 "$@") >"$OUT/$name.txt" 2>&1
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  grep -m1 'model name' /proc/cpuinfo
  "$PY" -c 'import jax, flax, torch, timm; print(jax.__version__,
flax.__version__, torch.__version__, timm.__version__, jax.devices())'
} >"$OUT/machine.txt" 2>&1

if [[ " $PARTS " == *" host_cpu "* ]]; then
  # Two host cores nobody else uses here, alongside the GPU parts.
  (JAX_PLATFORMS=cpu pin 14,15 timeout 500 "$PY" -m benchmarks.layer_bench \
      --batches 1 8 64 --strategies auto direct loop vmap \
      >"$OUT/layers_host_cpu.txt" 2>&1) &
fi
for part in $PARTS; do
  case $part in
    host_cpu) ;;  # started above
    b0_depthwise)
      # Most telling first: each variant prints its own figures once built.
      pin $GPU_CORES timeout 560 "$PY" -m benchmarks.depthwise_variants \
          --batch 128 --dtype bfloat16 --variants static auto \
          barrier_taps_dk barrier_xla_dk depthwise=vmap barrier_one_pass_dk \
          --cache-dir "$CACHE" >"$OUT/b0_depthwise_bf16_128.md" 2>&1 ;;
    bf16_128)
      models resnet50_bf16_128 310 --models resnet50 --batch 128 \
          --dtype bfloat16 --cc-strategies auto vmap
      models b0_bf16_128 250 --models efficientnet_b0 --batch 128 \
          --dtype bfloat16 ;;
    float32)
      models float32_128 560 --models resnet50 efficientnet_b0 --batch 128 \
          --dtype float32 ;;
    bf16_256)
      models bf16_256 560 --models resnet50 efficientnet_b0 --batch 256 \
          --dtype bfloat16 ;;
    layers)
      layers layers_bf16 80 --cases pw512 pw1024
      layers layers_bf16_dw_kxk 120 --cases dw512 conv128 ;;
    *) echo "unknown part $part" >&2 ;;
  esac
done
wait
ls -l "$OUT"
