#!/bin/bash
# The "fused" CondConv strategy (condconv_jax/fused.py, Pallas/Triton) on one
# NVIDIA GPU, against "direct" and "auto", for docs/speed.md ("The fused
# strategy"). Its kernels have never run on a GPU before this script:
# the check part comes first and says whether the rest means anything.
#
#   OUT=/some/folder PARTS="check layers" benchmarks/gpu_fused.sh
#
# PARTS (default: all, in this order; each part fits one 600 s command):
#   check    fused vs direct on the GPU, values and gradients (x, experts,
#            routing weights, bias) for 1x1, depthwise 3x3/5x5 and 3x3
#            layers, bfloat16 and float32; then the layer shapes of the
#            next part compiled once each (Triton compile errors show here)
#   layers   layer_bench rows (bfloat16, batches 8 and 128): 1x1, depthwise
#            and 3x3, strategies direct fused auto
#   b0       model_bench EfficientNet-B0, batch 128, bfloat16: static,
#            CondConv auto, CondConv fused (training and inference steps)
#   r50      the same for ResNet-50
#   profile  one profiled training and inference step of CC-EfficientNet-B0
#            (batch 128, bfloat16) with auto and with fused: the tables of
#            benchmarks/profile_step.py, and each step's trace and HLO in
#            $OUT/profiles.tgz (labels CondConv-8_auto, CondConv-8_fused:
#            profile_step.load_profile(folder, label, mode), then
#            profile_step.breakdown; or open a trace in Perfetto)
# One file per part in $OUT (default /tmp/gpu_fused); each command has its
# own timeout, so a failing part leaves the others' files. Compiles go to a
# persistent cache ($CACHE) that a second call on the same machine reuses.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_fused}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PYTHON:-python3}
CACHE=${CACHE:-/tmp/jax_cache}
PARTS=${PARTS:-check layers b0 r50 profile}
# Small sizes for a CPU smoke test of this script (interpret mode is slow):
#   JAX_PLATFORMS=cpu TINY=1 OUT=/tmp/f PARTS=... benchmarks/gpu_fused.sh
if [[ -n ${TINY:-} ]]; then
  BATCH=2; LAYER_BATCHES="2"; LAYER_SIZE="--size 4"; MODEL_SIZE="--size 32"
  STEPS=1
else
  BATCH=128; LAYER_BATCHES="8 128"; LAYER_SIZE=""; MODEL_SIZE=""; STEPS=10
fi

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  grep -m1 'model name' /proc/cpuinfo
  "$PY" -c 'import jax, flax; print(jax.__version__, flax.__version__,
jax.devices())'
} >"$OUT/machine.txt" 2>&1

check() {
  timeout "${1:-300}" "$PY" - "$BATCH" <<'EOF'
import sys, time
import jax, jax.numpy as jnp, numpy as np
import condconv_jax
print(jax.devices(), flush=True)
tiny = int(sys.argv[1]) < 8
# (name, batch, size, Cin, Cout, kernel, stride, groups)
cases = [('1x1', 8, 14, 96, 80, 1, 1, 1), ('1x1 s2 odd', 4, 15, 40, 24, 1, 2, 1),
         ('dw3x3', 8, 14, 96, 96, 3, 1, 96), ('dw5x5 s2', 4, 15, 40, 40, 5, 2, 40),
         ('3x3', 8, 14, 64, 96, 3, 1, 1), ('3x3 s2 odd', 4, 15, 24, 40, 3, 2, 1)]
if tiny:
  cases = [(n, 2, 5, 8, 8 if g > 1 else 6, k, s, 8 if g > 1 else 1)
           for n, _, _, _, _, k, s, g in cases]
worst = 0.0
for name, b, size, cin, cout, k, stride, groups in cases:
  rng = np.random.default_rng(0)
  for dtype, tol in ((jnp.float32, 1e-4), (jnp.bfloat16, 3e-2)):
    arrays = [jnp.asarray(rng.standard_normal(s, np.float32), dtype) for s in
              ((b, size, size, cin), (8, k, k, cin // groups, cout), (8, cout))]
    arrays.insert(2, jnp.asarray(rng.uniform(0.05, 1, (b, 8)), dtype))
    dy = jnp.asarray(rng.standard_normal((b, -(-size // stride),
                                          -(-size // stride), cout)), dtype)
    def run(strategy, dy, *arrays):
      f = lambda *a: condconv_jax.conditional_conv(
          *a, strides=stride, feature_group_count=groups, strategy=strategy)
      y, vjp = jax.vjp(f, *arrays)
      return (y, *vjp(dy))
    run = jax.jit(run, static_argnums=0)
    start = time.time()
    fused = jax.block_until_ready(run('fused', dy, *arrays))
    seconds = time.time() - start
    direct = run('direct', dy, *arrays)
    errs = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - d.astype(jnp.float32)))
                  / max(float(jnp.max(jnp.abs(d.astype(jnp.float32)))), 1e-30))
            for a, d in zip(fused, direct)]
    worst = max(worst, max(errs) / tol)
    print(f'{name:<11} {jnp.dtype(dtype).name:<8} rel err y, dx, dexperts, '
          f'drouting, dbias: ' + ' '.join(f'{e:.1e}' for e in errs) +
          f' (tol {tol:.0e}) {"OK" if max(errs) <= tol else "MISMATCH"}; '
          f'compile+run {seconds:.1f}s', flush=True)
print('ALL OK' if worst <= 1 else 'MISMATCH: do not trust the timings')
EOF
}

layers() {  # layer_bench, bfloat16: direct vs fused (auto for reference)
  timeout "$1" "$PY" -m benchmarks.layer_bench --dtype bfloat16 \
      --batches $LAYER_BATCHES $LAYER_SIZE --strategies auto direct fused \
      --repeats 3 --target-s 0.05 --cases "${@:2}"
}

models() {  # model_bench: static, CondConv auto, CondConv fused
  timeout "$1" "$PY" -m benchmarks.model_bench --models "$2" \
      --batch "$BATCH" --dtype bfloat16 --cc-strategies auto fused \
      --steps "$STEPS" --processes 1 --cache-dir "$CACHE" $MODEL_SIZE
}

profile() {  # auto and fused CC-EfficientNet-B0 steps, profiled and kept
  timeout "$1" "$PY" - "$BATCH" "$OUT" "$CACHE" ${MODEL_SIZE#--size } <<'EOF'
import dataclasses, pathlib, sys, tarfile, tempfile
import jax
from benchmarks import model_bench, profile_step
batch, out, cache = int(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
model_bench.use_compilation_cache(cache)
entry = model_bench.ENTRIES['efficientnet_b0']
if len(sys.argv) > 4:
  entry = dataclasses.replace(entry, size=int(sys.argv[4]))
keep = pathlib.Path(tempfile.mkdtemp()) / 'profiles' / 'efficientnet_b0_fused'
about = {'model': 'efficientnet_b0', 'batch': batch, 'dtype': 'bfloat16',
         'device': jax.devices()[0].device_kind, 'jax': jax.__version__}
results = {}
for strategy in ('auto', 'fused'):
  label = f'CondConv-{entry.experts} {strategy}'
  runner = model_bench.jax_runner(entry, entry.experts, batch, 'bfloat16',
                                  strategy)
  for mode, compiled, step in (
      ('train', runner.compiled_train, runner.train_step),
      ('infer', runner.compiled_infer, runner.infer_step)):
    trace, hlo = profile_step.profile_one_step(step), compiled.as_text()
    profile_step.save_profile(keep, about, label.replace(' ', '_'), mode,
                              trace, hlo)
    results.setdefault(mode, {})[label] = profile_step.breakdown(trace, hlo)
  with tarfile.open(out / 'profiles.tgz', 'w:gz') as tar:
    tar.add(keep.parent, arcname='profiles')
for mode, table in results.items():
  profile_step.print_tables(table, mode, 30)
EOF
}

for part in $PARTS; do
  case $part in
    check) check 300 >"$OUT/check.txt" 2>&1 ;;
    layers)
      layers 280 pw512 pw1024 >"$OUT/layers_pw.txt" 2>&1
      layers 280 dw512 conv128 >"$OUT/layers_dw_kxk.txt" 2>&1 ;;
    b0) models 560 efficientnet_b0 >"$OUT/b0_bf16_$BATCH.md" 2>&1 ;;
    r50) models 560 resnet50 >"$OUT/r50_bf16_$BATCH.md" 2>&1 ;;
    profile) profile 560 >"$OUT/profile_b0.txt" 2>&1 ;;
    *) echo "unknown part $part" >&2 ;;
  esac
done
ls -l "$OUT"
