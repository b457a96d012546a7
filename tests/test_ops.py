"""Every strategy, and the per-example forms under them, against the float64
mixture-of-experts reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import condconv_jax
from condconv_jax import ops
from condconv_jax.geometry import conv_geometry
from tests import reference

STRATEGIES = ('vmap', 'experts', 'direct', 'loop', 'auto')

# (name, batch, (H, W), Cin, Cout, kernel, strides, padding, input_dilation,
#  kernel_dilation, groups, num_experts)
CASES = [
    ('3x3 same', 2, (7, 5), 4, 6, (3, 3), (1, 1), 'SAME', 1, 1, 1, 3),
    ('3x3 stride2 odd', 1, (7, 6), 3, 5, (3, 3), (2, 2), 'SAME', 1, 1, 1, 4),
    ('3x3 valid stride21', 3, (6, 7), 4, 4, (3, 3), (2, 1), 'VALID', 1, 1, 1,
     2),
    ('5x3 explicit pads', 2, (6, 5), 3, 4, (5, 3), (1, 1), ((2, 1), (0, 2)), 1,
     1, 1, 3),
    ('int padding', 2, (5, 5), 3, 4, (3, 3), (1, 1), 1, 1, 1, 1, 2),
    ('kernel dilation', 2, (8, 7), 3, 4, (3, 3), (1, 1), 'SAME', 1, 2, 1, 3),
    ('input dilation', 2, (4, 5), 3, 4, (3, 3), (1, 1), ((1, 1), (2, 1)), 2,
     1, 1, 3),
    ('groups', 2, (6, 5), 4, 6, (3, 3), (1, 1), 'SAME', 1, 1, 2, 3),
    ('depthwise', 2, (7, 6), 4, 4, (3, 3), (1, 1), 'SAME', 1, 1, 4, 3),
    ('depthwise mult2 stride2', 3, (7, 7), 3, 6, (3, 3), (2, 2), 'SAME', 1, 1,
     3, 2),
    ('depthwise 5x5 dilated valid', 1, (11, 10), 2, 2, (5, 5), (1, 1),
     'VALID', 1, 2, 2, 3),
    ('1x1', 3, (5, 4), 5, 7, (1, 1), (1, 1), 'SAME', 1, 1, 1, 4),
    ('1x1 stride2 padded', 2, (5, 6), 3, 4, (1, 1), (2, 2), 1, 1, 1, 1, 3),
    ('1x1 on 1x1 classifier', 3, (1, 1), 6, 5, (1, 1), (1, 1), 'SAME', 1, 1,
     1, 4),
    ('1x1 stride2 odd', 2, (5, 7), 3, 4, (1, 1), (2, 2), 'SAME', 1, 1, 1, 3),
    ('one expert', 2, (5, 5), 3, 4, (3, 3), (1, 1), 'SAME', 1, 1, 1, 1),
]


def rel_err(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected)
  return np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)),
                                                 1e-30)


def make_case(case, use_bias=True, seed=0):
  (_, batch, (h, w), cin, cout, (kh, kw), strides, padding, in_dil, k_dil,
   groups, num_experts) = case
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, h, w, cin))
  experts = rng.standard_normal((num_experts, kh, kw, cin // groups, cout))
  routing = rng.uniform(0.05, 1.0, (batch, num_experts))
  bias = rng.standard_normal((num_experts, cout)) if use_bias else None
  kwargs = dict(strides=strides, padding=padding,
                input_dilation=(in_dil, in_dil) if isinstance(in_dil, int)
                else in_dil,
                kernel_dilation=(k_dil, k_dil), feature_group_count=groups)
  conv = reference.Conv(x.shape, experts.shape[1:], strides, padding,
                        kwargs['input_dilation'], kwargs['kernel_dilation'],
                        groups)
  return x, experts, routing, bias, kwargs, conv


@pytest.mark.parametrize('strategy', STRATEGIES)
@pytest.mark.parametrize('case', CASES, ids=[c[0] for c in CASES])
def test_strategy_matches_float64_mixture_of_experts(case, strategy):
  use_bias = case[0] != '1x1'  # one case without bias
  x, experts, routing, bias, kwargs, conv = make_case(case, use_bias)
  f32 = lambda a: None if a is None else jnp.asarray(a, jnp.float32)

  def layer(x, experts, routing, bias):
    return condconv_jax.conditional_conv(x, experts, routing, bias,
                                         strategy=strategy, **kwargs)

  expected = reference.mixture_of_experts(conv, x, experts, routing, bias)
  y = jax.jit(layer)(f32(x), f32(experts), f32(routing), f32(bias))
  assert y.shape == expected.shape
  assert rel_err(y, expected) <= 1e-5

  dy = np.random.default_rng(1).standard_normal(expected.shape)
  expected_grads = reference.mixture_of_experts_vjp(conv, x, experts, routing,
                                                    bias, dy)
  argnums = (0, 1, 2, 3) if use_bias else (0, 1, 2)
  loss = lambda *args: jnp.vdot(layer(*args), f32(dy))
  grads = jax.jit(jax.grad(loss, argnums=argnums))(
      f32(x), f32(experts), f32(routing), f32(bias))
  for name, got, want in zip(('x', 'experts', 'routing', 'bias'), grads,
                             expected_grads):
    assert rel_err(got, want) <= 1e-5, name


def test_mix_experts_is_weighted_sum():
  rng = np.random.default_rng(0)
  experts = rng.standard_normal((3, 2, 2, 4, 5))
  routing = rng.standard_normal((6, 3))
  expected = np.einsum('be,ehwio->bhwio', routing, experts)
  got = condconv_jax.mix_experts(jnp.asarray(routing, jnp.float32),
                                 jnp.asarray(experts, jnp.float32))
  assert rel_err(got, expected) <= 1e-6


@pytest.mark.parametrize('implementation', ['xla', 'shifted', 'auto'])
@pytest.mark.parametrize('strides,padding,multiplier',
                         [(1, 'SAME', 1), (2, 'VALID', 2), (2, 'SAME', 1)])
def test_static_depthwise_matches_reference(implementation, strides, padding,
                                            multiplier):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 7, 6, 3))
  kernel = rng.standard_normal((3, 3, 1, 3 * multiplier))
  conv = reference.Conv(x.shape, kernel.shape, (strides, strides), padding,
                        groups=3)
  expected = conv.apply(x, np.broadcast_to(kernel, (2, *kernel.shape)))
  got = condconv_jax.depthwise_conv(
      jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32),
      strides=strides, padding=padding, implementation=implementation)
  assert rel_err(got, expected) <= 1e-5


def test_reference_agrees_with_numpy_correlate():
  # The reference itself, against a one-line definition for a plain case.
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 6, 5, 1))
  k = rng.standard_normal((3, 3, 1, 1))
  conv = reference.Conv(x.shape, k.shape, padding='VALID')
  got = conv.apply(x, k[None])[0, :, :, 0]
  want = np.array([[np.sum(x[0, i:i + 3, j:j + 3, 0] * k[:, :, 0, 0])
                    for j in range(3)] for i in range(4)])
  np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize('kwargs,match', [
    (dict(strategy='fastest'), 'strategy'),
    (dict(feature_group_count=3), 'divisible by feature_group_count'),
    (dict(padding='CIRCULAR'), 'padding'),
    (dict(strides=0), 'strides'),
])
def test_conditional_conv_rejects_bad_arguments(kwargs, match):
  x = jnp.ones((2, 5, 5, 4))
  experts = jnp.ones((3, 3, 3, 4, 4))
  with pytest.raises(ValueError, match=match):
    condconv_jax.conditional_conv(x, experts, jnp.ones((2, 3)), **kwargs)


def test_conditional_conv_rejects_bad_shapes():
  x = jnp.ones((2, 5, 5, 4))
  experts = jnp.ones((3, 3, 3, 4, 4))
  with pytest.raises(ValueError, match='routing_weights'):
    condconv_jax.conditional_conv(x, experts, jnp.ones((2, 4)))
  with pytest.raises(ValueError, match='rank 4'):
    condconv_jax.conditional_conv(x[0], experts, jnp.ones((2, 3)))
  with pytest.raises(ValueError, match='bias'):
    condconv_jax.conditional_conv(x, experts, jnp.ones((2, 3)),
                                  jnp.ones((3, 5)))
  with pytest.raises(ValueError, match='too small'):
    condconv_jax.conditional_conv(x[:, :2, :2], experts, jnp.ones((2, 3)),
                                  padding='VALID')


def assert_per_example_conv_matches(f, conv, x, kernels, rng):
  """f(x, kernels) (one kernel per example) against the float64 reference
  conv: values, and the gradients for a random cotangent drawn from rng."""
  expected = conv.apply(x, kernels)
  dy = rng.standard_normal(expected.shape)
  dx_want, dk_want = conv.vjp(x, kernels, dy)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  assert rel_err(jax.jit(f)(f32(x), f32(kernels)), expected) <= 1e-5
  dx, dk = jax.jit(jax.grad(lambda x, k: jnp.vdot(f(x, k), f32(dy)),
                            argnums=(0, 1)))(f32(x), f32(kernels))
  assert rel_err(dx, dx_want) <= 1e-5
  assert rel_err(dk, dk_want) <= 1e-5


@pytest.mark.parametrize('kernel,strides,padding,dilation', [
    (3, 1, 'SAME', 1), (3, 2, 'SAME', 1), (5, 1, 'VALID', 2),
    (1, 2, 'SAME', 1), (2, 1, ((0, 1), (1, 0)), 1)])
def test_per_example_matmul_conv_gradients(kernel, strides, padding, dilation):
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 9, 10, 3))
  kernels = rng.standard_normal((2, kernel, kernel, 3, 4))
  geom = conv_geometry(x.shape, kernels.shape[1:], strides=strides,
                       padding=padding, kernel_dilation=dilation)
  conv = reference.Conv(x.shape, kernels.shape[1:], (strides,) * 2, padding,
                        kernel_dilation=(dilation,) * 2)
  assert_per_example_conv_matches(
      lambda x, k: ops.per_example_matmul_conv(x, k, geom), conv, x, kernels,
      rng)
