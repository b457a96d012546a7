"""pooling.max_pool against a float64 loop and flax's max_pool."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from condconv_jax import pooling


def loop_max_pool(x, window, strides, padding, dy):
  """float64 reference: the output, and the gradient routed to each
  window's first maximum in row-major window order."""
  (top, bottom), (left, right) = padding
  padded = np.pad(x.astype(np.float64), ((0, 0), (top, bottom),
                                         (left, right), (0, 0)),
                  constant_values=-np.inf)
  out_h = (padded.shape[1] - window[0]) // strides[0] + 1
  out_w = (padded.shape[2] - window[1]) // strides[1] + 1
  y = np.zeros((x.shape[0], out_h, out_w, x.shape[3]))
  d_padded = np.zeros(padded.shape)
  for b in range(x.shape[0]):
    for oh in range(out_h):
      for ow in range(out_w):
        for c in range(x.shape[3]):
          h0, w0 = oh * strides[0], ow * strides[1]
          patch = padded[b, h0:h0 + window[0], w0:w0 + window[1], c]
          i, j = np.unravel_index(np.argmax(patch), patch.shape)  # first
          y[b, oh, ow, c] = patch[i, j]
          if dy is not None:
            d_padded[b, h0 + i, w0 + j, c] += dy[b, oh, ow, c]
  dx = d_padded[:, top:top + x.shape[1], left:left + x.shape[2]]
  return y, dx


CASES = [
    ((2, 9, 8, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),  # ResNet's stem pool
    ((2, 10, 7, 2), (2, 3), (1, 2), ((0, 1), (2, 0))),
    ((1, 6, 6, 2), (3, 3), (3, 3), ((0, 0), (0, 0))),
    ((1, 5, 5, 1), (2, 2), (2, 2), ((1, 0), (0, 1))),
]


@pytest.mark.parametrize('ties', [False, True])
@pytest.mark.parametrize('shape,window,strides,padding', CASES)
def test_max_pool_matches_loop_and_flax(shape, window, strides, padding,
                                        ties):
  rng = np.random.default_rng(0)
  x = rng.standard_normal(shape)
  if ties:  # ReLU'd and rounded: most windows hold several equal maxima
    x = np.round(np.maximum(x, 0) * 2)
  y_want, _ = loop_max_pool(x, window, strides, padding, None)
  dy = rng.standard_normal(y_want.shape)
  _, dx_want = loop_max_pool(x, window, strides, padding, dy)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  ours = lambda x: pooling.max_pool(x, window, strides=strides,
                                    padding=padding)
  assert 'custom_vjp_call' in str(jax.make_jaxpr(ours)(f32(x)))  # fast form
  flax_pool = lambda x: nn.max_pool(x, window, strides=strides,
                                    padding=padding)
  y, pullback = jax.vjp(jax.jit(ours), f32(x))
  np.testing.assert_allclose(y, y_want, rtol=1e-6)
  np.testing.assert_allclose(pullback(f32(dy))[0], dx_want, rtol=1e-5,
                             atol=1e-6)
  flax_y, flax_pullback = jax.vjp(flax_pool, f32(x))
  np.testing.assert_array_equal(y, flax_y)
  np.testing.assert_allclose(pullback(f32(dy))[0], flax_pullback(f32(dy))[0],
                             rtol=1e-6, atol=1e-6)


def test_max_pool_nan_window_still_routes_its_gradient():
  x = jnp.asarray([[[[1.0], [np.nan]], [[np.nan], [0.0]]]])  # one 2x2 window
  dx = jax.grad(lambda x: pooling.max_pool(x, (2, 2), strides=(2, 2),
                                           padding=((0, 0), (0, 0))).sum())(x)
  np.testing.assert_array_equal(dx.ravel(), [0.0, 1.0, 0.0, 0.0])


@pytest.mark.parametrize('x,window,kwargs', [
    (np.arange(2 * 6 * 5 * 3.0).reshape(2, 6, 5, 3), (3, 3),
     dict(strides=(2, 2), padding='SAME')),  # string padding
    (np.arange(6 * 5 * 3.0).reshape(6, 5, 3), (2, 2), {}),  # no batch axis
    (np.arange(2 * 6 * 5 * 3).reshape(2, 6, 5, 3), (2, 2),
     dict(strides=(2, 2), padding=((1, 1), (0, 0)))),  # integers
    (np.ones((1, 2, 2, 1)), (5, 5), {}),  # window larger than the input
    (np.arange(30.0).reshape(1, 6, 5, 1), (2, 2),
     dict(padding=((-1, 0), (0, 0)))),  # negative padding
])
def test_max_pool_gives_flax_result_outside_the_fast_form(x, window, kwargs):
  """Whatever the fast form does not cover is flax's: same result."""
  x = jnp.asarray(x)
  np.testing.assert_array_equal(
      pooling.max_pool(x, window, **kwargs),
      nn.max_pool(x, window, **kwargs))
