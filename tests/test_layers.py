"""The Flax modules: nn.Conv parity, routing, init, transforms, dtypes, errors."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import condconv_jax
from condconv_jax import CondConv, DepthwiseConv, Routing, static_ops
from tests import reference

X = jax.random.normal(jax.random.key(0), (3, 9, 8, 6))


@pytest.mark.parametrize('conv_kwargs', [
    dict(kernel_size=(3, 3)),
    dict(kernel_size=(3, 3), strides=2, padding='VALID'),
    dict(kernel_size=(1, 1), use_bias=False),
    dict(kernel_size=(3, 3), feature_group_count=6, kernel_dilation=2),
    dict(kernel_size=(5, 3), padding=((2, 1), (0, 1)), feature_group_count=2),
])
@pytest.mark.parametrize('strategy', ['vmap', 'experts', 'direct', 'loop',
                                      'auto'])
def test_one_expert_with_weight_one_equals_nn_conv(conv_kwargs, strategy):
  # The models' static conv: nn.Conv computed in the backend's fast forms.
  static = nn.Conv(12, conv_general_dilated=static_ops.conv_general_dilated,
                   **conv_kwargs)
  static_vars = static.init(jax.random.key(1), X)
  cond = CondConv(12, num_experts=1, strategy=strategy, **conv_kwargs)
  params = {'kernel': static_vars['params']['kernel'][None]}
  if 'bias' in static_vars['params']:
    params['bias'] = static_vars['params']['bias'][None]
  ones = jnp.ones((X.shape[0], 1))
  got = cond.apply({'params': params}, X, ones)
  want = static.apply(static_vars, X)
  if strategy == 'experts':
    # The same static conv on the same kernel (r * W = W for r = 1):
    # bit-equal.
    np.testing.assert_array_equal(got, want)
  else:
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_parameters_and_per_expert_init():
  seen_shapes = []

  def recording_init(key, shape, dtype=jnp.float32):
    seen_shapes.append(shape)
    return nn.initializers.lecun_normal()(key, shape, dtype)

  layer = CondConv(10, (3, 3), num_experts=4, kernel_init=recording_init)
  variables = layer.init(jax.random.key(0), X)
  params = variables['params']
  assert params['kernel'].shape == (4, 3, 3, 6, 10)
  assert params['bias'].shape == (4, 10)
  assert params['routing']['dense']['kernel'].shape == (6, 4)
  # Each expert is initialized on its own shape, so fan-in is the static
  # conv's, and the experts differ from one another.
  assert seen_shapes == [(3, 3, 6, 10)] * 4
  kernel = np.asarray(params['kernel'])
  assert not np.allclose(kernel[0], kernel[1])
  np.testing.assert_array_equal(params['routing']['dense']['bias'], 0)


def test_per_expert_init_has_static_fan_in():
  layer = CondConv(64, (3, 3), num_experts=16, use_bias=False)
  x = jnp.ones((1, 4, 4, 32))
  kernel = layer.init(jax.random.key(0), x)['params']['kernel']
  expected_std = np.sqrt(1.0 / (3 * 3 * 32))  # lecun_normal of one expert
  assert abs(np.std(kernel) / expected_std - 1) < 0.05


def test_routing_weights_are_sown_and_used():
  layer = CondConv(5, (3, 3), num_experts=3)
  variables = layer.init(jax.random.key(0), X)
  y, state = layer.apply(variables, X, mutable=['intermediates'])
  (routing,) = state['intermediates']['routing']['routing_weights']
  assert routing.shape == (3, 3) and routing.dtype == jnp.float32
  params = variables['params']
  pooled = np.asarray(X, np.float64).mean(axis=(1, 2))
  dense = params['routing']['dense']
  expected = 1 / (1 + np.exp(-(pooled @ np.asarray(dense['kernel'], np.float64)
                               + np.asarray(dense['bias']))))
  np.testing.assert_allclose(routing, expected, rtol=1e-5)
  # Given the same weights explicitly, the output is the same.
  y2 = layer.apply({'params': params}, X, routing)
  np.testing.assert_allclose(y, y2, rtol=1e-6)


def test_external_routing_creates_no_routing_params():
  layer = CondConv(5, (3, 3), num_experts=3)
  variables = layer.init(jax.random.key(0), X, jnp.ones((3, 3)))
  assert set(variables['params']) == {'kernel', 'bias'}


def test_softmax_routing_with_temperature_and_dropout():
  routing = Routing(4, activation='softmax', temperature=30.0,
                    dropout_rate=0.5)
  variables = routing.init(jax.random.key(0), X)
  weights = routing.apply(variables, X)
  np.testing.assert_allclose(jnp.sum(weights, -1), 1.0, rtol=1e-6)
  # A high temperature flattens the distribution towards uniform.
  assert np.max(np.abs(weights - 0.25)) < 0.05
  dropped = routing.apply(variables, X, deterministic=False,
                          rngs={'dropout': jax.random.key(1)})
  kept = np.asarray(dropped) != 0
  assert 0 < kept.mean() < 1
  np.testing.assert_allclose(np.asarray(dropped)[kept],
                             2 * np.asarray(weights)[kept], rtol=1e-6)


def test_routing_dropout_through_condconv():
  layer = CondConv(5, (3, 3), num_experts=3,
                   routing=functools.partial(Routing, dropout_rate=0.9))
  variables = layer.init(jax.random.key(0), X)
  eval_out = layer.apply(variables, X)
  train_out = layer.apply(variables, X, deterministic=False,
                          rngs={'dropout': jax.random.key(2)})
  assert not np.allclose(eval_out, train_out)


def _loss(layer, params, x):
  return jnp.sum(layer.apply({'params': params}, x) ** 2)


@pytest.mark.parametrize('strategy', ['direct', 'loop', 'vmap'])
def test_jit_grad_vmap_remat_agree(strategy):
  layer = CondConv(7, (3, 3), num_experts=3, strategy=strategy)
  params = layer.init(jax.random.key(0), X)['params']
  grad = jax.grad(_loss, argnums=1)(layer, params, X)
  jit_grad = jax.jit(jax.grad(_loss, argnums=1), static_argnums=0)(
      layer, params, X)
  remat_layer = nn.remat(CondConv)(7, (3, 3), num_experts=3, strategy=strategy)
  remat_grad = jax.grad(_loss, argnums=1)(remat_layer, params, X)
  # Compiled as one program, XLA may sum a matmul in another order than op by
  # op: float32 rounding, so the bound is relative to each gradient's scale.
  for other in (jit_grad, remat_grad):
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(other)):
      np.testing.assert_allclose(a, b, rtol=1e-5,
                                 atol=1e-6 * np.max(np.abs(b)))
  # vmap over an extra leading axis == applying to each slice.
  stacked = jnp.stack([X, 2 * X])
  mapped = jax.vmap(lambda x: layer.apply({'params': params}, x))(stacked)
  for k in range(2):
    np.testing.assert_allclose(mapped[k],
                               layer.apply({'params': params}, stacked[k]),
                               rtol=1e-5, atol=1e-5)


def test_bf16_compute_with_float32_params():
  layer32 = CondConv(8, (3, 3), num_experts=4)
  layer16 = CondConv(8, (3, 3), num_experts=4, dtype=jnp.bfloat16)
  variables = layer16.init(jax.random.key(0), X)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  y16, state = layer16.apply(variables, X.astype(jnp.bfloat16),
                             mutable=['intermediates'])
  assert y16.dtype == jnp.bfloat16
  (routing,) = state['intermediates']['routing']['routing_weights']
  assert routing.dtype == jnp.float32
  y32 = layer32.apply(variables, X)
  assert np.max(np.abs(np.asarray(y16, np.float32) - y32)) < 0.05 * np.max(
      np.abs(y32))
  grads = jax.grad(lambda p: jnp.sum(layer16.apply(
      p, X.astype(jnp.bfloat16)).astype(jnp.float32)))(variables)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


def test_no_retrace_for_same_shapes():
  traces = []
  layer = CondConv(4, (3, 3), num_experts=2)
  params = layer.init(jax.random.key(0), X)['params']

  @jax.jit
  def step(params, x):
    traces.append(1)
    return layer.apply({'params': params}, x)

  step(params, X)
  step(params, X + 1)
  step(jax.tree.map(lambda p: p * 2, params), X)
  assert len(traces) == 1


def test_depthwise_module_equals_nn_conv():
  x = X[..., :4]
  static = nn.Conv(8, (3, 3), strides=2, feature_group_count=4)
  variables = static.init(jax.random.key(0), x)
  for implementation in ('shifted', 'xla', 'auto'):
    fast = DepthwiseConv(8, (3, 3), strides=2, implementation=implementation)
    np.testing.assert_allclose(fast.apply(variables, x),
                               static.apply(variables, x), rtol=1e-5,
                               atol=1e-6)
  with pytest.raises(ValueError, match='multiple of the input channels'):
    DepthwiseConv(6).init(jax.random.key(0), x)


@pytest.mark.parametrize('layer,args,match', [
    (CondConv(4, (3, 3), num_experts=0), (X,), 'num_experts'),
    (CondConv(4, (3, 3), feature_group_count=4), (X,),
     r'input channels \(6\) must be divisible by feature_group_count'),
    (CondConv(5, (3, 3), feature_group_count=3), (X,),
     r'features \(5\) must be divisible'),
    (CondConv(4, (3, 3), num_experts=3), (X, jnp.ones((3, 2))),
     'routing_weights'),
    (CondConv(4, (3, 3)), (X[0],), 'rank 4'),
    (CondConv(4, (3, 3), strategy='fast'), (X,), 'strategy'),
    (CondConv(4, (3, 3, 3)), (X,), 'kernel_size'),
    (Routing(3, activation='relu'), (X,), 'activation'),
])
def test_bad_input_raises_value_error_naming_the_argument(layer, args, match):
  with pytest.raises(ValueError, match=match):
    layer.init(jax.random.key(0), *args)


def test_module_output_matches_reference():
  layer = CondConv(5, (3, 3), strides=2, num_experts=3)
  variables = layer.init(jax.random.key(0), X)
  routing = jax.random.uniform(jax.random.key(3), (3, 3))
  got = layer.apply(variables, X, routing)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables['params'])
  conv = reference.Conv(X.shape, p['kernel'].shape[1:], (2, 2), 'SAME')
  want = reference.mixture_of_experts(conv, np.asarray(X, np.float64),
                                      p['kernel'], np.asarray(routing),
                                      p['bias'])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
