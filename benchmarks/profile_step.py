"""Where a training step's time goes: the JAX profiler on one step.

    python benchmarks/profile_step.py --model mobilenet_v1 --batch 16
    python benchmarks/profile_step.py --model mobilenet_v2 --mode infer

Builds a model's static and CondConv training steps (or inference, the same
ones `model_bench.py` times), profiles one step of each with `jax.profiler`
(after two warm-up steps), and adds up the duration of every XLA operation
(XLA:CPU runs each as one thunk) by what it computes. The category comes from
the operation's metadata in the optimized HLO: JAX records the module path and
named scope of every op (`mix_experts`, `conditional_conv_<strategy>`,
`static_conv_<form>`, `routing` in this package), and `transpose(...)` marks
the backward pass. XLA:CPU runs independent operations concurrently (and
one waits for the other's threads), so each moment of the step is split
evenly among the operations running then: the shares add up to the step's
busy time, but an operation that ran beside others is only approximately
placed; confirm a finding by changing that operation and timing the step.
Prints the categories side by side, then the slowest operations of the
CondConv step with what they are.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import tempfile

import model_bench

CATEGORIES = ('kernel mixing', 'CondConv conv', 'routing', 'static conv',
              'other (BN, activations, pads, copies)', 'optimizer update')


def op_names(hlo_text: str) -> dict[str, str]:
  """Top-level instruction name -> its op_name metadata."""
  names = {}
  for match in re.finditer(r'^\s*(?:ROOT )?%?([\w.-]+) = .*?op_name="([^"]*)"',
                           hlo_text, re.MULTILINE):
    names.setdefault(match.group(1), match.group(2))
  return names


def category(op_name: str) -> str:
  if op_name.startswith('jit(train)') and 'jvp(' not in op_name:
    return 'optimizer update'
  if '/mix_experts' in op_name:
    return 'kernel mixing'
  if '/conditional_conv_' in op_name:
    return 'CondConv conv'
  if '/routing' in op_name:
    return 'routing'
  if '/static_conv_' in op_name:
    return 'static conv'
  return 'other (BN, activations, pads, copies)'


def shared_durations(intervals) -> collections.Counter:
  """name -> ms, each moment of wall time split evenly among the operations
  running then; the values add up to the time anything ran."""
  edges = sorted({t for _, start, end in intervals for t in (start, end)})
  shares = collections.Counter()
  active_at = collections.defaultdict(list)
  for name, start, end in intervals:
    active_at[start].append((name, end))
  running = []
  for left, right in zip(edges, edges[1:]):
    running = [(n, e) for n, e in running + active_at[left] if e > left]
    for name, _ in running:
      shares[name] += (right - left) / len(running) / 1e3
  return shares


def profile_one_step(step, log_dir: pathlib.Path, names) -> dict[str, float]:
  """Operation name -> its share (ms) of one profiled step."""
  import jax
  step()
  step()
  jax.profiler.start_trace(str(log_dir), create_perfetto_trace=True)
  step()
  jax.profiler.stop_trace()
  trace, = log_dir.glob('**/perfetto_trace.json.gz')
  with gzip.open(trace) as f:
    events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  return shared_durations([
      (e['name'], e['ts'], e['ts'] + e.get('dur', 0)) for e in events
      if e.get('ph') == 'X' and e['name'] in names])


def breakdown(runner, mode, log_dir):
  compiled, step = ((runner.compiled_train, runner.train_step)
                    if mode == 'train' else
                    (runner.compiled_infer, runner.infer_step))
  names = op_names(compiled.as_text())
  durations = profile_one_step(step, log_dir, names)
  per_category = collections.Counter()
  ops = []
  for thunk, ms in durations.items():
    per_category[category(names[thunk])] += ms
    ops.append((ms, thunk, names[thunk]))
  direction = collections.Counter()
  for ms, _, name in ops:
    direction['backward' if 'transpose(' in name else 'forward'] += ms
  return per_category, direction, sorted(ops, reverse=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='mobilenet_v1',
                      choices=list(model_bench.ENTRIES))
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--dtype', default='float32',
                      choices=model_bench.DTYPES)
  parser.add_argument('--mode', default='train', choices=['train', 'infer'])
  parser.add_argument('--top', type=int, default=12)
  args = parser.parse_args()
  from condconv_jax import cpu_setup
  cpu_setup.use_tcmalloc()
  import jax

  entry = model_bench.ENTRIES[args.model]
  print(f'# {model_bench.machine()}; jax {jax.__version__} '
        f'({jax.devices()[0].device_kind}); {entry.label}, batch '
        f'{args.batch}, {args.dtype}; one profiled {args.mode} step each; '
        f'{cpu_setup.allocator()}')
  results = {}
  for label, experts in (('static', 0), (f'CondConv-{entry.experts}',
                                         entry.experts)):
    runner = model_bench.jax_runner(entry, experts, args.batch, args.dtype)
    with tempfile.TemporaryDirectory() as log_dir:
      results[label] = breakdown(runner, args.mode, pathlib.Path(log_dir))
  labels = list(results)
  print(f'| ms per step | {" | ".join(labels)} |')
  print('|---|' + '---:|' * len(labels))
  for name in CATEGORIES:
    print(f'| {name} | ' + ' | '.join(
        f'{results[label][0][name]:.0f}' for label in labels) + ' |')
  for name in ('forward', 'backward'):
    print(f'| all {name} ops | ' + ' | '.join(
        f'{results[label][1][name]:.0f}' for label in labels) + ' |')
  print(f'| all ops (busy time) | ' + ' | '.join(
      f'{sum(results[label][1].values()):.0f}' for label in labels) + ' |')
  print(f'\n# slowest operations of the {labels[-1]} {args.mode} step')
  for ms, thunk, name in results[labels[-1]][2][:args.top]:
    print(f'{ms:8.1f} ms  {thunk:<28} {category(name):<14.14} {name}')


if __name__ == '__main__':
  main()
