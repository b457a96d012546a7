"""Whole-model speed: static vs CondConv, and JAX vs its PyTorch peer.

    python benchmarks/model_bench.py                    # the README table
    python benchmarks/model_bench.py --models resnet50 --batch 8

For every paper model it runs one process per model (--processes times) in
which four things alternate, step by step: the JAX static model, its
CondConv twin, and the PyTorch peer of each (timm / torchvision, random
weights, the same batch, image size and dtype). Each is timed as a
training step (SGD: forward, backward, update; BatchNorm in training mode)
and as inference (one forward, eval mode); a cell is the best of --steps
steps over all processes. Ratios: CC/static is the CondConv model's
throughput over the static one's (static time / CondConv time), the peer
ratio is the same for PyTorch, and JAX/PyTorch is the JAX static step time
over PyTorch's. Absolute times are this CPU's, shared with whatever else ran
(the 1-minute load average is printed); compare ratios.

Peers: the parameter counts are printed beside them, and each peer has
exactly the JAX model's. PyTorch has a CondConv twin only for EfficientNet
(timm's efficientnet_cc_b0_{4,8}e); the SSD detector has no exact PyTorch
peer (torchvision's SSD300 is VGG-based, SSDlite MobileNetV3).
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


@dataclasses.dataclass(frozen=True)
class Entry:
  label: str
  model: str           # condconv_jax.models name
  experts: int
  size: int = 224
  peer: str | None = None       # 'timm:NAME' or 'torchvision:NAME'
  peer_cc: str | None = None


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
KINDS = ('jax', 'jax_cc', 'torch', 'torch_cc')


# ---------------------------------------------------------------- one model


def jax_runner(entry: Entry, experts: int, batch: int):
  """(train_step, infer) closures over a JAX model's state, random data."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from condconv_jax import cost
  from condconv_jax.models import get_model

  model = get_model(entry.model, num_experts=experts)
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

  def train_step():
    state[0] = train(*state[0], images, labels)
    jax.block_until_ready(state[0])

  def infer_step():
    jax.block_until_ready(infer(state[0][0], state[0][1], images))

  n_params = cost.count(model, (1, entry.size, entry.size, 3)).params
  return train_step, infer_step, n_params


def torch_runner(spec: str, batch: int, size: int):
  import torch
  source, name = spec.split(':')
  if source == 'timm':
    import timm
    model = timm.create_model(name, pretrained=False)
  else:
    import torchvision
    model = getattr(torchvision.models, name)(weights=None)
  images = torch.randn(batch, 3, size, size)
  labels = torch.randint(0, 1000, (batch,))
  opt = torch.optim.SGD(model.parameters(), lr=0.01)
  loss_fn = torch.nn.CrossEntropyLoss()

  def train_step():
    model.train()
    opt.zero_grad(set_to_none=True)
    loss_fn(model(images), labels).backward()
    opt.step()

  def infer_step():
    model.eval()
    with torch.inference_mode():
      model(images)

  return train_step, infer_step, sum(p.numel() for p in model.parameters())


def run_model(entry: Entry, batch: int, steps: int) -> dict:
  """Builds every runner of one model, warms each up, then alternates."""
  runners = {'jax': jax_runner(entry, 0, batch),
             'jax_cc': jax_runner(entry, entry.experts, batch)}
  for kind, spec in (('torch', entry.peer), ('torch_cc', entry.peer_cc)):
    if spec:
      runners[kind] = torch_runner(spec, batch, entry.size)
  for train_step, infer_step, _ in runners.values():
    train_step()  # compile / warm up
    infer_step()
  best = {(kind, mode): float('inf') for kind in runners
          for mode in ('train', 'infer')}
  for _ in range(steps):
    for kind, (train_step, infer_step, _) in runners.items():
      for mode, step in (('train', train_step), ('infer', infer_step)):
        start = time.perf_counter()
        step()
        best[kind, mode] = min(best[kind, mode], time.perf_counter() - start)
  return {'times': {f'{k}/{m}': t for (k, m), t in best.items()},
          'params': {k: r[2] for k, r in runners.items()},
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


def markdown(results: dict, batch: int) -> str:
  lines = ['| model | B | mode | JAX static | JAX CondConv | CC/static '
           'throughput | PyTorch static | PyTorch CondConv | peer CC/static '
           '| JAX/PyTorch static time | params JAX (peer) |',
           '|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|']
  for name, res in results.items():
    entry, t, p = ENTRIES[name], res['times'], res['params']
    for mode in ('train', 'infer'):
      get = lambda kind: t.get(f'{kind}/{mode}')
      experts = f'{entry.experts}'
      peer = (f'{p["jax"]:,} ({p["torch"]:,}); CC {p["jax_cc"]:,}'
              + (f' ({p["torch_cc"]:,})' if 'torch_cc' in p else '')
              if 'torch' in p else f'{p["jax"]:,}; CC {p["jax_cc"]:,}')
      lines.append(
          f'| {entry.label} | {batch} | {mode} | {ms(get("jax"))} | '
          f'{ms(get("jax_cc"))} ({experts}) | '
          f'{ratio(get("jax"), get("jax_cc"))} | {ms(get("torch"))} | '
          f'{ms(get("torch_cc"))} | {ratio(get("torch"), get("torch_cc"))} | '
          f'{ratio(get("jax"), get("torch"))} | {peer} |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', nargs='+', default=list(ENTRIES),
                      choices=list(ENTRIES))
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--steps', type=int, default=4,
                      help='timed steps of each kind per process')
  parser.add_argument('--processes', type=int, default=2,
                      help='processes per model; cells are the best over all')
  parser.add_argument('--one', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()

  from condconv_jax import cpu_setup
  cpu_setup.use_tcmalloc()  # re-executes once; children inherit it

  if args.one:  # a child: one model, JSON on the last line
    result = run_model(ENTRIES[args.one], args.batch, args.steps)
    print(json.dumps(result))
    return

  import jax
  import torch
  print(f'# {machine()}; jax {jax.__version__} ({jax.devices()[0].device_kind}'
        f'), torch {torch.__version__} ({torch.get_num_threads()} threads); '
        f'float32; allocator: {cpu_setup.allocator()}; XLA_FLAGS='
        f'{os.environ.get("XLA_FLAGS", "")!r}', flush=True)
  results = {}
  for name in args.models:
    for process in range(args.processes):
      out = subprocess.run(
          [sys.executable, __file__, '--one', name, '--batch',
           str(args.batch), '--steps', str(args.steps)],
          check=True, capture_output=True, text=True).stdout
      result = json.loads(out.strip().splitlines()[-1])
      print(f'# {name} process {process}: load {result["load"]:.2f}, ' +
            ', '.join(f'{k} {v * 1e3:.0f} ms'
                      for k, v in result['times'].items()), flush=True)
      if name in results:
        times = results[name]['times']
        for k, v in result['times'].items():
          times[k] = min(times[k], v)
      else:
        results[name] = result
  print(markdown(results, args.batch))


if __name__ == '__main__':
  main()
