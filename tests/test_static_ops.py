"""The static conv forms (static_ops: conv_general_dilated, the shifted
depthwise conv and its backward, the im2col kernel gradient) against the
float64 reference, and the rule that picks one."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from condconv_jax import static_ops
from condconv_jax.geometry import conv_geometry
from tests import reference
from tests.test_ops import assert_per_example_conv_matches, rel_err

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
    return static_ops.conv_general_dilated(
        x, kernel, (strides,) * 2, padding, rhs_dilation=(dilation,) * 2,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=groups)

  if '(im2col_grad)' in case[0]:  # the form the case is there for
    geom = conv_geometry(x.shape, kernel.shape, strides=strides,
                         padding=padding)
    assert static_ops.static_form(geom, 'cpu', batch) == 'im2col_grad'
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
      lambda x, k: static_ops.shifted_depthwise_conv(x, k, geom), conv, x, kernels,
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
  f = lambda x, k: static_ops.im2col_grad_conv(x, k, geom)
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
      lambda k: static_ops.im2col_grad_conv(x, k, geom).sum()))
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
  fast = nn.Conv(conv_general_dilated=static_ops.conv_general_dilated, **kwargs)
  variables = plain.init(jax.random.key(1), x)
  fast_variables = fast.init(jax.random.key(1), x)
  jax.tree.map(np.testing.assert_array_equal, variables, fast_variables)
  np.testing.assert_allclose(fast.apply(variables, x), plain.apply(variables, x),
                             rtol=1e-5, atol=1e-5)


def test_conv_general_dilated_falls_back_to_lax_for_other_layouts():
  x = jnp.ones((2, 3, 8, 8))  # NCHW
  k = jnp.ones((4, 3, 1, 1))  # OIHW
  got = static_ops.conv_general_dilated(x, k, (1, 1), 'SAME',
                                 dimension_numbers=('NCHW', 'OIHW', 'NCHW'))
  np.testing.assert_allclose(got, jnp.full((2, 4, 8, 8), 3.0))


def test_static_form_rule():
  def form(kernel, groups, cin=8, backend='cpu', input_dilation=1, batch=1,
           strides=1):
    geom = conv_geometry((batch, 8, 8, cin), (kernel, kernel, cin // groups, 8),
                         feature_group_count=groups, strides=strides,
                         input_dilation=input_dilation)
    return static_ops.static_form(geom, backend, batch)
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
