"""A static k x k conv's kernel gradient: XLA's against one im2col matmul.

    python -m benchmarks.kernel_grad_bench           # the shapes below
    python -m benchmarks.kernel_grad_bench --shapes 16,56,64,64,3,1

`static_ops.static_form` switches a k x k conv (one group) on CPU to
`static_ops.im2col_grad_conv` from `static_ops.IM2COL_GRAD_MIN_OUTPUTS`
output pixels in the batch (B*Ho*Wo, the length of the kernel gradient's
reduction). This
times both kernel gradients, alternating, best of --repeats, for each shape,
with the forward conv and XLA's input gradient for scale, so the threshold
can be checked on another CPU. Shapes: B,H,Cin,Cout,k,stride (square, SAME).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import model_bench
from condconv_jax import cpu_setup, static_ops
from condconv_jax.geometry import conv_geometry

# ResNet-50's 3x3 layers and stem and the MobileNet stem at batch 16, and
# the threshold's neighbourhood (batch 1 and 64, 19x19: the SSD's size).
SHAPES = ('16,56,64,64,3,1', '16,56,128,128,3,2', '16,28,128,128,3,1',
          '16,14,256,256,3,1', '16,7,512,512,3,1', '16,224,3,64,7,2',
          '16,224,3,32,3,2', '1,56,64,64,3,1', '1,28,128,128,3,1',
          '64,14,256,256,3,1', '16,28,256,256,3,1', '16,19,256,256,3,1')


def kernel_gradients(geom):
  """name -> f(x, kernel, dy) computing one part of the conv's backward."""
  conv = lambda x, k: static_ops.static_conv(x, k, geom)
  return {
      'forward': lambda x, k, dy: conv(x, k),
      'xla dx': lambda x, k, dy: jax.vjp(lambda x_: conv(x_, k), x)[1](dy)[0],
      'xla dk': lambda x, k, dy: jax.vjp(lambda k_: conv(x, k_), k)[1](dy)[0],
      'im2col dk': lambda x, k, dy: jax.vjp(
          lambda k_: static_ops.im2col_grad_conv(x, k_, geom), k)[1](dy)[0],
  }


def time_shape(spec: str, repeats: int) -> dict:
  batch, size, cin, cout, kernel, stride = map(int, spec.split(','))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, size, size, cin), np.float32))
  k = jnp.asarray(rng.standard_normal((kernel, kernel, cin, cout),
                                      np.float32))
  geom = conv_geometry(x.shape, k.shape, strides=stride)
  out_h, out_w = geom.out_spatial
  dy = jnp.asarray(rng.standard_normal((batch, out_h, out_w, cout),
                                       np.float32))
  compiled = {name: jax.jit(f).lower(x, k, dy).compile()
              for name, f in kernel_gradients(geom).items()}
  want = np.asarray(compiled['xla dk'](x, k, dy), np.float64)
  got = np.asarray(compiled['im2col dk'](x, k, dy), np.float64)
  error = np.abs(got - want).max() / np.abs(want).max()
  if error > 1e-4:
    raise AssertionError(f'{spec}: the two kernel gradients differ ({error})')
  best = {}
  for round_ in range(repeats + 1):  # the first round warms up
    for name, f in compiled.items():
      start = time.perf_counter()
      jax.block_until_ready(f(x, k, dy))
      if round_:
        best[name] = min(best.get(name, float('inf')),
                         time.perf_counter() - start)
  return {'outputs': batch * out_h * out_w, 'times': best,
          'form': static_ops.static_form(geom, 'cpu', batch)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--shapes', nargs='+', default=list(SHAPES),
                      help='B,H,Cin,Cout,k,stride')
  parser.add_argument('--repeats', type=int, default=8)
  args = parser.parse_args()
  cpu_setup.use_tcmalloc()
  print(f'# {model_bench.machine()}; jax {jax.__version__} '
        f'({jax.default_backend()}); allocator: {cpu_setup.allocator()}; '
        f'threshold {static_ops.IM2COL_GRAD_MIN_OUTPUTS} outputs')
  print('| B,H,Cin,Cout,k,stride | B*Ho*Wo | forward | xla dx | xla dk | '
        'im2col dk | im2col / xla dk | static_form |')
  print('|---|---:|---:|---:|---:|---:|---:|---|')
  for spec in args.shapes:
    row = time_shape(spec, args.repeats)
    t = {name: f'{v * 1e3:.1f} ms' for name, v in row['times'].items()}
    ratio = row['times']['im2col dk'] / row['times']['xla dk']
    print(f'| {spec} | {row["outputs"]} | {t["forward"]} | {t["xla dx"]} | '
          f'{t["xla dk"]} | {t["im2col dk"]} | {ratio:.2f} | {row["form"]} |',
          flush=True)


if __name__ == '__main__':
  main()
