"""Batch-1 latency of exported models in LiteRT and ONNX Runtime, beside JAX.

    python -m benchmarks.export_bench                       # the docs table
    python -m benchmarks.export_bench --models efficientnet_b0 \\
        --runtimes litert --strategies auto 'depthwise=vmap'  # forms
    python -m benchmarks.export_bench --models efficientnet_b0 --floor

For every paper model, static and CondConv-8, in one process: JAX's own jitted eval-mode forward (XLA:CPU, the
CPU forms), the LiteRT export (`export.to_tflite`, run by `ai_edge_litert`'s
interpreter, XNNPACK) and the ONNX export (`export.to_onnx`, ONNX Runtime's
CPU provider), all at batch 1, float32, --threads threads, random weights
and input. A cell is the median of --runs calls in a block of their own,
the lower of two such blocks (`blocked_ms`). Each export's largest
relative difference from the Flax outputs is printed under the table
(and must be below GROSS_ERROR, see there). CC/static is the CondConv model's throughput
over its static twin's (static latency / CondConv latency), per runtime.

The runtime's own reference: Keras's EfficientNetB0 (random weights)
through the same TFLite converter and interpreter (`--keras`, on by
default with efficientnet_b0).

--strategies times the CondConv twin with each strategy spec in the export
(`auto` is the per-runtime rule, `strategy.choose`): how the rule was
chosen. --floor adds a CondConv twin whose convs use expert 0's constant
kernel after computing (and consuming) the mixed kernels: the cost of the
routing and of reading every expert once, a bound no form that mixes
kernels can beat. --quantize adds LiteRT dynamic-range (int8-weight) rows.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.model_bench import ENTRIES, PAPER_MODELS, machine
from condconv_jax import cpu_setup, export, ops, static_ops
from condconv_jax.export import runtimes
from condconv_jax.models import get_model

THREADS = 2
# A sanity bound only: at random initialization with eval-mode BatchNorm
# (initial statistics) the CondConv twins saturate their activations and
# any two float32 implementations differ by up to ~1e-2 (JAX's own float32
# against float64: 6.7e-3 on CondConv-MobileNetV2 at width 0.35); the
# 1e-4 checks are tests/test_export.py's, on trained-like statistics.
GROSS_ERROR = 0.05


def blocked_ms(calls: dict, runs: int, rounds: int = 2) -> dict:
  """Each call's latency in ms: the median of `runs` calls in a block of its
  own (after 3 warm-up calls and a pause, so that the threads of what ran
  before have gone idle), the lower of `rounds` such blocks."""
  best = {}
  for _ in range(rounds):
    for key, call in calls.items():
      time.sleep(0.5)
      for _ in range(3):
        call()
      times = []
      for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
      best[key] = min(best.get(key, np.inf), 1e3 * float(np.median(times)))
  return best


@contextlib.contextmanager
def mixing_floor():
  """CondConv's convs as expert 0's constant conv plus a term that reads
  every mixed kernel (the routing and the kernel mixing stay)."""

  def floor(x, experts, routing_weights, geom, precision):
    kernels = ops.mix_experts(routing_weights, experts, precision)
    used = jnp.sum(kernels, axis=tuple(range(1, kernels.ndim)))
    y = static_ops.static_conv(x, experts[0], geom, precision)
    return y + 1e-30 * used[:, None, None, None]

  saved = dict(ops._STRATEGY_FNS)  # pylint: disable=protected-access
  ops._STRATEGY_FNS.update({name: floor for name in saved})  # pylint: disable=protected-access
  try:
    yield
  finally:
    ops._STRATEGY_FNS.update(saved)  # pylint: disable=protected-access


def build_calls(name: str, experts: int, strategy: str,
                runtimes_: list[str], quantize: bool) -> tuple[dict, dict]:
  """({column: a batch-1 call}, {column: export size and error}) for one
  model variant: JAX, then each runtime's export, checked against Flax."""
  entry = ENTRIES[name]
  kwargs = {'strategy': strategy} if experts and strategy != 'floor' else {}
  model = get_model(entry.model, num_experts=experts, **kwargs)
  shape = (1, entry.size, entry.size, 3)
  images = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  variables = jax.jit(lambda: model.init(jax.random.key(0), images,
                                         train=False))()
  infer = jax.jit(export.inference_function(model, variables))
  expected = [np.asarray(o) for o in infer(images)]
  calls = {'jax': lambda: jax.block_until_ready(infer(images))}
  info = {}
  floor = mixing_floor() if strategy == 'floor' else contextlib.nullcontext()
  with floor:
    for runtime in runtimes_:
      for quantized in ((False, True) if quantize and runtime == 'litert'
                        else (False,)):
        key = runtime + ('_int8' if quantized else '')
        if runtime == 'litert':
          blob = export.to_tflite(model, variables, shape, quantize=(
              'dynamic_range' if quantized else None))
          calls[key] = _litert_call(runtimes.tflite_interpreter(
              blob, THREADS), images)
          outputs = runtimes.run_tflite(blob, images, THREADS)
        else:
          blob = export.to_onnx(model, variables, shape)
          session = runtimes.onnx_session(blob, THREADS)
          feed = {session.get_inputs()[0].name: images}
          calls[key] = functools.partial(session.run, None, feed)
          outputs = calls[key]()
        error = runtimes.relative_error(outputs, expected)
        if not quantized and strategy != 'floor' and error > GROSS_ERROR:
          raise AssertionError(f'{name} E={experts} {runtime}: relative '
                               f'difference {error:.1e} from Flax')
        info[key] = (len(blob) / 1e6, error)
  return calls, info


def _litert_call(interpreter, images):
  index = interpreter.get_input_details()[0]['index']

  def call():
    interpreter.set_tensor(index, images)
    interpreter.invoke()
  return call


def keras_efficientnet_b0(runs: int) -> float:
  """Keras's EfficientNetB0 through TF's TFLite converter, in LiteRT."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import keras  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  model = keras.applications.EfficientNetB0(weights=None)
  blob = tf.lite.TFLiteConverter.from_keras_model(model).convert()
  images = np.random.default_rng(0).uniform(
      0, 255, (1, 224, 224, 3)).astype(np.float32)
  call = _litert_call(runtimes.tflite_interpreter(blob, THREADS), images)
  return blocked_ms({'keras': call}, runs)['keras']


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', nargs='+', default=[
      m for m in PAPER_MODELS if m != 'efficientnet_b0_4e'])
  parser.add_argument('--runtimes', nargs='+', default=['litert', 'onnx'],
                      choices=['litert', 'onnx'])
  parser.add_argument('--strategies', nargs='+', default=['auto'],
                      help='CondConv strategy specs in the export.')
  parser.add_argument('--floor', action='store_true',
                      help='add the kernel-mixing floor (see the doc).')
  parser.add_argument('--quantize', action='store_true',
                      help='add LiteRT dynamic-range quantized rows.')
  parser.add_argument('--no-keras', dest='keras', action='store_false')
  parser.add_argument('--runs', type=int, default=20)
  args = parser.parse_args()
  unknown = sorted(set(args.models) - set(ENTRIES))
  if unknown:
    parser.error(f'unknown models {unknown}; known: {sorted(ENTRIES)}')
  cpu_setup.use_tcmalloc()
  print(f'# {machine()}, batch 1, float32, {THREADS} threads, median of '
        f'{args.runs}; {time.strftime("%Y-%m-%d")}')
  keys = ['jax'] + [r + s for r in args.runtimes
                    for s in (('', '_int8') if args.quantize and r == 'litert'
                              else ('',))]
  print('| model | experts | form | ' + ' | '.join(f'{k} ms' for k in keys) +
        ' | ' + ' | '.join(f'{k} CC/static' for k in keys) + ' |')
  print('|---|---:|---|' + '---:|' * (2 * len(keys)))
  errors = []
  for name in args.models:
    entry = ENTRIES[name]
    variants = [(0, 'static')] + [(entry.experts, spec)
                                  for spec in args.strategies]
    if args.floor:
      variants.append((entry.experts, 'floor'))
    calls, infos = {}, {}
    for experts, spec in variants:
      built, infos[experts, spec] = build_calls(
          name, experts, 'auto' if spec == 'static' else spec,
          args.runtimes, args.quantize)
      calls.update({(spec, key): call for key, call in built.items()})
    latency = blocked_ms(calls, args.runs)
    errors.extend(f'{entry.label} E={experts} {spec} {key}: {error:.1e}'
                  for (experts, spec), info in infos.items()
                  for key, (_, error) in info.items())
    for experts, spec in variants:
      row = {key: latency[(spec, key)] for key in keys}
      ratios = ('' if spec == 'static' else ' | '.join(
          f'{latency[("static", k)] / row[k]:.2f}' for k in keys))
      print(f'| {entry.label} | {experts} | {spec} | ' +
            ' | '.join(f'{row[k]:.1f}' for k in keys) + ' | ' +
            (ratios or ' | '.join('' for _ in keys)) + ' |', flush=True)
    del calls
  print('\nLargest relative difference from the Flax outputs:\n' +
        '\n'.join(errors))
  if args.keras and 'litert' in args.runtimes and any(
      ENTRIES[m].model == 'efficientnet_b0' for m in args.models):
    print(f'\nKeras EfficientNetB0, LiteRT: {keras_efficientnet_b0(args.runs):.1f}'
          f' ms')
  sys.stdout.flush()


if __name__ == '__main__':
  main()
