"""The "fused" strategy's Pallas kernels (interpret mode on CPU) against the
float64 mixture-of-experts reference: values and the gradients for x, the
experts and the routing weights (and the bias, through the public API).

The reference (tests/reference.py) is NumPy in float64, sum_e r_e (W_e * x)
by explicit loops over pixels and taps, with its VJP by the same loops: it
shares no arithmetic with the kernels. Shapes are tiny: the interpreter is
slow (each kernel's taps and experts are unrolled)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import condconv_jax
from condconv_jax import fused
from condconv_jax import strategy as strategy_lib
from condconv_jax.geometry import conv_geometry
from tests import reference

# (name, batch, (H, W), Cin, Cout, kernel, stride, padding, groups, experts,
#  blocks)
CASES = [
    ('1x1 same', 2, (7, 9), 3, 5, 1, 1, 'SAME', 1, 3, {}),
    ('1x1 stride2 padded tiled', 2, (7, 9), 4, 6, 1, 2, ((1, 0), (0, 1)), 1,
     2, dict(block_p=4, block_k=2, block_n=3)),
    ('depthwise 3x3 same', 2, (7, 9), 3, 3, 3, 1, 'SAME', 3, 2, {}),
    ('depthwise 3x3 stride2 valid mult2', 2, (7, 9), 3, 6, 3, 2, 'VALID', 3,
     2, {}),
    ('depthwise 5x5 stride2 same tiled', 1, (7, 9), 4, 4, 5, 2, 'SAME', 4, 2,
     dict(block_n=2)),
    ('3x3 same', 2, (7, 9), 3, 5, 3, 1, 'SAME', 1, 2, {}),
    ('3x3 stride2 valid tiled', 2, (7, 9), 4, 6, 3, 2, 'VALID', 1, 2,
     dict(block_k=2, block_n=3)),
    ('3x3 stride2 same', 1, (7, 9), 3, 5, 3, 2, 'SAME', 1, 3, {}),
]


def rel_err(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected)
  return np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)),
                                                 1e-30)


def make(case, seed=0, dtype=np.float64):
  (_, batch, (h, w), cin, cout, k, stride, padding, groups, num_experts,
   blocks) = case
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, h, w, cin))
  experts = rng.standard_normal((num_experts, k, k, cin // groups, cout))
  routing = rng.uniform(0.05, 1.0, (batch, num_experts))
  bias = rng.standard_normal((num_experts, cout))
  if dtype != np.float64:  # the reference sees exactly the rounded inputs
    x, experts, routing, bias = (np.asarray(jnp.asarray(a, dtype), np.float64)
                                 for a in (x, experts, routing, bias))
  conv = reference.Conv(x.shape, experts.shape[1:], (stride, stride), padding,
                        groups=groups)
  kwargs = dict(strides=stride, padding=padding, feature_group_count=groups)
  return x, experts, routing, bias, kwargs, conv, blocks


def check(f, x, experts, routing, bias, conv, dtype=jnp.float32, tol=1e-5,
          grad_tol=1e-5):
  """f(x, experts, routing, bias) vs the reference: values and all grads."""
  cast = lambda a, d=dtype: None if a is None else jnp.asarray(a, d)
  args = (cast(x), cast(experts), cast(routing), cast(bias))
  expected = reference.mixture_of_experts(conv, x, experts, routing, bias)
  y = jax.jit(f)(*args)
  assert y.dtype == dtype
  assert y.shape == expected.shape
  assert rel_err(y, expected) <= tol
  dy = np.random.default_rng(1).standard_normal(expected.shape)
  want = reference.mixture_of_experts_vjp(conv, x, experts, routing, bias, dy)
  argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
  loss = lambda *a: jnp.vdot(f(*a).astype(jnp.float32), jnp.float32(dy))
  grads = jax.jit(jax.grad(loss, argnums=argnums))(*args)
  for name, got, wanted, arg in zip(('x', 'experts', 'routing', 'bias'),
                                    grads, want, args):
    assert got.dtype == arg.dtype, name
    assert rel_err(got, wanted) <= grad_tol, name


# To save time, '3x3 same' runs through the public API only and the last
# case in bfloat16 only.
KERNEL_CASES = [c for i, c in enumerate(CASES) if i not in (5, 7)]


@pytest.mark.parametrize('case', KERNEL_CASES,
                         ids=[c[0] for c in KERNEL_CASES])
def test_fused_kernels_match_float64_reference(case):
  x, experts, routing, _, kwargs, conv, blocks = make(case)
  geom = conv_geometry(x.shape, experts.shape[1:], **kwargs)

  def f(x, experts, routing, bias):
    del bias
    return fused.fused_conditional_conv(x, experts, routing, geom, **blocks)

  check(f, x, experts, routing, None, conv)


# The 'gpu' (Triton) form, interpreted: power-of-two blocks, the arrays
# padded to whole tiles; (case index, blocks).
GPU_CASES = [(1, dict(block_p=4, block_k=2, block_n=2)), (3, {}),
             (6, dict(block_p=8, block_k=2, block_n=4))]


@pytest.mark.parametrize('index,blocks', GPU_CASES,
                         ids=[CASES[i][0] for i, _ in GPU_CASES])
def test_gpu_form_matches_float64_reference(index, blocks):
  x, experts, routing, _, kwargs, conv, _ = make(CASES[index], seed=7)
  geom = conv_geometry(x.shape, experts.shape[1:], **kwargs)

  def f(x, experts, routing, bias):
    del bias
    return fused.fused_conditional_conv(x, experts, routing, geom,
                                        form='gpu', **blocks)

  check(f, x, experts, routing, None, conv)


@pytest.mark.parametrize('index', [0, 5])
def test_public_api_with_bias(index):
  x, experts, routing, bias, kwargs, conv, _ = make(CASES[index], seed=3)

  def f(x, experts, routing, bias):
    return condconv_jax.conditional_conv(x, experts, routing, bias,
                                         strategy='fused', **kwargs)

  check(f, x, experts, routing, bias, conv)


@pytest.mark.parametrize('index', [0, 2, 7])
def test_bfloat16_inputs_accumulate_in_float32(index):
  # Inputs, experts, routing weights and biases in bfloat16, as a layer with
  # dtype=bfloat16 passes them (the reference gets the same rounded values
  # in float64): what is left is the bf16 rounding of the mixed tile
  # (one rounding, the sum is float32), of the output and of the cotangent:
  # a few bf16 ulps (2^-8) of the largest value; measured 2e-3 to 6e-3,
  # as "direct" in bfloat16.
  x, experts, routing, bias, kwargs, conv, _ = make(CASES[index], seed=5,
                                                    dtype=jnp.bfloat16)

  def f(x, experts, routing, bias):
    return condconv_jax.conditional_conv(x, experts, routing, bias,
                                         strategy='fused', **kwargs)

  check(f, x, experts, routing, bias, conv, dtype=jnp.bfloat16, tol=1e-2,
        grad_tol=1.5e-2)


def test_flax_layer_with_fused_strategy_matches_direct():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 7, 9, 3)),
                  jnp.float32)
  make_layer = lambda strategy: condconv_jax.CondConv(
      features=5, kernel_size=1, strides=2, num_experts=2, strategy=strategy)
  params = make_layer('direct').init(jax.random.key(0), x)

  def run(strategy):
    def loss(params, x):
      y = make_layer(strategy).apply(params, x)
      return jnp.sum(jnp.sin(y)), y
    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, x)

  (dp_fused, dx_fused), y_fused = run('fused')
  (dp_direct, dx_direct), y_direct = run('direct')
  assert rel_err(y_fused, y_direct) <= 1e-5
  assert rel_err(dx_fused, dx_direct) <= 1e-5
  for got, want in zip(jax.tree.leaves(dp_fused), jax.tree.leaves(dp_direct)):
    assert rel_err(got, want) <= 1e-5
  assert isinstance(make_layer('fused'), nn.Module)


def test_auto_never_picks_fused_but_a_spec_can():
  for kernel, groups, spatial in ((1, 1, 1), (1, 1, 8), (3, 8, 8),
                                  (3, 1, 8), (3, 2, 8)):
    geom = conv_geometry((4, spatial, spatial, 8), (kernel, kernel,
                                                    8 // groups, 8),
                         feature_group_count=groups)
    for backend in ('cpu', 'gpu', 'tpu'):
      assert strategy_lib.resolve('auto', geom, 4, 8, backend) != 'fused'
      want = 'fused' if geom.is_depthwise else strategy_lib.choose(
          geom, 4, 8, backend)
      assert strategy_lib.resolve('depthwise=fused', geom, 4, 8,
                                  backend) == want


@pytest.mark.parametrize('kwargs,match', [
    (dict(kernel_dilation=2), 'dilation'),
    (dict(input_dilation=2), 'dilation'),
    (dict(feature_group_count=2), 'feature_group_count=2'),
])
def test_unsupported_geometries_say_what_to_use(kwargs, match):
  groups = kwargs.get('feature_group_count', 1)
  x = jnp.ones((1, 6, 6, 4))
  experts = jnp.ones((2, 3, 3, 4 // groups, 4))
  with pytest.raises(ValueError, match=match):
    condconv_jax.conditional_conv(x, experts, jnp.ones((1, 2)),
                                  strategy='fused', **kwargs)


def test_blocks_must_divide():
  geom = conv_geometry((1, 4, 4, 6), (1, 1, 6, 4))
  with pytest.raises(ValueError, match='block_k=4'):
    fused.fused_conditional_conv(jnp.ones((1, 4, 4, 6)),
                                 jnp.ones((2, 1, 1, 6, 4)), jnp.ones((1, 2)),
                                 geom, block_k=4)


@pytest.mark.parametrize('kernel,groups', [(1, 1), (3, 1), (3, 128)])
def test_lowers_to_mosaic_for_tpu(kernel, groups):
  # No TPU here: the forward and the backward are traced and lowered for
  # the TPU platform (Pallas' Mosaic lowering -> tpu_custom_call), with
  # TPU-aligned blocks. Mosaic's own compiler passes run only on a TPU.
  x = jnp.ones((2, 10, 10, 128), jnp.bfloat16)
  experts = jnp.ones((2, kernel, kernel, 128 // groups, 128), jnp.bfloat16)
  routing = jnp.ones((2, 2), jnp.float32)
  geom = conv_geometry(x.shape, experts.shape[1:], feature_group_count=groups)
  f = lambda x, w, r: fused.fused_conditional_conv(x, w, r, geom,
                                                   interpret=False)
  loss = lambda x, w, r: jnp.sum(f(x, w, r).astype(jnp.float32))
  for fn, calls in ((f, 1), (jax.grad(loss, argnums=(0, 1, 2)), 3)):
    text = jax.jit(fn).trace(x, experts, routing).lower(
        lowering_platforms=('tpu',)).as_text()
    assert text.count('tpu_custom_call') >= calls


@pytest.mark.parametrize('kernel,groups', [(1, 1), (3, 1), (3, 24)])
def test_gpu_form_lowers_to_triton(kernel, groups):
  # No GPU here: forward and backward lowered for CUDA (Pallas' Triton
  # lowering: power-of-two arrays, dots of at least 16 x 16) with the
  # default blocks; odd sizes, so the padding is exercised. PTX is made
  # only on a GPU.
  cout = 48 if groups > 1 else 40   # depthwise: channel multiplier 2
  x = jnp.ones((2, 7, 9, 24), jnp.bfloat16)
  experts = jnp.ones((3, kernel, kernel, 24 // groups, cout), jnp.bfloat16)
  routing = jnp.ones((2, 3), jnp.float32)
  geom = conv_geometry(x.shape, experts.shape[1:], strides=2,
                       feature_group_count=groups)
  f = lambda x, w, r: fused.fused_conditional_conv(x, w, r, geom,
                                                   interpret=False,
                                                   form='gpu')
  loss = lambda x, w, r: jnp.sum(f(x, w, r).astype(jnp.float32))
  for fn, calls in ((f, 1), (jax.grad(loss, argnums=(0, 1, 2)), 3)):
    text = jax.jit(fn).trace(x, experts, routing).lower(
        lowering_platforms=('cuda',)).as_text()
    assert text.count('xla.gpu.triton') == calls


def test_gpu_blocks_must_be_powers_of_two():
  geom = conv_geometry((1, 4, 4, 6), (1, 1, 6, 4))
  with pytest.raises(ValueError, match='block_n=3 must be a power of two'):
    fused.fused_conditional_conv(jnp.ones((1, 4, 4, 6)),
                                 jnp.ones((2, 1, 1, 6, 4)), jnp.ones((1, 2)),
                                 geom, form='gpu', block_n=3)


def test_tpu_interpreter_agrees():
  # pltpu.InterpretParams(): the TPU interpreter (SMEM routing weights,
  # the grid's dimension semantics) on CPU; the 1x1 case with two
  # 'arbitrary' reduction axes in its expert-gradient kernel.
  x, experts, routing, _, kwargs, conv, blocks = make(CASES[1])
  geom = conv_geometry(x.shape, experts.shape[1:], **kwargs)

  def f(x, experts, routing, bias):
    del bias
    return fused.fused_conditional_conv(x, experts, routing, geom,
                                        interpret=pltpu.InterpretParams(),
                                        **blocks)

  check(f, x, experts, routing, None, conv)
