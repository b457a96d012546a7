"""Where a training step's time goes: the JAX profiler on one step.

    python -m benchmarks.profile_step --model mobilenet_v1 --batch 16
    python -m benchmarks.profile_step --model mobilenet_v2 --mode train infer

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
On a GPU the operations are the device's kernels (the trace's GPU
process), each named by the HLO instruction it runs (inside XLA's CUDA
graphs only fusions are: cuBLAS and cuDNN kernels there count as
unattributed, see `timed_events`). Prints the categories
side by side, then the slowest operations of the CondConv step with what
they are. `--save DIR` keeps each step's trace and optimized HLO (gzipped),
and `--load DIR` attributes saved ones again without a device, so a step
profiled on a GPU can be read on any machine.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import tempfile
from typing import NamedTuple

from benchmarks import model_bench
from condconv_jax import cpu_setup

# Time no op_name places: library kernels in XLA's CUDA graphs (GPU), copies.
UNNAMED = 'no op_name (library kernels, copies)'
CATEGORIES = ('kernel mixing', 'CondConv conv', 'routing', 'static conv',
              'other (BN, activations, pads, copies)', 'optimizer update',
              UNNAMED)

_HEADER = re.compile(r'^\s*(?:ENTRY\s+)?%?([\w.-]+)\s*\(.*\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.-]+) = ')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r'calls=%?([\w.-]+)')


def op_names(hlo_text: str) -> dict[str, str]:
  """Every instruction's name -> its op_name metadata ('' if none).

  XLA gives some fusions no op_name of their own (a scheduling_name only):
  those take the op_name of the computation they call, its root's, else
  that of the last instruction there that has one (HLO lists operands
  first, so that one is nearest the fusion's outputs).
  """
  own, calls, inside, roots = {}, {}, {}, set()
  called_from = collections.defaultdict(list)  # computation -> what it calls
  computation = None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header:
      computation = header.group(1)
      continue
    instruction = _INSTRUCTION.match(line)
    if not instruction:
      continue
    name, op_name = instruction.group(1), _OP_NAME.search(line)
    own.setdefault(name, op_name.group(1) if op_name else '')
    if op_name and computation not in roots:
      inside[computation] = op_name.group(1)
    if line.lstrip().startswith('ROOT '):
      roots.add(computation)
    target = _CALLS.search(line)
    if target:
      called_from[computation].append(target.group(1))
      if not op_name:
        calls[name] = target.group(1)

  def named(computation, seen):  # a fusion inside a fusion: look further in
    if computation in inside or computation in seen:
      return inside.get(computation, '')
    seen.add(computation)
    return next(filter(None, (named(c, seen) for c in called_from[computation])),
                '')

  return {**own, **{name: named(target, set())
                    for name, target in calls.items()}}


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


def timed_events(trace: dict | list, instructions
                 ) -> list[tuple[str | None, float, float]]:
  """(HLO instruction or None, start us, end us) of what a trace timed.

  XLA:CPU runs each operation as a host thunk named by its instruction (the
  trace's other host events are not operations). On a GPU the host only
  launches kernels: every event of the device's process (its name has
  'GPU') took device time, and names its instruction in args['hlo_op'] -
  except inside a command buffer (XLA's CUDA graphs), where hlo_op names the
  buffer. There a fusion's kernel is named after the fusion ('.' as '_'; XLA
  reuses one kernel for identical fusions, whose launches then all land on
  the first of them), and a library kernel (cuBLAS, cuDNN) names no
  instruction: None.
  """
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  processes = {e.get('pid'): e.get('args', {}).get('name', '')
               for e in events
               if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  complete = [e for e in events if e.get('ph') == 'X']
  on_gpu = [e for e in complete if 'GPU' in processes.get(e.get('pid'), '')]
  if not on_gpu:
    return [(e['name'], e['ts'], e['ts'] + e.get('dur', 0)) for e in complete
            if e['name'] in instructions]
  timed = []
  for e in on_gpu:
    candidates = (e.get('args', {}).get('hlo_op'), e['name'],
                  re.sub(r'_(\d+)$', r'.\1', e['name']))
    op = next((c for c in candidates if c in instructions), None)
    timed.append((op, e['ts'], e['ts'] + e.get('dur', 0)))
  return timed


def profile_one_step(step) -> dict:
  """The perfetto trace (parsed JSON) of one step, after two warm-up steps."""
  import jax
  step()
  step()
  with tempfile.TemporaryDirectory() as log_dir:
    jax.profiler.start_trace(log_dir, create_perfetto_trace=True)
    step()
    jax.profiler.stop_trace()
    trace, = pathlib.Path(log_dir).glob('**/perfetto_trace.json.gz')
    with gzip.open(trace) as f:
      return json.load(f)


class Breakdown(NamedTuple):
  """One profiled step: ms per category and per direction (forward,
  backward: the time op_names place), and the operations, slowest first:
  (ms, instruction, op_name, launches)."""
  categories: collections.Counter
  directions: collections.Counter
  ops: list


def breakdown(trace, hlo_text: str) -> Breakdown:
  names = op_names(hlo_text)
  intervals = timed_events(trace, names)
  if not any(op for op, _, _ in intervals):
    raise ValueError('no operation in the trace names an instruction of the '
                     'HLO: is this the trace of that executable?')
  launches = collections.Counter(op for op, _, _ in intervals)
  categories, directions, ops = (collections.Counter(),
                                 collections.Counter(), [])
  for op, ms in shared_durations(intervals).items():
    op_name = names.get(op, '')
    categories[category(op_name) if op_name else UNNAMED] += ms
    if op_name:
      directions['backward' if 'transpose(' in op_name else 'forward'] += ms
    ops.append((ms, op or '(library kernel)', op_name, launches[op]))
  return Breakdown(categories, directions, sorted(ops, reverse=True))


def _paths(folder: pathlib.Path, label: str, mode: str):
  stem = f'{label}_{mode}'
  return folder / f'{stem}_trace.json.gz', folder / f'{stem}_hlo.txt.gz'


def save_profile(folder: pathlib.Path, about: dict, label: str, mode: str,
                 trace, hlo_text: str):
  """Keeps one step's trace and HLO (gzipped), and what was profiled."""
  folder.mkdir(parents=True, exist_ok=True)
  (folder / 'about.json').write_text(json.dumps(about, indent=1))
  trace_path, hlo_path = _paths(folder, label, mode)
  with gzip.open(trace_path, 'wt') as f:
    json.dump(trace, f)
  hlo_path.write_bytes(gzip.compress(hlo_text.encode()))


def load_about(folder: pathlib.Path) -> dict:
  try:
    return json.loads((folder / 'about.json').read_text())
  except FileNotFoundError:
    raise SystemExit(f'{folder} has no about.json: --load takes a folder '
                     'that --save filled.') from None


def load_profile(folder: pathlib.Path, label: str, mode: str):
  """(trace, HLO text) that save_profile kept."""
  trace_path, hlo_path = _paths(folder, label, mode)
  if not (trace_path.exists() and hlo_path.exists()):
    raise SystemExit(f'no saved {mode} step of the {label} model in '
                     f'{folder}: profile it with --mode {mode} --save.')
  with gzip.open(trace_path) as f:
    return json.load(f), gzip.decompress(hlo_path.read_bytes()).decode()


def profile_steps(args, entry, label: str, experts: int, about: dict) -> dict:
  """mode -> (trace, HLO text) of one model's steps, both modes from one
  compiled runner; kept in --save if given."""
  runner = model_bench.jax_runner(entry, experts, args.batch, args.dtype)
  profiles = {}
  for mode in args.mode:
    compiled, step = ((runner.compiled_train, runner.train_step)
                      if mode == 'train' else
                      (runner.compiled_infer, runner.infer_step))
    profiles[mode] = profile_one_step(step), compiled.as_text()
    if args.save:
      save_profile(pathlib.Path(args.save), about, label, mode,
                   *profiles[mode])
  return profiles


def print_tables(results: dict[str, Breakdown], mode: str, top: int):
  labels = list(results)
  busy = {label: sum(results[label].categories.values()) for label in labels}
  # Whole milliseconds for CPU steps; a GPU step takes a few.
  digits = 0 if max(busy.values()) >= 100 else 2
  row = lambda values: ' | '.join(f'{v:.{digits}f}' for v in values) + ' |'
  print(f'\n| ms per {mode} step | {" | ".join(labels)} |')
  print('|---|' + '---:|' * len(labels))
  for name in CATEGORIES:
    if mode == 'train' or name != 'optimizer update':
      print(f'| {name} | ' +
            row(results[label].categories[name] for label in labels))
  for name in ('forward', 'backward') if mode == 'train' else ('forward',):
    print(f'| {name} ops (with an op_name) | ' +
          row(results[label].directions[name] for label in labels))
  print('| all (busy time) | ' + row(busy.values()))
  print(f'\n# slowest operations of the {labels[-1]} {mode} step (xN: N '
        'kernels: identical layers share one fusion, a library call '
        'launches several)')
  for ms, op, op_name, launches in results[labels[-1]].ops[:top]:
    kind = category(op_name) if op_name else UNNAMED
    print(f'{ms:8.{max(digits, 1)}f} ms x{launches:<3} {op:<28} '
          f'{kind:<14.14} {op_name}')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default=None,
                      choices=list(model_bench.ENTRIES),
                      help='default mobilenet_v1, or the one --load holds')
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--dtype', default='float32',
                      choices=model_bench.DTYPES)
  parser.add_argument('--mode', nargs='+', default=['train'],
                      choices=['train', 'infer'])
  parser.add_argument('--top', type=int, default=12)
  parser.add_argument('--cache-dir', default=None,
                      help='persistent compilation cache to read and fill')
  parser.add_argument('--save', default=None,
                      help='folder to keep each trace and HLO in')
  parser.add_argument('--load', default=None,
                      help='attribute the steps --save kept there instead')
  args = parser.parse_args()
  labels = lambda entry: {'static': 0, f'CondConv-{entry.experts}':
                          entry.experts}
  if args.load:
    about = load_about(pathlib.Path(args.load))
    if args.model not in (None, about['model']):
      parser.error(f'{args.load} holds {about["model"]} profiles, not '
                   f'{args.model}: leave --model out.')
    entry = model_bench.ENTRIES[about['model']]
    print('# saved profiles: ' + ', '.join(f'{k} {v}' for k, v in
                                           about.items()))
    profiles = {label: {mode: load_profile(pathlib.Path(args.load), label,
                                           mode) for mode in args.mode}
                for label in labels(entry)}
  else:
    cpu_setup.use_tcmalloc()
    import jax
    model_bench.use_compilation_cache(args.cache_dir)
    args.model = args.model or 'mobilenet_v1'
    entry = model_bench.ENTRIES[args.model]
    about = {'model': args.model, 'batch': args.batch, 'dtype': args.dtype,
             'device': jax.devices()[0].device_kind, 'jax': jax.__version__,
             'host': model_bench.machine(),
             'allocator': cpu_setup.allocator()}
    print('# ' + ', '.join(f'{k} {v}' for k, v in about.items()) +
          f'; one profiled step each ({", ".join(args.mode)})')
    # Every step profiled (and saved) before any is attributed.
    profiles = {label: profile_steps(args, entry, label, experts, about)
                for label, experts in labels(entry).items()}
  for mode in args.mode:
    print_tables({label: breakdown(*steps[mode])
                  for label, steps in profiles.items()}, mode, args.top)


if __name__ == '__main__':
  main()
