"""CondConv layer speed: each strategy as a ratio to the static conv, one process.

    python -m benchmarks.layer_bench            # the CPU layer table (~10 min)
    python -m benchmarks.layer_bench --cases pw512 --batches 8 --strategies direct
    python -m benchmarks.layer_bench --families condconv dyconv odconv \
        --cases pw512 dw512 conv128 --batches 8 \
        --strategies auto direct loop vmap

For each layer shape and batch it times, forward and forward+backward, the
fastest static conv of the same shape (lax.conv, and for 1x1 one matmul, for
depthwise the shifted multiply-add form, for k x k in forward+backward
lax.conv with an im2col kernel gradient) and the full CondConv layer (routing
+ conditional conv) with each strategy, and prints time / static time. The MAC
column is the arithmetic floor: (conv + kernel mixing + routing) / conv.
The auto column repeats the cell of the strategy auto picks (the same
function). Absolute times are printed only as a sanity check: on a shared
CPU only the ratios, measured minutes apart in the same process, are
comparable.

--families adds CondConv's successors, each timed against the same static
conv measured once per row group: `dyconv` is `condconv_jax.DynamicConv`
with K=4 (softmax attention, per-expert biases), `odconv` is
`condconv_jax.ODConv` with K=1 and with K=4 (the paper's "1x" and "4x";
in forward its attention's BatchNorm uses running averages, in
forward+backward batch statistics, as in training). These run the Linen
layers themselves, attention included; their MACs column is the layer's
`condconv_jax.models.cost` count over the static conv's. With a spatial
attention (ODConv on a k x k conv, depthwise included) every example has
its own kernel and only the per-example strategies apply (`n/a` under
experts); an ODConv-1 1x1 layer is one static conv whatever the strategy
(timed once, under the first strategy; `auto ->` says `static`). With more
than the default family a `layer` column names each row's layer.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

import condconv_jax
from benchmarks import model_bench
from condconv_jax import cpu_setup, layer_math, static_ops
from condconv_jax import strategy as strategy_lib
from condconv_jax.geometry import conv_geometry
from condconv_jax.models import cost

NUM_EXPERTS = 8


@dataclasses.dataclass(frozen=True)
class Family:
  """One timed layer: CondConv (this module's own layer function) or a
  Linen successor ('dyconv': DynamicConv, 'odconv': ODConv)."""
  kind: str
  experts: int

  @property
  def label(self) -> str:
    name = {'condconv': 'CondConv', 'dyconv': 'DyConv',
            'odconv': 'ODConv'}[self.kind]
    return f'{name}-{self.experts}'


FAMILIES = {
    'condconv': (Family('condconv', NUM_EXPERTS),),
    'dyconv': (Family('dyconv', 4),),
    'odconv': (Family('odconv', 1), Family('odconv', 4)),
}


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  size: int
  cin: int
  cout: int
  kernel: int
  groups: int = 1

  def describe(self):
    kind = 'dw' if self.groups > 1 else f'{self.kernel}x{self.kernel}'
    return f'{kind} {self.size}x{self.size}x{self.cin}->{self.cout}'


CASES = {
    'pw512': Case('pw512', 14, 512, 512, 1),
    'pw1024': Case('pw1024', 7, 1024, 1024, 1),
    'dw512': Case('dw512', 14, 512, 512, 3, groups=512),
    'conv128': Case('conv128', 28, 128, 128, 3),
    'fc1024': Case('fc1024', 1, 1024, 1000, 1),  # a CondConv classifier
}


def time_call(fn, args, budget_s: float, repeats: int,
              target_s: float = 0.2) -> float:
  """Best-of-`repeats` seconds per call; each repeat averages enough calls
  to last about `target_s`."""
  jax.block_until_ready(fn(*args))  # compile + warm up
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  once = time.perf_counter() - start
  if once > budget_s:
    return once
  calls = max(1, int(target_s / max(once, 1e-6)))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - start) / calls)
  return best


def static_variants(case: Case, geom, mode: str):
  """name -> f(x, kernel) for every exact static form of this conv that
  differs from lax.conv in this mode ('fwd' or 'fwd+bwd')."""
  variants = {'lax.conv': lambda x, k: static_ops.static_conv(x, k, geom)}
  if case.kernel == 1 and case.groups == 1:
    variants['matmul'] = (
        lambda x, k: static_ops.pointwise_matmul_conv(x, k, geom))
  if case.groups > 1:
    variants['shifted'] = (
        lambda x, k: static_ops.shifted_depthwise_conv(x, k[None], geom))
  if case.kernel > 1 and case.groups == 1 and mode == 'fwd+bwd':
    # Its forward is lax.conv itself: timing it twice would only pick noise.
    variants['im2col_grad'] = (
        lambda x, k: static_ops.im2col_grad_conv(x, k, geom))
  return variants


def condconv_layer(case: Case, strategy: str):
  def layer(x, params):
    pooled = jnp.mean(x, axis=(1, 2))
    routing = jax.nn.sigmoid(pooled @ params['routing'])
    return condconv_jax.conditional_conv(
        x, params['experts'], routing, padding='SAME',
        feature_group_count=case.groups, strategy=strategy)
  return layer


def dynamic_module(case: Case, family: Family, strategy: str):
  cls = condconv_jax.DynamicConv if family.kind == 'dyconv' else (
      condconv_jax.ODConv)
  return cls(case.cout, (case.kernel, case.kernel), padding='SAME',
             feature_group_count=case.groups, num_experts=family.experts,
             strategy=strategy)


def dynamic_variables(case: Case, family: Family, x, dtype):
  """The layer's variables (its own initializers, key 0), cast to dtype."""
  module = dynamic_module(case, family, 'auto')
  init = jax.jit(lambda x: module.init(jax.random.key(0), x, train=False))
  return jax.tree.map(lambda a: a.astype(dtype), init(x))


def dynamic_layer(case: Case, family: Family, strategy: str, mode: str,
                  others):
  """f(x, params) for the Linen layer; `others`: its non-param collections
  (ODConv's attention batch_stats). ODConv's BatchNorm trains in fwd+bwd."""
  module = dynamic_module(case, family, strategy)
  if family.kind == 'odconv' and mode == 'fwd+bwd':
    def layer(x, params):
      y, _ = module.apply({'params': params, **others}, x, train=True,
                          mutable=['batch_stats'])
      return y
  else:
    def layer(x, params):
      return module.apply({'params': params, **others}, x)
  return layer


def dynamic_mac_ratio(case: Case, family: Family, geom) -> float:
  """The layer's multiply-adds (conv, mixing, attention; the library's
  count) over the static conv's, per example."""
  layer = cost.count(dynamic_module(case, family, 'auto'),
                     (1, case.size, case.size, case.cin))
  return layer.macs / (np.prod(geom.out_spatial) * geom.kernel_elements)


def odconv_heads(case: Case, family: Family):
  return layer_math.odconv_head_sizes(case.cin, case.cout, case.kernel,
                                      case.groups, family.experts)


def forward_backward(fn):
  """Gradient w.r.t. every input of fn(x, w) -> y, for a fixed cotangent."""
  def loss(x, w):
    y = fn(x, w)
    return jnp.vdot(y, jnp.ones_like(y))
  return jax.grad(loss, argnums=(0, 1))


def mac_ratio(case: Case, batch: int, geom) -> float:
  conv = batch * np.prod(geom.out_spatial) * geom.kernel_elements
  mixing = batch * NUM_EXPERTS * geom.kernel_elements
  routing = batch * (case.size * case.size * case.cin + case.cin * NUM_EXPERTS)
  return (conv + mixing + routing) / conv


def measure(case: Case, batch: int, strategies, skip, dtype,
            families=FAMILIES['condconv'], **timing):
  rng = np.random.default_rng(0)
  normal = lambda shape, scale=1.0: jnp.asarray(
      rng.standard_normal(shape, np.float32) * scale, dtype)
  x = normal((batch, case.size, case.size, case.cin))
  kshape = (case.kernel, case.kernel, case.cin // case.groups, case.cout)
  kernel = normal(kshape, 0.05)
  params = {'experts': normal((NUM_EXPERTS, *kshape), 0.05),
            'routing': normal((case.cin, NUM_EXPERTS), 0.05)}
  geom = conv_geometry(x.shape, kshape, padding='SAME',
                       feature_group_count=case.groups)
  dynamic = {family: dynamic_variables(case, family, x, dtype)
             for family in families if family.kind != 'condconv'}
  rows = []
  for mode in ('fwd', 'fwd+bwd'):
    wrap = (lambda f: f) if mode == 'fwd' else forward_backward
    static = {name: time_call(jax.jit(wrap(f)), (x, kernel), **timing)
              for name, f in static_variants(case, geom, mode).items()}
    best_name = min(static, key=static.get)
    base = static[best_name]
    for family in families:
      row = {'case': case.describe(), 'batch': batch, 'mode': mode,
             'layer': family.label,
             'static': f'{best_name} {base * 1e3:.2f}ms',
             'static/lax.conv': base / static['lax.conv']}
      chosen = strategy_lib.choose(geom, batch, family.experts,
                                   jax.default_backend())
      if family.kind == 'condconv':
        row['MACs'] = mac_ratio(case, batch, geom)
        layer_fn = lambda s: condconv_layer(case, s)
        args = (x, params)
        unsupported = lambda s: None
        one_function = False
      else:
        row['MACs'] = dynamic_mac_ratio(case, family, geom)
        variables = dict(dynamic[family])
        args = (x, variables.pop('params'))
        layer_fn = functools.partial(dynamic_layer, case, family,
                                     mode=mode, others=variables)
        heads = odconv_heads(case, family) if family.kind == 'odconv' else {}
        # A spatial attention gives every example its own kernel.
        unsupported = lambda s, spatial='spatial' in heads: (
            'n/a' if spatial and s == 'experts' else None)
        # ODConv-1 on a 1x1 conv: one static conv, whatever the strategy.
        one_function = family.kind == 'odconv' and not (
            {'spatial', 'kernel'} & set(heads))
        if one_function:
          chosen = 'static'
        elif family.kind == 'odconv' and 'kernel' not in heads:
          # K = 1 with a spatial attention: the layer's own auto rule.
          chosen = strategy_lib.resolve('auto', geom, batch, 1,
                                        jax.default_backend(),
                                        spatial_only=True)
      timed = None  # the strategy timed for a layer that is one function
      for strategy in strategies:
        reason = unsupported(strategy) or skip(case, batch, mode, strategy)
        if reason:
          row[strategy] = reason
          continue
        if strategy == 'auto' and chosen in strategies:
          continue  # the same function as the chosen strategy's: its cell
        if one_function and timed:
          row[strategy] = f'={timed}'
          continue
        fn = jax.jit(wrap(layer_fn(strategy)))
        row[strategy] = time_call(fn, args, **timing) / base
        timed = strategy
      if 'auto' in strategies:
        row['auto ->'] = chosen
        row.setdefault('auto', row.get(chosen))
      rows.append(row)
      print(format_row(row, strategies, show_layer=families !=
                       FAMILIES['condconv']), flush=True)
  return rows


def known_pathological(case: Case, batch: int, mode: str, strategy: str):
  """Cells not run on CPU: they take minutes per call or exhaust memory."""
  if jax.default_backend() != 'cpu' or mode == 'fwd':
    return None
  if strategy == 'vmap' and batch >= 64 and case.kernel > 1:
    return 'skip:B^2'  # grouped-conv kernel grad; dw asks for ~77 GB
  if strategy == 'experts' and case.groups > 1 and batch >= 8:
    return 'skip:slow'  # XLA:CPU depthwise backward, minutes per call
  return None


def format_row(row, strategies, show_layer=False):
  cells = [f"{row['case']:<22}", f"{row['batch']:>4}", f"{row['mode']:<8}"]
  if show_layer:
    cells.append(f"{row['layer']:<10}")
  cells += [f"{row['static']:<20}", f"{row['static/lax.conv']:>7.2f}",
            f"{row['MACs']:>5.2f}"]
  for s in strategies:
    v = row[s]
    cells.append(f'{v:>9.2f}' if isinstance(v, float) else f'{v:>9}')
  if 'auto ->' in row:
    cells.append(f"{row['auto ->']:>8}")
  return ' '.join(cells)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--cases', nargs='+', default=list(CASES),
                      choices=list(CASES))
  parser.add_argument('--batches', nargs='+', type=int, default=None,
                      help='default: 1 8 64, plus 256 on an accelerator')
  parser.add_argument('--strategies', nargs='+',
                      default=['auto', 'direct', 'loop', 'vmap', 'experts'],
                      choices=list(condconv_jax.STRATEGIES))
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--target-s', type=float, default=0.2,
                      help='each repeat averages calls lasting about this')
  parser.add_argument('--dtype', default='float32',
                      choices=['float32', 'bfloat16'])
  parser.add_argument('--budget-s', type=float, default=2.0,
                      help='a cell whose single call takes longer is timed once')
  parser.add_argument('--run-pathological', action='store_true',
                      help='also run the CPU cells known to take minutes or OOM')
  parser.add_argument('--families', nargs='+', default=['condconv'],
                      choices=list(FAMILIES),
                      help='layers to time against the static conv: condconv '
                      f'(E={NUM_EXPERTS}), dyconv (DynamicConv, K=4), odconv '
                      '(ODConv, K=1 and K=4)')
  parser.add_argument('--size', type=int, default=None,
                      help='spatial size of every case but fc1024 (default: '
                      "each case's own)")
  args = parser.parse_args()
  cpu_setup.use_tcmalloc()  # re-executes once with tcmalloc preloaded
  batches = args.batches or (
      [1, 8, 64] if jax.default_backend() == 'cpu' else [1, 8, 64, 256])
  skip = (lambda *a: None) if args.run_pathological else known_pathological
  families = tuple(f for name in dict.fromkeys(args.families)
                   for f in FAMILIES[name])
  show_layer = families != FAMILIES['condconv']
  print(f'# {model_bench.machine()}, {jax.device_count()} x '
        f'{jax.devices()[0].device_kind}, jax {jax.__version__}, '
        f'E={NUM_EXPERTS}, {args.dtype}, {cpu_setup.allocator()}')
  print('# cells: layer time / fastest static conv time (same process); '
        '/lax: that static time / lax.conv\'s; MACs: arithmetic floor')
  if show_layer:
    print('# layers: ' + ', '.join(f.label for f in families) +
          ' (name-K); each ratio to the static conv timed in its row group')
  header = ['case'.ljust(22), 'B'.rjust(4), 'mode'.ljust(8)]
  if show_layer:
    header.append('layer'.ljust(10))
  header += ['static (fastest)'.ljust(20), '/lax'.rjust(7), 'MACs'.rjust(5)]
  header += [s.rjust(9) for s in args.strategies]
  if 'auto' in args.strategies:
    header.append('auto ->'.rjust(8))
  print(' '.join(header))
  worst_auto = {f.label: 0.0 for f in families}
  for name in args.cases:
    case = CASES[name]
    if args.size and case.size > 1:
      case = dataclasses.replace(case, size=args.size)
    for batch in batches:
      for row in measure(case, batch, args.strategies, skip,
                         jnp.dtype(args.dtype), families,
                         budget_s=args.budget_s, repeats=args.repeats,
                         target_s=args.target_s):
        if isinstance(row.get('auto'), float):
          worst_auto[row['layer']] = max(worst_auto[row['layer']],
                                         row['auto'])
  if 'auto' in args.strategies:
    for label, worst in worst_auto.items():
      if label == FAMILIES['condconv'][0].label:
        print(f'# worst auto / static: {worst:.2f} (bar 1.5, target 1.25)')
      else:
        print(f'# worst auto / static, {label}: {worst:.2f}')


if __name__ == '__main__':
  main()
