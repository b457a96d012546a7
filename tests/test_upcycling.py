"""upcycle: a static model's variables as its CondConv twin's, with the
same logits at step 0, on the zoo's models (a 1x1 CondConv classifier
from a Dense layer, EfficientNet's shared per-block routing) and with
softmax routing; and the errors for models that are not twins."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from condconv_jax import CondConv, Routing, upcycle
from condconv_jax.models import get_model


def rel_err(got, want):
  return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


def randomized(variables, seed=0):
  """Every leaf redrawn (BatchNorm variances positive): a trained-looking
  static model, so that nothing passes by being zero or one."""
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = [jnp.abs(jax.random.normal(k, x.shape)) * 0.5 + 0.5
         if x.ndim == 1 else 0.3 * jax.random.normal(k, x.shape)
         for k, x in zip(keys, leaves)]
  return jax.tree.unflatten(tree, new)


def static_and_twin(name, size, **kwargs):
  static = get_model(name, **kwargs)
  twin = get_model(name, num_experts=8, **kwargs)
  x = jax.random.normal(jax.random.key(1), (2, size, size, 3))
  variables = randomized(jax.jit(static.init)(jax.random.key(0), x))
  return static, twin, variables, x


# Training mode too where BatchNorm's batch statistics are well conditioned:
# at EfficientNet's 1x1 last maps a batch of 2 normalizes 2 values, which
# turns float rounding into any sign.
@pytest.mark.parametrize('name,size,modes', [
    ('mobilenet_v1_mini', 28, (False, True)),
    pytest.param('efficientnet_b0', 32, (False,),
                 marks=pytest.mark.slow)])  # the slowest twin: -m slow
def test_twin_has_the_static_models_logits_at_step_zero(name, size, modes):
  static, twin, variables, x = static_and_twin(
      name, size, num_classes=7, dropout_rate=0.0, drop_path_rate=0.0)
  upcycled = upcycle(variables, twin, input_shape=x.shape)
  for train in modes:
    run = lambda model, v: jax.jit(functools.partial(
        model.apply, train=train, mutable=['batch_stats']))(v, x)[0]
    want = run(static, variables)
    # Random weights make the logits huge: the error relative to their scale.
    assert rel_err(run(twin, upcycled), want) <= 2e-5
  # Statistics carried over, experts not identical.
  np.testing.assert_array_equal(
      jax.tree.leaves(upcycled['batch_stats'])[0],
      jax.tree.leaves(variables['batch_stats'])[0])
  flat = traverse_util.flatten_dict(upcycled['params'])
  experts = [v for p, v in flat.items() if p[-1] == 'kernel' and
             v.ndim == 5 and 'routing' not in p]
  assert experts and all(float(jnp.std(e - e[:1])) > 0 for e in experts)
  routing = [v for p, v in flat.items() if 'routing' in p]
  assert routing and all(not jnp.any(v) for v in routing)


class Net(nn.Module):
  """A static conv net, or its CondConv twin with the given routing."""
  routing: object = None

  @nn.compact
  def __call__(self, x):
    if self.routing is None:
      conv = functools.partial(nn.Conv, kernel_size=(3, 3))
    else:
      conv = functools.partial(CondConv, kernel_size=(3, 3), num_experts=4,
                               routing=self.routing)
    x = nn.relu(conv(8, name='conv1')(x))
    return conv(5, strides=2, name='conv2')(x)


def test_softmax_routing_mixes_with_weight_one_over_e():
  x = jax.random.normal(jax.random.key(1), (2, 9, 9, 3))
  variables = randomized(Net().init(jax.random.key(0), x))
  twin = Net(routing=functools.partial(Routing, activation='softmax',
                                       temperature=30.0))
  upcycled = upcycle(variables, twin, input_shape=x.shape)
  np.testing.assert_allclose(twin.apply(upcycled, x),
                             Net().apply(variables, x), rtol=1e-5, atol=1e-5)
  kernel = upcycled['params']['conv1']['kernel']  # [4, 3, 3, 3, 8]
  np.testing.assert_allclose(kernel.mean(0),
                             variables['params']['conv1']['kernel'],
                             rtol=1e-5, atol=1e-6)


def test_models_that_are_not_twins_are_named():
  x = jnp.zeros((1, 28, 28, 3))
  mini = get_model('mobilenet_v1_mini', num_classes=7)
  variables = mini.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='no CondConv routing function'):
    upcycle(variables, mini, input_shape=x.shape)
  other = get_model('mobilenet_v1_mini', num_classes=9, num_experts=4)
  with pytest.raises(ValueError, match=r'parameter classifier/fc/bias: the '
                     r'static model has shape \(7,\), the CondConv twin '
                     r'\(4, 9\); they are not twins'):
    upcycle(variables, other, input_shape=x.shape)
  net = Net().init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='no counterpart|no place'):
    upcycle(net, get_model('mobilenet_v1_mini', num_experts=4),
            input_shape=x.shape)
  short = dict(variables, batch_stats=dict(variables['batch_stats']))
  short['batch_stats'].pop('bn_stem')
  with pytest.raises(ValueError, match='batch_stats of the static model and '
                     'the CondConv twin differ'):
    upcycle(short, get_model('mobilenet_v1_mini', num_classes=7,
                             num_experts=4), input_shape=x.shape)


class MixedNet(nn.Module):
  """CondConvs with a sigmoid and a softmax routing: no single r0."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(CondConv(8, (3, 3), num_experts=4, name='conv1')(x))
    return CondConv(5, (3, 3), strides=2, num_experts=4, name='conv2',
                    routing=functools.partial(Routing,
                                              activation='softmax'))(x)


class NoBiasNet(nn.Module):
  """Net's static twin without biases."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), use_bias=False, name='conv1')(x))
    return nn.Conv(5, (3, 3), strides=2, use_bias=False, name='conv2')(x)


def test_mixed_routing_activations_are_refused_and_missing_biases_zero():
  x = jnp.ones((1, 6, 6, 3))
  static = randomized(NoBiasNet().init(jax.random.key(0), x))
  with pytest.raises(ValueError, match='different weights at zero'):
    upcycle(static, MixedNet(), input_shape=x.shape)
  # A CondConv with a bias over a static conv without one: zero biases.
  twin = Net(routing=Routing)
  variables = upcycle(static, twin, input_shape=x.shape)
  assert not jnp.any(variables['params']['conv1']['bias'])
  np.testing.assert_allclose(twin.apply(variables, x),
                             NoBiasNet().apply(static, x), rtol=1e-5,
                             atol=1e-5)
