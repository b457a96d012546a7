"""Whole-model speed: static vs CondConv, and JAX vs its PyTorch peer.

    python -m benchmarks.model_bench           # the whole-model CPU table
    python -m benchmarks.model_bench --models resnet50 --batch 8
    python -m benchmarks.model_bench --models od_resnet18 dy_resnet18 \
        --batch 8 --size 112 --steps 3 --processes 1  # DyConv / ODConv
    python -m benchmarks.model_bench --dtype bfloat16 float32 --batch 128 \
        --steps 10 --processes 1 --cache-dir /tmp/jax_cache  # on a GPU

For every paper model it runs one process per model (--processes times) in
which four things alternate, step by step: the JAX static model, its
CondConv twin, and the PyTorch peer of each (timm / torchvision, random
weights, the same batch, image size and dtype). Each is timed as a
training step (SGD: forward, backward, update; BatchNorm in training mode)
and as inference (one forward, eval mode); a cell is the best of --steps
steps over all processes. `--cc-strategies auto vmap` adds a CondConv twin
per extra strategy. `--dtype bfloat16` computes in bfloat16 with float32
parameters (flax `dtype=`; PyTorch under autocast, channels-last on GPU).

On a GPU (`jax.default_backend() == 'gpu'`) the peers run on CUDA.
Compiling a model takes longer there than timing it (38-103 s for one
EfficientNet-B0 variant on the H200): `--cache-dir` keeps the compiled steps
for the next run. Compiles in parallel processes would autotune side by side
on the one GPU (four at once took 119-151 s each there). The JAX train
column's memory is XLA's own account of the compiled training step
(arguments + outputs - donated + temporaries).

Ratios: CC/static is the CondConv model's throughput over the static one's
(static time / CondConv time), the peer ratio is the same for PyTorch, and
JAX/PyTorch is the JAX static step time over PyTorch's. Absolute times are
this machine's, shared with whatever else ran (the 1-minute load average is
printed); compare ratios.

Peers: the parameter counts are printed beside them, and each peer has
exactly the JAX model's. PyTorch has a CondConv twin only for EfficientNet
(timm's efficientnet_cc_b0_{4,8}e); the SSD detector has no exact PyTorch
peer (torchvision's SSD300 is VGG-based, SSDlite MobileNetV3).

CondConv's successors (`--models dy_resnet18 od_resnet18 od_resnet18_4x
dy_resnet50 od_resnet50 dy_mobilenetv2_100 od_mobilenetv2_100`; not in the
default run) take the CondConv columns: their dynamic model (DyConv K=4,
ODConv K=1 "1x" or K=4 "4x", placed as `condconv_jax.models` places them)
against its static twin (num_experts=0), with the same training and
inference steps (temperature 1). Their PyTorch peer is the static one only
(torchvision resnet18 / resnet50 / mobilenet_v2, the twin's parameter
count): there is no PyTorch DyConv or ODConv peer here, so their PyTorch
dynamic and peer ratio columns are empty. --size replaces every model's
image size (224; SSD 300), for quick runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from condconv_jax import cpu_setup
from condconv_jax import strategy as strategy_lib
from condconv_jax.models import cost, get_model

# The children run `python -m benchmarks.model_bench` from here.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Runner(NamedTuple):
  train_step: Callable[[], None]
  infer_step: Callable[[], None]
  params: int
  train_memory: int | None = None  # bytes, from XLA (JAX runners only)
  compiled_train: Any = None       # XLA executables (JAX runners only)
  compiled_infer: Any = None


@dataclasses.dataclass(frozen=True)
class Entry:
  label: str
  model: str           # condconv_jax.models name
  experts: int
  size: int = 224
  peer: str | None = None       # 'timm:NAME' or 'torchvision:NAME'
  peer_cc: str | None = None
  family: str = 'condconv'      # or 'dyconv' / 'odconv': the dynamic twin's

  @property
  def dynamic_label(self) -> str:
    """What the dynamic column's cell names beside its time."""
    if self.family == 'condconv':
      return str(self.experts)
    name = 'DyConv' if self.family == 'dyconv' else 'ODConv'
    return f'{name} K={self.experts}'


ENTRIES = {
    'mobilenet_v1': Entry('MobileNetV1 1.0', 'mobilenet_v1', 8,
                          peer='timm:mobilenetv1_100'),
    'mobilenet_v2': Entry('MobileNetV2 1.0', 'mobilenet_v2', 8,
                          peer='torchvision:mobilenet_v2'),
    'mnasnet_a1': Entry('MnasNet-A1', 'mnasnet_a1', 8, peer='timm:mnasnet_a1'),
    'resnet50': Entry('ResNet-50', 'resnet50', 8, peer='torchvision:resnet50'),
    'efficientnet_b0_4e': Entry('EfficientNet-B0 (4 experts)',
                                'efficientnet_b0', 4,
                                peer='timm:efficientnet_b0',
                                peer_cc='timm:efficientnet_cc_b0_4e'),
    'efficientnet_b0': Entry('EfficientNet-B0', 'efficientnet_b0', 8,
                             peer='timm:efficientnet_b0',
                             peer_cc='timm:efficientnet_cc_b0_8e'),
    'ssd_mobilenet_v1': Entry('SSD300 MobileNetV1', 'ssd_mobilenet_v1', 8,
                              size=300),
}
# The default run: the CondConv paper's models.
PAPER_MODELS = tuple(ENTRIES)
# CondConv's successors; no PyTorch DyConv/ODConv peer, the static one only.
ENTRIES.update({
    'dy_resnet18': Entry('DY-ResNet-18', 'dy_resnet18', 4,
                         peer='torchvision:resnet18', family='dyconv'),
    'od_resnet18': Entry('OD-ResNet-18 (1x)', 'od_resnet18', 1,
                         peer='torchvision:resnet18', family='odconv'),
    'od_resnet18_4x': Entry('OD-ResNet-18 (4x)', 'od_resnet18', 4,
                            peer='torchvision:resnet18', family='odconv'),
    'dy_resnet50': Entry('DY-ResNet-50', 'dy_resnet50', 4,
                         peer='torchvision:resnet50', family='dyconv'),
    'od_resnet50': Entry('OD-ResNet-50 (1x)', 'od_resnet50', 1,
                         peer='torchvision:resnet50', family='odconv'),
    'dy_mobilenetv2_100': Entry('DY-MobileNetV2 1.0', 'dy_mobilenetv2_100', 4,
                                peer='torchvision:mobilenet_v2',
                                family='dyconv'),
    'od_mobilenetv2_100': Entry('OD-MobileNetV2 1.0 (1x)',
                                'od_mobilenetv2_100', 1,
                                peer='torchvision:mobilenet_v2',
                                family='odconv'),
})
DTYPES = ('float32', 'bfloat16')


# ---------------------------------------------------------------- one model


def jax_runner(entry: Entry, experts: int, batch: int, dtype: str,
               strategy: str = 'auto') -> Runner:
  """Steps over a JAX model's state and random data, both compiled ahead
  (so a persistent compilation cache serves them)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  model = get_model(entry.model, num_experts=experts, dtype=jnp.dtype(dtype),
                    **({'strategy': strategy} if experts else {}))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal(
      (batch, entry.size, entry.size, 3), np.float32))
  labels = jnp.asarray(rng.integers(0, 1000, batch))
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(0), images)
  params, stats = variables['params'], variables['batch_stats']
  tx = optax.sgd(0.01)

  def loss_fn(params, stats, images, labels):
    out, new = model.apply({'params': params, 'batch_stats': stats}, images,
                           train=True, mutable=['batch_stats'],
                           rngs={'dropout': jax.random.key(1)})
    if isinstance(out, dict):  # the detector: a stand-in loss on both heads
      loss = sum(jnp.mean(v) for v in out.values())
    else:
      loss = optax.softmax_cross_entropy_with_integer_labels(
          out, labels % out.shape[-1]).mean()
    return loss, new['batch_stats']

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def train(params, stats, opt, images, labels):
    (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, stats, images, labels)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), stats, opt

  @jax.jit
  def infer(params, stats, images):
    return model.apply({'params': params, 'batch_stats': stats}, images,
                       train=False)

  state = [(params, stats, tx.init(params))]
  train = train.lower(*state[0], images, labels).compile()
  infer = infer.lower(params, stats, images).compile()

  def train_step():
    state[0] = train(*state[0], images, labels)
    jax.block_until_ready(state[0])

  def infer_step():
    jax.block_until_ready(infer(state[0][0], state[0][1], images))

  n_params = cost.count(model, (1, entry.size, entry.size, 3)).params
  return Runner(train_step, infer_step, n_params, step_memory(train), train,
                infer)


def use_compilation_cache(cache_dir: str | None):
  """Every compiled step read from / written to cache_dir (if given)."""
  if cache_dir:
    import jax
    jax.config.update('jax_compilation_cache_dir', cache_dir)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def step_memory(compiled) -> int | None:
  """Bytes XLA says the compiled step needs, or None if it cannot say."""
  try:
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes -
            m.alias_size_in_bytes + m.temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except  # backend without it
    return None


def torch_runner(spec: str, batch: int, size: int, dtype: str, device: str):
  import contextlib
  import torch
  source, name = spec.split(':')
  if source == 'timm':
    import timm
    model = timm.create_model(name, pretrained=False)
  else:
    import torchvision
    model = getattr(torchvision.models, name)(weights=None)
  # Channels-last is PyTorch's fast conv layout on GPUs; on CPU its default.
  layout = torch.channels_last if device == 'cuda' else torch.contiguous_format
  model = model.to(device, memory_format=layout)
  images = torch.randn(batch, 3, size, size, device=device).to(
      memory_format=layout)
  labels = torch.randint(0, 1000, (batch,), device=device)
  opt = torch.optim.SGD(model.parameters(), lr=0.01)
  loss_fn = torch.nn.CrossEntropyLoss()
  compute = (functools.partial(torch.autocast, device, dtype=torch.bfloat16)
             if dtype == 'bfloat16' else contextlib.nullcontext)
  sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)

  def train_step():
    model.train()
    opt.zero_grad(set_to_none=True)
    with compute():
      loss = loss_fn(model(images), labels)
    loss.backward()
    opt.step()
    sync()

  def infer_step():
    model.eval()
    with torch.inference_mode(), compute():
      model(images)
    sync()

  return Runner(train_step, infer_step,
                sum(p.numel() for p in model.parameters()))


def cc_kind(strategy: str) -> str:
  return 'jax_cc' if strategy == 'auto' else f'jax_cc_{strategy}'


def jax_runners(entry: Entry, batch: int, dtype: str, variants) -> dict:
  """variants: 'static' and CondConv strategies."""
  return {
      'jax' if variant == 'static' else cc_kind(variant): jax_runner(
          entry, 0 if variant == 'static' else entry.experts, batch, dtype,
          variant)
      for variant in variants}


def time_steps(runners: dict, steps: int, best: dict):
  """Alternates the runners' steps, `steps` rounds; best[kind, mode] is the
  fastest step in seconds (mode 'train' or 'infer'), kept across calls."""
  for _ in range(steps):
    for kind, runner in runners.items():
      for mode, step in (('train', runner.train_step),
                         ('infer', runner.infer_step)):
        start = time.perf_counter()
        step()
        best[kind, mode] = min(best.get((kind, mode), float('inf')),
                               time.perf_counter() - start)


def run_model(entry: Entry, batch: int, steps: int, dtype: str,
              cc_strategies) -> dict:
  """Builds every runner of one model, warms each up, then alternates."""
  import jax
  device = 'cuda' if jax.default_backend() == 'gpu' else 'cpu'
  runners = jax_runners(entry, batch, dtype, ['static', *cc_strategies])
  for kind, spec in (('torch', entry.peer), ('torch_cc', entry.peer_cc)):
    if spec:
      runners[kind] = torch_runner(spec, batch, entry.size, dtype, device)
  for runner in runners.values():
    runner.train_step()  # warm up
    runner.infer_step()
  best = {}
  time_steps(runners, steps, best)
  return {'times': {f'{k}/{m}': t for (k, m), t in best.items()},
          'params': {k: r.params for k, r in runners.items()},
          'memory': {k: r.train_memory for k, r in runners.items()},
          'load': os.getloadavg()[0]}


# ---------------------------------------------------------------- the table


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      info = dict(line.split(':', 1) for line in f if ':' in line)
    info = {k.strip(): v.strip() for k, v in info.items()}
    cpu = (f"{info.get('model name', cpu)} (family {info.get('cpu family')}"
           f" model {info.get('model')})")
  except OSError:
    pass
  return f'{cpu}, {os.cpu_count()} cores'


def ms(seconds):
  return '–' if seconds is None else f'{seconds * 1e3:.0f} ms'


def ratio(a, b):
  return '–' if a is None or b is None else f'{a / b:.2f}'


def gigabytes(n):
  return '–' if n is None else f'{n / 2**30:.1f}'


def markdown(results: dict, cc_strategies) -> str:
  """One row per (model, batch, dtype, mode); `results` keyed by the same."""
  extra = [s for s in cc_strategies if s != 'auto']
  # With a DyConv/ODConv model in the table its dynamic twin shares the
  # CondConv columns, and their headers say so.
  dynamic = any(ENTRIES[name].family != 'condconv' for name, _, _ in results)
  jax_cc, cc_static, cc_extra = (
      ('JAX CondConv / DyConv / ODConv', 'dynamic/static', 'dynamic')
      if dynamic else ('JAX CondConv', 'CC/static', 'CondConv'))
  lines = [f'| model | B | dtype | mode | JAX static | {jax_cc} | {cc_static} '
           'throughput | ' + ''.join(f'{cc_extra} {s} | ' for s in extra) +
           'PyTorch static | PyTorch CondConv | peer CC/static | JAX/PyTorch '
           'static time | train GiB static / CC | params JAX (peer) |',
           '|---|---:|---|---|---:|---:|---:|' + '---:|' * len(extra) +
           '---:|---:|---:|---:|---:|---|']
  for (name, batch, dtype), res in results.items():
    entry, t, p, mem = ENTRIES[name], res['times'], res['params'], res['memory']
    short = {'condconv': 'CC', 'dyconv': 'DY', 'odconv': 'OD'}[entry.family]
    peer = (f'{p["jax"]:,} ({p["torch"]:,}); {short} {p["jax_cc"]:,}'
            + (f' ({p["torch_cc"]:,})' if 'torch_cc' in p else '')
            if 'torch' in p else f'{p["jax"]:,}; {short} {p["jax_cc"]:,}')
    memory = (f'{gigabytes(mem.get("jax"))} / {gigabytes(mem.get("jax_cc"))}')
    for mode in ('train', 'infer'):
      get = lambda kind: t.get(f'{kind}/{mode}')
      extra_cells = ''.join(
          f'{ms(get(cc_kind(s)))} ({ratio(get("jax"), get(cc_kind(s)))}) | '
          for s in extra)
      lines.append(
          f'| {entry.label} | {batch} | {dtype} | {mode} | {ms(get("jax"))} | '
          f'{ms(get("jax_cc"))} ({entry.dynamic_label}) | '
          f'{ratio(get("jax"), get("jax_cc"))} | {extra_cells}'
          f'{ms(get("torch"))} | {ms(get("torch_cc"))} | '
          f'{ratio(get("torch"), get("torch_cc"))} | '
          f'{ratio(get("jax"), get("torch"))} | '
          f'{memory if mode == "train" else ""} | {peer} |')
  return '\n'.join(lines)


def child_command(name, batch, dtype, args):
  return [sys.executable, '-m', 'benchmarks.model_bench', '--one', name,
          '--batch', str(batch), '--dtype', dtype, '--steps', str(args.steps),
          '--cache-dir', args.cache_dir or '',
          *(['--size', str(args.size)] if args.size else []),
          '--cc-strategies', *args.cc_strategies]


def run_child(command, config) -> str | None:
  """The child's stdout; on failure (out of memory, say) its error, and None:
  one configuration failing leaves the others' rows."""
  done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
  if done.returncode:
    print(f'# {config} failed (exit {done.returncode}): ' +
          ' | '.join(done.stderr.strip().splitlines()[-3:]), flush=True)
    return None
  return done.stdout


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', nargs='+', default=list(PAPER_MODELS),
                      choices=list(ENTRIES),
                      help='default: the CondConv paper models (not the '
                      'dy_* / od_* ones)')
  parser.add_argument('--batch', type=int, nargs='+', default=[16])
  parser.add_argument('--dtype', nargs='+', default=['float32'],
                      choices=DTYPES)
  parser.add_argument('--cc-strategies', nargs='+', default=['auto'],
                      help='one CondConv twin per strategy (auto first): a '
                      "name or per conv kind, e.g. 'depthwise=vmap'")
  parser.add_argument('--steps', type=int, default=4,
                      help='timed steps of each kind per process')
  parser.add_argument('--processes', type=int, default=2,
                      help='processes per model; cells are the best over all')
  parser.add_argument('--cache-dir', default=None,
                      help='persistent compilation cache to read and fill')
  parser.add_argument('--size', type=int, default=None,
                      help="image size for every model (default: each "
                      "model's own, 224; SSD 300)")
  parser.add_argument('--one', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  try:
    specs = [strategy_lib.parse(spec) for spec in args.cc_strategies]
  except ValueError as error:
    parser.error(str(error))
  if specs[0] != ('auto', {}):
    parser.error('--cc-strategies must start with auto (the CondConv column)')
  args.cc_strategies[0] = 'auto'

  # JAX and PyTorch share an accelerator, and the parent must not hold its
  # memory while the children run: JAX allocates as it goes.
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  cpu_setup.use_tcmalloc()  # re-executes once; children inherit it

  if args.one:  # a child: one model, JSON on the last line
    use_compilation_cache(args.cache_dir)
    entry = ENTRIES[args.one]
    if args.size:
      entry = dataclasses.replace(entry, size=args.size)
    result = run_model(entry, args.batch[0], args.steps,
                       args.dtype[0], args.cc_strategies)
    print(json.dumps(result))
    return

  import jax
  import torch
  print(f'# {machine()}; jax {jax.__version__} ({jax.devices()[0].device_kind}'
        f'), torch {torch.__version__} ({torch.get_num_threads()} threads); '
        f'allocator: {cpu_setup.allocator()}; XLA_FLAGS='
        f'{os.environ.get("XLA_FLAGS", "")!r}'
        + (f'; image size {args.size} (--size)' if args.size else ''),
        flush=True)
  configs = [(name, batch, dtype) for dtype in args.dtype
             for batch in args.batch for name in args.models]
  time_all(configs, args)


def time_all(configs, args):
  """Times each configuration in its own processes; prints the table."""
  results = {}
  for config in configs:
    for process in range(args.processes):
      out = run_child(child_command(*config, args), config)
      if out is None:
        continue
      result = json.loads(out.strip().splitlines()[-1])
      print(f'# {config} process {process}: load {result["load"]:.2f}, ' +
            ', '.join(f'{k} {v * 1e3:.0f} ms'
                      for k, v in result['times'].items()), flush=True)
      if config in results:
        times = results[config]['times']
        for k, v in result['times'].items():
          times[k] = min(times[k], v)
      else:
        results[config] = result
  print(markdown(results, args.cc_strategies))
  if any(ENTRIES[name].family != 'condconv' for name, _, _ in results):
    print('# DyConv / ODConv rows: no PyTorch DyConv or ODConv peer; their '
          'PyTorch column is the static torchvision peer only.')


if __name__ == '__main__':
  main()
