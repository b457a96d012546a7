"""CC-EfficientNet-B0 with its per-example depthwise convs in candidate forms.

    python -m benchmarks.depthwise_variants                 # on a GPU
    python -m benchmarks.depthwise_variants --variants static auto \
        barrier_taps_dk --batch 8 --dtype float32 --steps 3  # CPU smoke run

The GPU profile in docs/speed.md puts CC-EfficientNet-B0's whole gap to
its static twin in the per-example depthwise conv (`direct`: k*k shifted
multiply-adds): XLA:GPU fuses the taps into the reductions that consume them (the
squeeze-excite pooling, the batch-norm gradient), and the kernel gradient
runs as one reduction per tap. This times, in one process, alternating, best
of --steps, training step and inference:

  static            the static model
  auto              the CondConv twin as the library builds it
  depthwise=vmap    its depthwise CondConv layers as XLA's grouped conv
                    (cuDNN on a GPU; a strategy spec, nothing replaced)
  barrier_taps_dk   the shifted form with its output, the incoming
                    gradient and its input gradient materialized
                    (`lax.optimization_barrier`), so that no neighbour
                    fuses the taps in; kernel gradient per tap, as in the
                    library
  barrier_one_pass_dk  the same, kernel gradient as one reduction over the
                    stacked taps
  barrier_xla_dk    the same, kernel gradient by XLA's conv (cuDNN's
                    backward-filter on a GPU)

The candidates live here, not in the library: each stands in for
`static_ops.shifted_depthwise_conv` on per-example kernels while its twin
is traced (static depthwise convs are untouched; the runner fails if none
was replaced); tests/test_benchmarks.py checks their values and gradients
against the float64 loop reference. XLA:CPU removes optimization barriers
before it fuses, so on CPU `barrier_taps_dk` computes what `auto` does.
Variants compile one after another: on a GPU, compiles running side by side
also autotune side by side on the one device.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import time

import jax
import jax.numpy as jnp
from jax import lax

from benchmarks import model_bench
from condconv_jax import cpu_setup, ops, static_ops


def _one_pass_kernel_grad(x, kernels, geom, cotangent):
  acc = jnp.promote_types(cotangent.dtype, jnp.float32)
  multiplier = geom.out_features // geom.in_features
  taps = jnp.stack([jnp.repeat(tap, multiplier, axis=-1)
                    for _, _, tap in static_ops.kernel_taps(x, geom)], axis=1)
  grad = jnp.sum(taps.astype(acc) * cotangent.astype(acc)[:, None],
                 axis=(2, 3))
  return grad.reshape(kernels.shape).astype(kernels.dtype)


KERNEL_GRADS = ('taps', 'one_pass', 'xla')


def materialized_shifted(kernel_grad: str):
  """The shifted form behind optimization barriers; kernel_grad: 'taps' (the
  library's), 'one_pass' or 'xla'."""
  if kernel_grad not in KERNEL_GRADS:
    raise ValueError(f'kernel_grad must be one of {KERNEL_GRADS}, got '
                     f'{kernel_grad!r}.')

  @functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
  def conv(x, kernels, geom):
    return forward(x, kernels, geom)[0]

  def forward(x, kernels, geom):
    out = static_ops._shifted_depthwise_forward(x, kernels, geom)  # pylint: disable=protected-access
    return lax.optimization_barrier(out), (x, kernels)

  def backward(geom, residuals, cotangent):
    x, kernels = residuals
    # Kept whole too, or the producer of the gradient (batch-norm backward)
    # could be fused into every tap's reduction.
    cotangent = lax.optimization_barrier(cotangent)
    # The library's backward; with another kernel_grad, XLA drops its
    # per-tap kernel gradient, which nothing reads.
    dx, d_kernels = static_ops._shifted_depthwise_backward(geom, residuals, cotangent)  # pylint: disable=protected-access
    if kernel_grad == 'one_pass':
      d_kernels = _one_pass_kernel_grad(x, kernels, geom, cotangent)
    elif kernel_grad == 'xla':
      _, pullback = jax.vjp(
          lambda k: ops.per_example_vmap_conv(x, k, geom), kernels)
      d_kernels, = pullback(cotangent)
    return lax.optimization_barrier(dx), d_kernels

  conv.defvjp(forward, backward)
  return conv


CANDIDATES = {f'barrier_{grad}_dk': materialized_shifted(grad)
              for grad in KERNEL_GRADS}
VARIANTS = ('static', 'auto', 'depthwise=vmap', *CANDIDATES)


@contextlib.contextmanager
def depthwise_form(variant: str):
  """Per-example depthwise convs traced inside take the variant's form.

  Yields a list that gets one entry per conv the candidate replaced.
  """
  original = static_ops.shifted_depthwise_conv
  candidate = CANDIDATES.get(variant)
  replaced = []

  def shifted(x, kernels, geom):
    per_example = kernels.shape[0] == x.shape[0] > 1
    if candidate is None or not per_example or geom.input_dilation != (1, 1):
      return original(x, kernels, geom)
    replaced.append(x.shape)
    return candidate(x, kernels, geom)

  static_ops.shifted_depthwise_conv = shifted
  try:
    yield replaced
  finally:
    static_ops.shifted_depthwise_conv = original


def runner(variant: str, batch: int, dtype: str, experts: int):
  entry = model_bench.ENTRIES['efficientnet_b0']
  strategy = 'depthwise=vmap' if variant == 'depthwise=vmap' else 'auto'
  with depthwise_form(variant) as replaced:
    built = model_bench.jax_runner(
        entry, 0 if variant == 'static' else experts, batch, dtype, strategy)
  if variant in CANDIDATES and not replaced:
    raise RuntimeError(f'{variant}: no depthwise conv of the model took the '
                       'candidate form; the library no longer calls '
                       'static_ops.shifted_depthwise_conv for them.')
  return built


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variants', nargs='+', default=list(VARIANTS),
                      choices=VARIANTS)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--dtype', default='bfloat16', choices=model_bench.DTYPES)
  parser.add_argument('--experts', type=int, default=8)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--cache-dir', default=None,
                      help='persistent compilation cache to read and fill')
  args = parser.parse_args()
  cpu_setup.use_tcmalloc()
  model_bench.use_compilation_cache(args.cache_dir)
  print(f'# {model_bench.machine()}; jax {jax.__version__} '
        f'({jax.devices()[0].device_kind}); EfficientNet-B0, batch '
        f'{args.batch}, {args.dtype}, {args.experts} experts, best of '
        f'{args.steps}', flush=True)
  runners = {}
  best = {}
  for variant in args.variants:
    start = time.perf_counter()
    runners[variant] = runner(variant, args.batch, args.dtype, args.experts)
    built = time.perf_counter() - start
    # Warm-up, and this variant's figure should the time limit cut the rest.
    model_bench.time_steps({variant: runners[variant]}, 3, best)
    memory = runners[variant].train_memory
    print(f'# {variant}: built in {built:.0f} s, train GiB '
          f'{memory / 2**30 if memory else float("nan"):.1f}, alone: train '
          f'{best[variant, "train"] * 1e3:.2f} ms, infer '
          f'{best[variant, "infer"] * 1e3:.2f} ms', flush=True)
  best = {}
  model_bench.time_steps(runners, args.steps, best)
  print('| variant | train ms | infer ms | train: static/this | infer: '
        'static/this | train: auto/this | infer: auto/this |')
  print('|---|---:|---:|---:|---:|---:|---:|')
  for variant in runners:
    cells = [f'{best[variant, m] * 1e3:.2f}' for m in ('train', 'infer')]
    for reference in ('static', 'auto'):
      cells += [model_bench.ratio(best[reference, m], best[variant, m])
                if reference in runners else '–' for m in ('train', 'infer')]
    print(f'| {variant} | ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
  main()
