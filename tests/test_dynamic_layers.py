"""DynamicConv and ODConv (Linen and NNX faces) against float64 NumPy
transcriptions of the papers' equations (tests/reference.py): values, and
gradients by central differences of the float64 transcription along random
directions, over strides, padding, groups, depthwise and 1x1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

import condconv_jax
from condconv_jax import layer_math
from condconv_jax import strategy as strategy_lib
from condconv_jax.geometry import conv_geometry
from condconv_jax import nnx as ccnnx
from tests import reference

# name: (x shape, layer kwargs). Cin = x.shape[-1].
CASES = {
    '3x3': ((2, 7, 6, 8), dict(features=6, kernel_size=(3, 3))),
    '3x3 stride2 valid': ((2, 9, 8, 4), dict(features=5, kernel_size=(3, 3),
                                             strides=2, padding='VALID')),
    '5x5 dilated': ((2, 9, 9, 4), dict(features=3, kernel_size=(5, 5),
                                       kernel_dilation=2)),
    'grouped 3x3': ((3, 6, 6, 8), dict(features=4, kernel_size=(3, 3),
                                       feature_group_count=2)),
    'depthwise': ((2, 7, 7, 6), dict(features=6, kernel_size=(3, 3),
                                     feature_group_count=6)),
    'depthwise stride2': ((2, 8, 8, 6), dict(features=6, kernel_size=(3, 3),
                                             strides=2,
                                             feature_group_count=6)),
    '1x1': ((3, 5, 4, 7), dict(features=5, kernel_size=(1, 1))),
    '1x1 stride2': ((2, 5, 6, 4), dict(features=6, kernel_size=(1, 1),
                                       strides=2)),
}
PER_EXAMPLE_STRATEGIES = ('vmap', 'direct', 'loop')


def reference_conv(x_shape, kwargs, num_experts=1):
  strides = kwargs.get('strides', 1)
  dilation = kwargs.get('kernel_dilation', 1)
  groups = kwargs.get('feature_group_count', 1)
  kh, kw = kwargs['kernel_size']
  return reference.Conv(x_shape, (kh, kw, x_shape[-1] // groups,
                                  kwargs['features']),
                        (strides, strides), kwargs.get('padding', 'SAME'),
                        kernel_dilation=(dilation, dilation), groups=groups)


def random_variables(variables, seed):
  """Every parameter drawn at unit scale (BN variance positive), so no
  attention saturates and each term of the equations matters."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(variables)
  out = {}
  for path, leaf in flat.items():
    value = rng.standard_normal(leaf.shape) * 0.5
    if path[-1] == 'var':
      value = rng.uniform(0.5, 2.0, leaf.shape)
    out[path] = value
  return traverse_util.unflatten_dict(out)


def directional_check(jax_fn, ref_fn, args, seed=0, directions=3,
                      eps=1e-5, tol=2e-4):
  """<grad jax_fn(args), v> against the central difference of the float64
  ref_fn along v, for random directions v over all of args."""
  grads = jax.jit(jax.grad(jax_fn))(
      jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), args))
  rng = np.random.default_rng(seed)
  for _ in range(directions):
    v = jax.tree.map(lambda a: rng.standard_normal(np.shape(a)), args)
    plus = ref_fn(jax.tree.map(lambda a, d: a + eps * d, args, v))
    minus = ref_fn(jax.tree.map(lambda a, d: a - eps * d, args, v))
    expected = (plus - minus) / (2 * eps)
    got = sum(float(np.vdot(np.asarray(g, np.float64), d)) for g, d in
              zip(jax.tree.leaves(grads), jax.tree.leaves(v)))
    assert abs(got - expected) <= tol * max(1.0, abs(expected)), (
        got, expected)


def rel_err(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected)
  return np.max(np.abs(actual - expected)) / np.max(np.abs(expected))


@pytest.mark.parametrize('case', list(CASES))
def test_dynamic_conv_matches_float64_equations(case):
  x_shape, kwargs = CASES[case]
  layer = condconv_jax.DynamicConv(num_experts=4, **kwargs)
  x = np.random.default_rng(1).standard_normal(x_shape)
  variables = random_variables(layer.init(jax.random.key(0),
                                          jnp.zeros(x_shape)), 2)
  conv = reference_conv(x_shape, kwargs)
  temperature = 3.0
  expected = reference.dynamic_conv(conv, x, variables['params'], temperature)
  got = jax.jit(layer.apply)(
      jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), variables),
      jnp.asarray(x, jnp.float32), temperature=temperature)
  assert rel_err(got, expected) <= 1e-5

  dy = np.random.default_rng(3).standard_normal(expected.shape)
  directional_check(
      lambda a: jnp.vdot(layer.apply(a[0], a[1], temperature=temperature),
                         jnp.asarray(dy, jnp.float32)),
      lambda a: np.vdot(reference.dynamic_conv(conv, a[1], a[0]['params'],
                                               temperature), dy),
      (variables, x))


@pytest.mark.parametrize('num_experts', [1, 4])
@pytest.mark.parametrize('case', list(CASES))
def test_odconv_matches_float64_equations(case, num_experts):
  x_shape, kwargs = CASES[case]
  layer = condconv_jax.ODConv(num_experts=num_experts, **kwargs)
  x = np.random.default_rng(1).standard_normal(x_shape)
  variables = random_variables(layer.init(jax.random.key(0),
                                          jnp.zeros(x_shape)), 2)
  stats = variables['batch_stats']['attention']['bn']
  conv = reference_conv(x_shape, kwargs)
  f32 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)
  for train in (False, True):
    expected = reference.odconv(conv, x, variables['params'], stats, 2.0,
                                train=train)
    got = layer.apply(f32(variables), f32(x), temperature=2.0, train=train,
                      mutable=['batch_stats'])[0]
    assert rel_err(got, expected) <= 1e-5, train

  dy = np.random.default_rng(3).standard_normal(expected.shape)

  def jax_loss(args):
    params, x_ = args
    y = layer.apply({'params': params, 'batch_stats': f32(
        variables['batch_stats'])}, x_, temperature=2.0)
    return jnp.vdot(y, jnp.asarray(dy, jnp.float32))

  directional_check(
      jax_loss,
      lambda a: np.vdot(reference.odconv(conv, a[1], a[0], stats, 2.0), dy),
      (variables['params'], x))


@pytest.mark.parametrize('case', ['3x3 stride2 valid', 'depthwise', '1x1'])
def test_every_per_example_strategy_computes_the_same_layer(case):
  """The float64 checks above run "auto"; the other forms agree with it in
  values and gradients (they are checked against the mixture-of-experts
  reference in test_ops)."""
  x_shape, kwargs = CASES[case]
  x = jax.random.normal(jax.random.key(0), x_shape)
  for family, k in ((condconv_jax.DynamicConv, 4), (condconv_jax.ODConv, 4),
                    (condconv_jax.ODConv, 1)):
    auto = family(num_experts=k, **kwargs)
    variables = random_variables(auto.init(jax.random.key(1), x), 5)

    def loss_and_grads(layer):
      loss = lambda v, x_: jnp.sum(jnp.sin(layer.apply(v, x_,
                                                       temperature=2.0)))
      return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(variables, x)

    want = loss_and_grads(auto)
    for strategy in PER_EXAMPLE_STRATEGIES:
      got = loss_and_grads(family(num_experts=k, strategy=strategy,
                                  **kwargs))
      for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5,
                                   err_msg=f'{family.__name__}-{k} {strategy}')


def test_odconv_skips_the_attentions_the_official_code_skips():
  """No filter attention for depthwise, no spatial one for 1x1, no kernel
  one for K = 1."""
  heads = lambda *a: set(layer_math.odconv_head_sizes(*a))
  assert heads(8, 16, 3, 1, 4) == {'channel', 'filter', 'spatial', 'kernel'}
  assert heads(8, 8, 3, 8, 4) == {'channel', 'spatial', 'kernel'}
  assert heads(8, 16, 1, 1, 1) == {'channel', 'filter'}
  assert heads(8, 16, (1, 3), 1, 1) == {'channel', 'filter', 'spatial'}
  # The hidden size: max(int(C / 16), 16).
  assert layer_math.odconv_hidden_features(64, 0.0625, 16) == 16
  assert layer_math.odconv_hidden_features(1024, 0.0625, 16) == 64


def test_experts_strategy_cannot_express_a_spatial_attention():
  x = jnp.ones((2, 5, 5, 4))
  layer = condconv_jax.ODConv(4, (3, 3), num_experts=4, strategy='experts')
  with pytest.raises(ValueError, match='spatial attention'):
    layer.init(jax.random.key(0), x)
  # 1x1 has no spatial attention: the experts form is exact there.
  one = condconv_jax.ODConv(4, (1, 1), num_experts=4)
  variables = one.init(jax.random.key(0), x)
  experts = condconv_jax.ODConv(4, (1, 1), num_experts=4, strategy='experts')
  np.testing.assert_allclose(experts.apply(variables, x),
                             one.apply(variables, x), rtol=1e-5, atol=1e-6)


def test_temperature_is_traced_not_compiled_in():
  """A schedule changes the temperature every step: one compilation."""
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
  for layer in (condconv_jax.DynamicConv(4, (3, 3)),
                condconv_jax.ODConv(4, (3, 3), num_experts=4)):
    variables = layer.init(jax.random.key(1), x)
    apply = jax.jit(lambda v, t: layer.apply(v, x, temperature=t))
    outs = [apply(variables, jnp.float32(t)) for t in (30.0, 10.0, 1.0)]
    assert apply._cache_size() == 1
    assert not np.allclose(outs[0], outs[2])


def test_high_temperature_flattens_the_kernel_attention():
  x = jax.random.normal(jax.random.key(0), (3, 6, 6, 8))
  layer = condconv_jax.DynamicConv(4, (3, 3), num_experts=4)
  variables = random_variables(layer.init(jax.random.key(1), x), 0)
  _, state = layer.apply(variables, x, temperature=1e4,
                         mutable=['intermediates'])
  (weights,) = state['intermediates']['attention']['routing_weights']
  np.testing.assert_allclose(weights, 0.25, atol=1e-3)


@pytest.mark.parametrize('build,match', [
    (lambda: condconv_jax.DynamicConv(4, 3, num_experts=0), 'num_experts'),
    (lambda: condconv_jax.ODConv(4, 3, num_experts=0), 'num_experts'),
    (lambda: condconv_jax.ODConv(5, 3, feature_group_count=2),
     'divisible by feature_group_count'),
    (lambda: condconv_jax.DynamicConv(4, 3, reduction=0), 'reduction'),
])
def test_bad_layer_arguments_are_named(build, match):
  with pytest.raises(ValueError, match=match):
    build().init(jax.random.key(0), jnp.ones((1, 5, 5, 4)))


@pytest.mark.parametrize('layer', [condconv_jax.DynamicConv(4, 3),
                                   condconv_jax.ODConv(4, 3)])
@pytest.mark.parametrize('temperature', [0.0, -1.0, np.float32(0.0),
                                         jnp.float32(-2.0)])
def test_temperature_must_be_positive(layer, temperature):
  x = jnp.ones((1, 5, 5, 4))
  variables = layer.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='temperature must be > 0'):
    layer.apply(variables, x, temperature=temperature)


def test_omni_dimensional_conv_names_a_bad_attention_shape():
  x, experts = jnp.ones((2, 5, 5, 4)), jnp.ones((3, 3, 3, 4, 6))
  with pytest.raises(ValueError, match='spatial_attention must be'):
    condconv_jax.omni_dimensional_conv(x, experts, jnp.ones((2, 3)),
                                       spatial_attention=jnp.ones((2, 9)))
  with pytest.raises(ValueError, match='kernel_attention'):
    condconv_jax.omni_dimensional_conv(x, experts)


# --- NNX faces: the same parameter tree, the same function. ---

def nnx_flat(module, kind):
  return {tuple(map(str, k)): v for k, v in
          nnx.to_flat_state(nnx.state(module, kind))}


def load_into_nnx(module, variables):
  for kind, collection in ((nnx.Param, 'params'),
                           (nnx.BatchStat, 'batch_stats')):
    flat = traverse_util.flatten_dict(variables.get(collection, {}))
    state = nnx.state(module, kind)
    for path, var in nnx.to_flat_state(state):
      var[...] = flat[tuple(map(str, path))]
    nnx.update(module, state)


@pytest.mark.parametrize('case', ['3x3 stride2 valid', 'depthwise', '1x1'])
@pytest.mark.parametrize('family', ['dynamic', 'od1', 'od4'])
def test_nnx_faces_have_linens_tree_and_function(case, family):
  x_shape, kwargs = CASES[case]
  kwargs = dict(kwargs)
  features, kernel_size = kwargs.pop('features'), kwargs.pop('kernel_size')
  if family == 'dynamic':
    linen = condconv_jax.DynamicConv(features, kernel_size, **kwargs)
    face = ccnnx.DynamicConv(x_shape[-1], features, kernel_size,
                             rngs=nnx.Rngs(0), **kwargs)
  else:
    k = int(family[-1])
    linen = condconv_jax.ODConv(features, kernel_size, num_experts=k,
                                **kwargs)
    face = ccnnx.ODConv(x_shape[-1], features, kernel_size, num_experts=k,
                        rngs=nnx.Rngs(0), **kwargs)
  x = jax.random.normal(jax.random.key(2), x_shape)
  variables = random_variables(linen.init(jax.random.key(1), x), 4)
  variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), variables)
  linen_shapes = {k: v.shape for k, v in
                  traverse_util.flatten_dict(variables['params']).items()}
  assert {k: v.shape for k, v in nnx_flat(face, nnx.Param).items()} == (
      linen_shapes)
  load_into_nnx(face, variables)
  face.eval()
  np.testing.assert_allclose(face(x, temperature=2.0),
                             linen.apply(variables, x, temperature=2.0),
                             rtol=1e-5, atol=1e-6)
  if family != 'dynamic':  # the attention's BatchNorm in training mode
    face.train()
    y_train = face(x, temperature=2.0)
    want, updates = linen.apply(variables, x, temperature=2.0, train=True,
                                mutable=['batch_stats'])
    np.testing.assert_allclose(y_train, want, rtol=1e-5, atol=1e-6)
    got_stats = nnx_flat(face, nnx.BatchStat)
    for path, value in traverse_util.flatten_dict(
        updates['batch_stats']).items():
      np.testing.assert_allclose(got_stats[path][...], value, rtol=1e-6)


def test_auto_runs_a_one_kernel_kxk_odconv_without_per_example_kernels():
  """K = 1, k x k, ungrouped: the taps scaled per example, one matmul with
  the static kernel ('scaled_patches'); depthwise and K > 1 keep the
  per-example rule. The float64 checks above run this path (K = 1)."""
  geom = lambda groups, cin=8: conv_geometry(
      (2, 7, 7, cin), (3, 3, cin // groups, 8), feature_group_count=groups)
  resolve = lambda g, **kw: strategy_lib.resolve('auto', g, 2, 1, 'cpu', **kw)
  assert resolve(geom(1), spatial_only=True) == 'scaled_patches'
  assert resolve(geom(1)) == 'loop'
  assert resolve(geom(8), spatial_only=True) == 'direct'
  assert strategy_lib.resolve('loop', geom(1), 2, 1, 'cpu',
                              spatial_only=True) == 'loop'
