"""The NNX faces (condconv_jax.nnx) against the Linen modules and the float64
reference, checkpoints moved both ways, and condconvify on an NNX model
written the way public NNX model zoos write theirs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util

from condconv_jax import layers
from condconv_jax import nnx as ccnnx
from condconv_jax.models import get_model
from tests import reference

X = jax.random.normal(jax.random.key(0), (3, 9, 8, 6))


def linen_params(variables):
  return {'/'.join(k): v for k, v in
          traverse_util.flatten_dict(variables['params']).items()}


def nnx_params(module):
  return {'/'.join(map(str, k)): v[...] for k, v in
          nnx.to_flat_state(nnx.state(module, nnx.Param))}


def load_linen_into_nnx(module, variables):
  state = nnx.state(module, nnx.Param)
  flat = traverse_util.flatten_dict(variables['params'])
  for path, var in nnx.to_flat_state(state):
    var[...] = flat[tuple(map(str, path))]
  nnx.update(module, state)


def nnx_to_linen(module):
  flat = {tuple(k.split('/')): v for k, v in nnx_params(module).items()}
  return {'params': traverse_util.unflatten_dict(flat)}


# (Linen module, NNX module, input): the same layer in both APIs.
CONDCONV_CASES = {
    '3x3 stride2': dict(features=5, kernel_size=(3, 3), strides=2),
    'depthwise': dict(features=6, kernel_size=(3, 3), feature_group_count=6),
    'grouped 1x1 no bias': dict(features=4, kernel_size=(1, 1),
                                feature_group_count=2, use_bias=False),
    '3x3 dilated valid': dict(features=3, kernel_size=(3, 3),
                              kernel_dilation=2, padding='VALID'),
}


def nnx_condconv(kwargs, num_experts=3, seed=1, **extra):
  kwargs = dict(kwargs)
  return ccnnx.CondConv(6, kwargs.pop('features'), kwargs.pop('kernel_size'),
                        num_experts=num_experts, rngs=nnx.Rngs(seed),
                        **kwargs, **extra)


@pytest.mark.parametrize('name', sorted(CONDCONV_CASES))
def test_condconv_parameter_tree_is_linens_and_moves_both_ways(name):
  kwargs = CONDCONV_CASES[name]
  linen = layers.CondConv(num_experts=3, **kwargs)
  variables = linen.init(jax.random.key(0), X)
  layer = nnx_condconv(kwargs)
  assert ({k: v.shape for k, v in nnx_params(layer).items()} ==
          {k: v.shape for k, v in linen_params(variables).items()})
  # Linen -> NNX: the NNX layer computes the Linen layer's output.
  load_linen_into_nnx(layer, variables)
  np.testing.assert_allclose(layer(X), linen.apply(variables, X),
                             rtol=1e-6, atol=1e-6)
  # NNX -> Linen, from a fresh NNX layer.
  fresh = nnx_condconv(kwargs, seed=7)
  np.testing.assert_allclose(linen.apply(nnx_to_linen(fresh), X), fresh(X),
                             rtol=1e-6, atol=1e-6)


def test_condconv_matches_the_float64_mixture_of_experts():
  layer = ccnnx.CondConv(6, 5, (3, 3), strides=2, num_experts=3,
                         rngs=nnx.Rngs(0))
  routing = jax.random.uniform(jax.random.key(3), (3, 3))
  p = {k: np.asarray(v, np.float64) for k, v in nnx_params(layer).items()}
  conv = reference.Conv(X.shape, p['kernel'].shape[1:], (2, 2), 'SAME')
  want = reference.mixture_of_experts(conv, np.asarray(X, np.float64),
                                      p['kernel'], np.asarray(routing),
                                      p['bias'])
  np.testing.assert_allclose(layer(X, routing), want, rtol=1e-5, atol=1e-5)


def test_routing_weights_are_sown_as_intermediates():
  layer = nnx_condconv(CONDCONV_CASES['3x3 stride2'])
  _, intermediates = nnx.capture(layer, nnx.Intermediate)(X)
  (weights,) = intermediates['routing']['routing_weights'].get_value()
  pooled = X.mean((1, 2))
  dense = layer.routing.dense
  np.testing.assert_allclose(
      weights, jax.nn.sigmoid(pooled @ dense.kernel[...] + dense.bias[...]),
      rtol=1e-6)


@pytest.mark.parametrize('activation,temperature', [('sigmoid', 1.0),
                                                    ('softmax', 30.0)])
def test_routing_matches_linen(activation, temperature):
  linen = layers.Routing(4, activation=activation, temperature=temperature)
  variables = linen.init(jax.random.key(0), X)
  routing = ccnnx.Routing(6, 4, activation=activation,
                          temperature=temperature, rngs=nnx.Rngs(0))
  load_linen_into_nnx(routing, variables)
  np.testing.assert_allclose(routing(X), linen.apply(variables, X),
                             rtol=1e-6)


def test_routing_dropout_follows_train_and_eval_mode():
  layer = ccnnx.Routing(6, 4, dropout_rate=0.5, rngs=nnx.Rngs(0))
  layer.eval()
  assert np.all(np.asarray(layer(X)) > 0)
  layer.train()
  dropped = np.asarray(layer(X))
  assert np.any(dropped == 0) and np.any(dropped > 0)
  assert np.all(np.asarray(layer(X, deterministic=True)) > 0)


def test_shared_routing_weights_and_no_routing_of_its_own():
  layer = nnx_condconv(CONDCONV_CASES['3x3 stride2'], routing=False)
  assert 'routing' not in nnx_params(layer) and len(nnx_params(layer)) == 2
  weights = jnp.full((3, 3), 0.25)
  linen = layers.CondConv(num_experts=3, **CONDCONV_CASES['3x3 stride2'])
  variables = linen.init(jax.random.key(0), X, weights)
  assert set(linen_params(variables)) == set(nnx_params(layer))
  np.testing.assert_allclose(layer(X, weights),
                             linen.apply(nnx_to_linen(layer), X, weights),
                             rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match='pass routing_weights'):
    layer(X)


def test_depthwise_conv_is_nnx_convs_layer():
  static = nnx.Conv(6, 12, (3, 3), strides=2, feature_group_count=6,
                    rngs=nnx.Rngs(0))
  layer = ccnnx.DepthwiseConv(6, 12, (3, 3), strides=2, rngs=nnx.Rngs(1))
  assert ({k: v.shape for k, v in nnx_params(layer).items()} ==
          {k: v.shape for k, v in nnx_params(static).items()})
  nnx.update(layer, nnx.state(static, nnx.Param))
  np.testing.assert_allclose(layer(X), static(X), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('build,match', [
    (lambda: ccnnx.CondConv(6, 4, 3, num_experts=0, rngs=nnx.Rngs(0)),
     'num_experts must be an int >= 1'),
    (lambda: ccnnx.CondConv(6, 4, 3, feature_group_count=4, num_experts=2,
                            rngs=nnx.Rngs(0)), 'divisible'),
    (lambda: ccnnx.CondConv(6, 4, 3, num_experts=2, strategy='fast',
                            rngs=nnx.Rngs(0)), 'strategy'),
    (lambda: ccnnx.Routing(6, 4, activation='relu', rngs=nnx.Rngs(0)),
     'activation'),
    (lambda: ccnnx.Routing(6, 4, temperature=0.0, rngs=nnx.Rngs(0)),
     'temperature must be > 0'),
    (lambda: ccnnx.DepthwiseConv(6, 8, rngs=nnx.Rngs(0)), 'multiple'),
    (lambda: ccnnx.CondConv(4, 4, 3, num_experts=2, rngs=nnx.Rngs(0))(X),
     'x has 6 channels'),
])
def test_bad_arguments_are_named(build, match):
  with pytest.raises(ValueError, match=match):
    build()


# ------------------------------------------------------- condconvify


class Bottleneck(nnx.Module):
  """A basic residual block as NNX zoos write it (jax-ml/bonsai's ResNet
  style): explicit in_features, nnx.BatchNorm after each conv."""

  def __init__(self, channels, *, rngs):
    self.conv1 = nnx.Conv(channels, channels, (3, 3), padding='SAME',
                          use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(channels, rngs=rngs)
    self.conv2 = nnx.Conv(channels, channels, (3, 3), padding='SAME',
                          use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(channels, rngs=rngs)

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    return nnx.relu(x + self.bn2(self.conv2(y)))


class TinyResNet(nnx.Module):

  def __init__(self, *, rngs, num_classes=5, num_blocks=2):
    self.stem = nnx.Conv(3, 8, (7, 7), strides=2, padding=3, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.blocks = nnx.List([Bottleneck(8, rngs=rngs)
                            for _ in range(num_blocks)])
    self.head = nnx.Linear(8, num_classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.stem(x)))
    x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    for block in self.blocks:
      x = block(x)
    return self.head(x.mean(axis=(1, 2)))


IMAGES = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
LABELS = jnp.array([0, 1, 2, 3])


def convs_of(model, kind):
  return [path for path, node in nnx.iter_graph(model)
          if isinstance(node, kind)]


@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_condconvify_keeps_the_function_at_step_zero(mode):
  model = TinyResNet(rngs=nnx.Rngs(0))
  getattr(model, mode)()
  before = model(IMAGES)
  originals = {path: node.kernel[...] for path, node in nnx.iter_graph(model)
               if isinstance(node, nnx.Conv)}
  assert ccnnx.condconvify(model, num_experts=4, rngs=nnx.Rngs(1)) is model
  assert not convs_of(model, nnx.Conv)
  assert len(convs_of(model, ccnnx.CondConv)) == 5
  np.testing.assert_allclose(model(IMAGES), before, rtol=1e-5, atol=1e-5)
  for path, node in nnx.iter_graph(model):
    if isinstance(node, ccnnx.CondConv):
      experts = np.asarray(node.kernel[...], np.float64)
      # Not identical experts, but they mix to the original kernel.
      assert np.std(experts - experts[:1]) > 0
      np.testing.assert_allclose(0.5 * experts.sum(0), originals[path],
                                 rtol=1e-5, atol=1e-6)


def test_condconvify_trains_with_an_optimizer_and_routing_learns():
  model = TinyResNet(rngs=nnx.Rngs(0), num_blocks=1)  # a cheaper compile
  ccnnx.condconvify(model, num_experts=4, rngs=nnx.Rngs(1))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  def loss_fn(model):
    logits = model(IMAGES)
    return optax.softmax_cross_entropy_with_integer_labels(logits,
                                                           LABELS).mean()

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    routing = grads['blocks'][0]['conv1']['routing']['dense']['kernel']
    return loss, jnp.abs(routing[...]).max()

  loss, routing_grad = step(model, optimizer)
  assert float(routing_grad) > 0  # gradients from the first step
  losses = [float(loss)] + [float(step(model, optimizer)[0])
                            for _ in range(3)]
  assert losses[-1] < losses[0]
  kernel = model.blocks[0].conv1.routing.dense.kernel[...]
  assert float(jnp.abs(kernel).max()) > 0  # the router has moved


def test_condconvify_where_selects_convs():
  model = TinyResNet(rngs=nnx.Rngs(0))
  ccnnx.condconvify(model, num_experts=2, rngs=nnx.Rngs(1),
                    where=lambda path, conv: path[0] == 'blocks')
  assert convs_of(model, nnx.Conv) == [('stem',)]
  assert len(convs_of(model, ccnnx.CondConv)) == 4


class WithConv1d(nnx.Module):

  def __init__(self, *, rngs):
    self.conv2d = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.conv1d = nnx.Conv(4, 4, (3,), rngs=rngs)


@pytest.mark.parametrize('build,kwargs,match', [
    (lambda: nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0))), {},
     'holds no nnx.Conv'),
    (lambda: TinyResNet(rngs=nnx.Rngs(0)), {'num_experts': 0},
     'num_experts must be an int >= 1'),
    (lambda: TinyResNet(rngs=nnx.Rngs(0)),
     {'where': lambda path, conv: False}, 'selected none of the 5'),
    (lambda: WithConv1d(rngs=nnx.Rngs(0)), {},
     'nnx.Conv at conv1d is 1-D'),
])
def test_condconvify_refuses_what_it_cannot_convert(build, kwargs, match):
  model = build()
  before = nnx.to_flat_state(nnx.state(model))
  with pytest.raises(ValueError, match=match):
    ccnnx.condconvify(model, **{'num_experts': 2, 'rngs': nnx.Rngs(1),
                                **kwargs})
  # Nothing half-converted: every variable is where it was.
  after = nnx.to_flat_state(nnx.state(model))
  assert [path for path, _ in after] == [path for path, _ in before]
  assert not convs_of(model, ccnnx.CondConv)


class WithTiedConvs(nnx.Module):

  def __init__(self, *, rngs):
    self.first = nnx.Conv(3, 3, (3, 3), rngs=rngs)
    self.second = self.first  # the same module at two places


class InATuple(nnx.Module):

  def __init__(self, *, rngs):
    self.stem = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.pair = nnx.data((nnx.Conv(4, 4, (3, 3), rngs=rngs),))


@pytest.mark.parametrize('build,match', [
    (WithTiedConvs, 'also held elsewhere'),
    (InATuple, r'nnx.Conv at pair/0 sits in a tuple'),
])
def test_condconvify_changes_nothing_when_it_cannot_finish(build, match):
  model = build(rngs=nnx.Rngs(0))
  convs = [node for _, node in nnx.iter_graph(model)
           if isinstance(node, nnx.Conv)]
  with pytest.raises(ValueError, match=match):
    ccnnx.condconvify(model, num_experts=2, rngs=nnx.Rngs(1))
  assert [node for _, node in nnx.iter_graph(model)
          if isinstance(node, nnx.Conv)] == convs
  assert not convs_of(model, ccnnx.CondConv)


def test_both_faces_run_the_one_implementation(monkeypatch):
  # The forward math lives in layer_math: replacing it there changes the
  # Linen and the NNX layer alike.
  calls = []
  real = ccnnx.layer_math.condconv
  monkeypatch.setattr(ccnnx.layer_math, 'condconv',
                      lambda *a, **k: calls.append(1) or real(*a, **k))
  kwargs = CONDCONV_CASES['3x3 stride2']
  nnx_condconv(kwargs)(X)
  linen = layers.CondConv(num_experts=3, **kwargs)
  linen.apply(linen.init(jax.random.key(0), X), X)
  assert len(calls) == 3  # NNX call, Linen init, Linen apply


def test_a_zoo_model_trains_in_an_nnx_program():
  # The documented way (docs/nnx.md): the Linen zoo model bridged with
  # nnx.bridge.ToNNX, a jitted NNX train step with an nnx.Optimizer.
  images = jax.random.normal(jax.random.key(0), (8, 28, 28, 1))
  labels = jnp.arange(8) % 10
  linen = get_model('mobilenet_v1_mini', num_experts=4, num_classes=10,
                    width=0.25)
  model = nnx.bridge.ToNNX(linen, rngs=nnx.Rngs(params=0, dropout=1))
  model = model.lazy_init(images)
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, images, labels):
    def loss_fn(model):
      logits = model(images, train=True, mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, labels).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  stats = nnx.state(model, nnx.BatchStat).to_pure_dict()
  losses = [float(train_step(model, optimizer, images, labels))
            for _ in range(4)]
  assert losses[-1] < losses[0]
  assert any(np.any(a != b) for a, b in zip(
      jax.tree.leaves(stats),
      jax.tree.leaves(nnx.state(model, nnx.BatchStat).to_pure_dict())))
  # The trained state is the Linen model's variables: evaluate it there.
  variables = {'params': nnx.state(model, nnx.Param).to_pure_dict(),
               'batch_stats': nnx.state(model, nnx.BatchStat).to_pure_dict()}
  np.testing.assert_allclose(linen.apply(variables, images),
                             model(images, train=False), rtol=1e-5,
                             atol=1e-5)
