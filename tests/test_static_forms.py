"""The static conv forms (ops.conv_general_dilated, the shifted depthwise
backward, the per-example matmul conv) against the float64 reference."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from condconv_jax import ops, strategy
from condconv_jax.geometry import conv_geometry
from tests import reference

# (name, batch, (H, W), Cin, Cout, kernel, strides, padding, kernel_dilation,
#  groups)
STATIC_CASES = [
    ('1x1', 2, (5, 4), 5, 7, 1, 1, 'SAME', 1, 1),
    ('1x1 stride2', 2, (7, 6), 3, 4, 1, 2, 'SAME', 1, 1),
    ('1x1 stride2 padded', 2, (5, 6), 3, 4, 1, 2, ((1, 0), (0, 1)), 1, 1),
    # Both sides odd: the strided output ends exactly at the input's edge.
    ('1x1 stride2 odd', 2, (5, 7), 3, 4, 1, 2, 'VALID', 1, 1),
    ('depthwise', 2, (7, 6), 4, 4, 3, 1, 'SAME', 1, 4),
    ('depthwise stride2 odd', 3, (7, 7), 3, 3, 3, 2, 'SAME', 1, 3),
    ('depthwise 5x5 stride2 even', 2, (8, 8), 2, 2, 5, 2, 'SAME', 1, 2),
    ('depthwise mult2 valid', 2, (7, 6), 3, 6, 3, 1, 'VALID', 1, 3),
    ('depthwise dilated', 1, (11, 10), 2, 2, 3, 1, 'SAME', 2, 2),
    ('depthwise big pad', 2, (5, 5), 2, 2, 3, 3, ((4, 1), (0, 3)), 1, 2),
    ('3x3 (xla)', 2, (6, 5), 3, 4, 3, 2, 'SAME', 1, 1),
    # At least IM2COL_GRAD_MIN_OUTPUTS (4096) output pixels: the im2col
    # kernel gradient.
    ('3x3 (im2col_grad)', 4, (32, 32), 3, 4, 3, 1, 'SAME', 1, 1),
    ('7x7 stride2 (im2col_grad)', 1, (130, 128), 2, 3, 7, 2, 'SAME', 1, 1),
    ('grouped (xla)', 2, (6, 5), 4, 6, 3, 1, 'SAME', 1, 2),
]


def rel_err(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected)
  return np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)),
                                                 1e-30)


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


@pytest.mark.parametrize('case', STATIC_CASES, ids=[c[0] for c in STATIC_CASES])
def test_conv_general_dilated_matches_float64_reference(case):
  _, batch, (h, w), cin, cout, k, strides, padding, dilation, groups = case
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, h, w, cin))
  kernel = rng.standard_normal((k, k, cin // groups, cout))
  conv = reference.Conv(x.shape, kernel.shape, (strides,) * 2, padding,
                        kernel_dilation=(dilation,) * 2, groups=groups)
  kernels = np.broadcast_to(kernel, (batch, *kernel.shape))
  expected = conv.apply(x, kernels)

  def f(x, kernel):
    return ops.conv_general_dilated(
        x, kernel, (strides,) * 2, padding, rhs_dilation=(dilation,) * 2,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=groups)

  if '(im2col_grad)' in case[0]:  # the form the case is there for
    geom = conv_geometry(x.shape, kernel.shape, strides=strides,
                         padding=padding)
    assert strategy.static_form(geom, 'cpu', batch) == 'im2col_grad'
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  y = jax.jit(f)(f32(x), f32(kernel))
  assert y.shape == expected.shape
  assert rel_err(y, expected) <= 1e-5
  dy = rng.standard_normal(expected.shape)
  dx_want, dk_want = conv.vjp(x, kernels.copy(), dy)
  dx, dk = jax.jit(jax.grad(lambda x, k: jnp.vdot(f(x, k), f32(dy)),
                            argnums=(0, 1)))(f32(x), f32(kernel))
  assert rel_err(dx, dx_want) <= 1e-5
  assert rel_err(dk, dk_want.sum(0)) <= 1e-5


@pytest.mark.parametrize('strides,padding,multiplier,dilation', [
    (1, 'SAME', 1, 1), (2, 'SAME', 2, 1), (3, 'VALID', 1, 1),
    (1, ((2, 0), (1, 3)), 1, 2)])
def test_shifted_depthwise_per_example_kernels_gradients(strides, padding,
                                                         multiplier, dilation):
  """The written-out backward with one kernel per example (CondConv's
  'direct' strategy)."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((3, 9, 8, 2))
  kernels = rng.standard_normal((3, 3, 3, 1, 2 * multiplier))
  geom = conv_geometry(x.shape, kernels.shape[1:], strides=strides,
                       padding=padding, kernel_dilation=dilation,
                       feature_group_count=2)
  conv = reference.Conv(x.shape, kernels.shape[1:], (strides,) * 2, padding,
                        kernel_dilation=(dilation,) * 2, groups=2)
  assert_per_example_conv_matches(
      lambda x, k: ops.shifted_depthwise_conv(x, k, geom), conv, x, kernels,
      rng)


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


@pytest.mark.parametrize('kernel,strides,padding,dilation', [
    (3, 1, 'SAME', 1), (3, 2, 'SAME', 1), (5, 1, 'VALID', 2),
    (2, 1, ((0, 1), (1, 0)), 1), (3, 3, ((2, 0), (1, 3)), 1)])
def test_im2col_grad_conv_gradients(kernel, strides, padding, dilation):
  """XLA's conv with the kernel gradient as one im2col matmul, at any
  size (the rule only uses it on large ones)."""
  rng = np.random.default_rng(3)
  x = rng.standard_normal((3, 9, 10, 3))
  kernel = rng.standard_normal((kernel, kernel, 3, 4))
  geom = conv_geometry(x.shape, kernel.shape, strides=strides,
                       padding=padding, kernel_dilation=dilation)
  conv = reference.Conv(x.shape, kernel.shape, (strides,) * 2, padding,
                        kernel_dilation=(dilation,) * 2)
  kernels = np.broadcast_to(kernel, (3, *kernel.shape)).copy()
  dy = rng.standard_normal(conv.apply(x, kernels).shape)
  dx_want, dk_want = conv.vjp(x, kernels, dy)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  f = lambda x, k: ops.im2col_grad_conv(x, k, geom)
  assert rel_err(jax.jit(f)(f32(x), f32(kernel)),
                 conv.apply(x, kernels)) <= 1e-5
  dx, dk = jax.jit(jax.grad(lambda x, k: jnp.vdot(f(x, k), f32(dy)),
                            argnums=(0, 1)))(f32(x), f32(kernel))
  assert rel_err(dx, dx_want) <= 1e-5
  assert rel_err(dk, dk_want.sum(0)) <= 1e-5


def test_im2col_grad_conv_kernel_gradient_is_a_matmul():
  """The kernel gradient alone (the image of a stem needs no input
  gradient) has no convolution left in it: one dot over the patches."""
  x = jnp.ones((2, 16, 16, 3))
  kernel = jnp.ones((3, 3, 3, 8))
  geom = conv_geometry(x.shape, kernel.shape, padding='SAME')
  grad = jax.jit(jax.grad(
      lambda k: ops.im2col_grad_conv(x, k, geom).sum()))
  hlo = grad.lower(kernel).as_text()
  assert 'convolution' not in hlo
  assert 'dot_general' in hlo


@pytest.mark.parametrize('kwargs', [
    dict(features=8, kernel_size=(1, 1)),
    dict(features=8, kernel_size=(1, 1), strides=2, use_bias=False),
    dict(features=6, kernel_size=(3, 3), feature_group_count=6),
    dict(features=8, kernel_size=(3, 3), strides=2),
])
def test_nn_conv_with_fast_forms_keeps_parameters_and_output(kwargs):
  x = jax.random.normal(jax.random.key(0), (2, 9, 8, 6))
  plain = nn.Conv(**kwargs)
  fast = nn.Conv(conv_general_dilated=ops.conv_general_dilated, **kwargs)
  variables = plain.init(jax.random.key(1), x)
  fast_variables = fast.init(jax.random.key(1), x)
  jax.tree.map(np.testing.assert_array_equal, variables, fast_variables)
  np.testing.assert_allclose(fast.apply(variables, x), plain.apply(variables, x),
                             rtol=1e-5, atol=1e-5)


def test_conv_general_dilated_falls_back_to_lax_for_other_layouts():
  x = jnp.ones((2, 3, 8, 8))  # NCHW
  k = jnp.ones((4, 3, 1, 1))  # OIHW
  got = ops.conv_general_dilated(x, k, (1, 1), 'SAME',
                                 dimension_numbers=('NCHW', 'OIHW', 'NCHW'))
  np.testing.assert_allclose(got, jnp.full((2, 4, 8, 8), 3.0))


def test_static_form_rule():
  def form(kernel, groups, cin=8, backend='cpu', input_dilation=1, batch=1,
           strides=1):
    geom = conv_geometry((batch, 8, 8, cin), (kernel, kernel, cin // groups, 8),
                         feature_group_count=groups, strides=strides,
                         input_dilation=input_dilation)
    return strategy.static_form(geom, backend, batch)
  assert form(1, 1) == 'matmul'
  assert form(3, 8) == 'shifted'
  assert form(3, 1) == 'xla'  # 8x8 outputs
  assert form(3, 1, batch=64) == 'im2col_grad'  # 4096 outputs
  assert form(3, 1, batch=63) == 'xla'
  assert form(3, 1, batch=64, strides=2) == 'xla'  # 4x4 outputs each
  assert form(3, 2, batch=64) == 'xla'  # grouped k x k
  assert form(3, 1, batch=64, backend='gpu') == 'xla'
  assert form(1, 2) == 'xla'  # grouped 1x1
  assert form(1, 1, input_dilation=2) == 'xla'
  assert form(1, 1, backend='gpu') == form(3, 8, backend='tpu') == 'xla'


def _geom(size, kernel, groups=1, batch=8, strides=1):
  return conv_geometry((batch, size, size, 8),
                       (kernel, kernel, 8 // groups, 8), strides=strides,
                       feature_group_count=groups)


def test_auto_rule():
  def auto(size, kernel, groups=1, backend='cpu', batch=8, strides=1):
    return strategy.choose(_geom(size, kernel, groups, batch, strides), batch,
                           8, backend)
  # A classifier (1x1 output) takes the experts form on every backend.
  for backend in ('cpu', 'gpu', 'tpu'):
    assert auto(1, 1, backend=backend) == 'experts'
  assert auto(2, 1, strides=2) == 'experts'  # strided down to 1x1
  assert auto(7, 1) == auto(7, 1, backend='gpu') == 'direct'
  assert auto(1, 1, groups=2) == 'direct'  # grouped 1x1: no experts form
  assert auto(7, 3, groups=8) == auto(7, 3, groups=8, backend='gpu') == 'direct'
  assert auto(7, 3) == auto(7, 3, batch=1) == 'loop'
  assert auto(7, 3, groups=2) == 'loop'  # grouped k x k: like any k x k
  assert auto(7, 3, groups=2, backend='gpu') == 'direct'
  assert auto(7, 3, backend='gpu') == 'direct'
  assert auto(7, 3, backend='gpu', batch=1) == 'vmap'


def test_conv_kinds():
  assert strategy.conv_kind(_geom(1, 1)) == 'classifier'
  assert strategy.conv_kind(_geom(7, 1)) == 'pointwise'
  assert strategy.conv_kind(_geom(7, 3, groups=8)) == 'depthwise'
  assert strategy.conv_kind(_geom(7, 1, groups=8)) == 'depthwise'
  assert strategy.conv_kind(_geom(7, 3, groups=2)) == 'grouped'
  assert strategy.conv_kind(_geom(7, 1, groups=2)) == 'grouped'
  assert strategy.conv_kind(_geom(7, 3)) == 'kxk'


def test_strategy_spec_overrides_per_kind():
  resolve = lambda spec, geom, backend='cpu': strategy.resolve(
      spec, geom, 8, 8, backend)
  # Named kinds take their strategy, the others the default ('auto' = choose).
  spec = 'depthwise=vmap'
  assert resolve(spec, _geom(7, 3, groups=8)) == 'vmap'
  assert resolve(spec, _geom(7, 1)) == 'direct'
  assert resolve(spec, _geom(7, 3)) == 'loop'
  assert resolve(spec, _geom(7, 3), backend='gpu') == 'direct'
  assert resolve(spec, _geom(1, 1)) == 'experts'
  spec = 'direct, kxk = loop'
  assert resolve(spec, _geom(7, 3), backend='gpu') == 'loop'
  assert resolve(spec, _geom(1, 1)) == 'direct'
  assert resolve('vmap', _geom(7, 1)) == 'vmap'
  assert strategy.parse('auto') == ('auto', {})
  assert strategy.parse('experts,classifier=auto,grouped=direct') == (
      'experts', {'classifier': 'auto', 'grouped': 'direct'})


@pytest.mark.parametrize('spec, message', [
    ('fastest', "must be one of 'auto', .*; got 'fastest'. A strategy can "
     'also be named per conv kind'),
    ('depthwise=fast', "got 'fast' in 'depthwise=fast'"),
    ('kxk=', "got '' in 'kxk='"),
    ('kxk=a=vmap', "got 'a=vmap'"),
    ('dw=vmap', "unknown conv kind 'dw'"),
    ('=vmap', "unknown conv kind ''"),
    ('kxk=vmap,direct', 'must come first'),
    ('kxk=vmap,kxk=loop', "names 'kxk' twice"),
    ('', 'empty item'),
    ('direct,', 'empty item'),
    (None, 'must be a string'),
])
def test_bad_strategy_specs_say_what_is_wrong(spec, message):
  with pytest.raises(ValueError, match=message):
    strategy.parse(spec)


def test_strategy_spec_reaches_the_conv():
  # The override must change which computation runs, and only for its kind:
  # the traced program equals the one of the strategy it names.
  rng = np.random.default_rng(0)
  def program(spec, groups, kernel):
    x = jnp.asarray(rng.standard_normal((3, 6, 6, 4)), jnp.float32)
    experts = jnp.ones((2, kernel, kernel, 4 // groups, 4))
    weights = jnp.ones((3, 2))
    return str(jax.make_jaxpr(lambda x: ops.conditional_conv(
        x, experts, weights, feature_group_count=groups, strategy=spec))(x))
  assert program('depthwise=vmap', 4, 3) == program('vmap', 4, 3)
  assert program('depthwise=vmap', 4, 3) != program('direct', 4, 3)
  assert program('depthwise=vmap', 1, 1) == program('direct', 1, 1)
  assert program('direct,kxk=vmap', 1, 3) == program('vmap', 1, 3)
