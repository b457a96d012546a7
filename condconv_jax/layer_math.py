"""What the Linen and NNX faces of each layer share: argument checks,
parameter shapes, initializers, and the forward math on given parameters.

`layers.py` (Flax Linen) and `nnx.py` (Flax NNX) only create parameters
and hand them here, so the two APIs compute the same function with the
same parameter tree:

  CondConv        kernel [E, kh, kw, Cin/g, Cout], bias [E, Cout],
                  routing/dense/{kernel [Cin, E], bias [E]}
  Routing         dense/{kernel [Cin, E], bias [E]}
  DepthwiseConv   kernel [kh, kw, 1, C*m], bias [C*m] (nn.Conv's)
  DynamicConv     kernel [K, kh, kw, Cin/g, Cout], bias [K, Cout],
                  attention/{fc1, fc2}
  ODConv          kernel [K, kh, kw, Cin/g, Cout], bias [Cout] (optional),
                  attention/{fc, bn, channel_fc, filter_fc, spatial_fc,
                  kernel_fc}; batch_stats attention/bn/{mean, var}

(`dynamic_layers.py` and `nnx_dynamic.py` are DynamicConv's and ODConv's
Linen and NNX faces.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from condconv_jax import cpu_setup, ops, static_ops
from condconv_jax import strategy as strategy_lib

Initializer = Callable[..., jax.Array]
ROUTING_ACTIVATIONS = ('sigmoid', 'softmax')


def per_expert(init: Initializer, num_experts: int) -> Initializer:
  """Initializes each expert on its own shape (so fan-in/out are the static
  conv's), the way the official CondConv code does: shape = [E, *expert]."""
  def init_fn(key, shape, dtype=jnp.float32):
    keys = jax.random.split(key, num_experts)
    return jnp.stack([init(k, tuple(shape[1:]), dtype) for k in keys])
  return init_fn


def check_rank4(x, who: str):
  if x.ndim != 4:
    raise ValueError(f'{who}: x must be NHWC with rank 4 [batch, height, '
                     f'width, channels], got shape {x.shape}.')


def kernel_size_pair(kernel_size) -> tuple[int, int]:
  if isinstance(kernel_size, int):
    return (kernel_size, kernel_size)
  kernel_size = tuple(kernel_size)
  if len(kernel_size) != 2:
    raise ValueError(f'kernel_size must be an int or a pair for a 2D conv, '
                     f'got {kernel_size!r}.')
  return kernel_size


def check_num_experts(num_experts):
  if (not isinstance(num_experts, int) or isinstance(num_experts, bool) or
      num_experts < 1):
    raise ValueError(f'num_experts must be an int >= 1, got '
                     f'{num_experts!r}.')


def check_routing(num_experts, activation: str, temperature):
  """Raises on a bad routing configuration (temperature may be a traced
  value: a schedule can drive it)."""
  check_num_experts(num_experts)
  if activation not in ROUTING_ACTIVATIONS:
    raise ValueError(f'activation must be one of {ROUTING_ACTIVATIONS}, got '
                     f'{activation!r}.')
  check_temperature(temperature)


def routing_pool(x: jax.Array) -> jax.Array:
  """GAP(x) [B, C], in at least float32 whatever the input dtype."""
  check_rank4(x, 'Routing')
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  return jnp.mean(x.astype(dtype), axis=(1, 2))


def routing_activation(logits: jax.Array, activation: str,
                       temperature) -> jax.Array:
  """sigmoid(logits) (the paper), or softmax(logits / temperature) (Dynamic
  Convolution, Chen et al. 2020)."""
  if activation == 'sigmoid':
    return jax.nn.sigmoid(logits)
  return jax.nn.softmax(logits / temperature, axis=-1)


def condconv_kernel_shape(kernel_size, in_features: int, features: int,
                          groups: int, num_experts: int, strategy: str,
                          who: str = 'CondConv') -> tuple[int, ...]:
  """[E, kh, kw, Cin/g, Cout], after checking the arguments (errors name
  the layer `who`)."""
  check_num_experts(num_experts)
  strategy_lib.parse(strategy)  # ValueError for a bad spec
  if in_features % groups:
    raise ValueError(f'{who}: input channels ({in_features}) must be '
                     f'divisible by feature_group_count ({groups}).')
  if features % groups:
    raise ValueError(f'{who}: features ({features}) must be divisible by '
                     f'feature_group_count ({groups}).')
  return (num_experts, *kernel_size_pair(kernel_size), in_features // groups,
          features)


def condconv(x: jax.Array, kernel: jax.Array, bias: jax.Array | None,
             routing_weights: jax.Array, *, strides, padding, input_dilation,
             kernel_dilation, feature_group_count: int, strategy: str,
             dtype: Any, precision: Any) -> jax.Array:
  """The CondConv layer's output for its parameters and routing weights."""
  cpu_setup.check_allocator()
  x, kernel, bias = promote_dtype(x, kernel, bias, dtype=dtype)
  return ops.conditional_conv(
      x, kernel, routing_weights, bias, strides=strides, padding=padding,
      input_dilation=input_dilation, kernel_dilation=kernel_dilation,
      feature_group_count=feature_group_count, strategy=strategy,
      precision=precision)


def depthwise_features(channels: int, features: int | None,
                       feature_group_count: int | None) -> int:
  """The output channels of a depthwise conv of `channels` input channels,
  after checking the arguments."""
  if feature_group_count not in (None, channels):
    raise ValueError(f'DepthwiseConv: feature_group_count must equal the '
                     f'input channels ({channels}) or be None, got '
                     f'{feature_group_count}.')
  features = features or channels
  if features % channels:
    raise ValueError(f'DepthwiseConv: features ({features}) must be a '
                     f'multiple of the input channels ({channels}).')
  return features


def depthwise(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, *,
              strides, padding, input_dilation, kernel_dilation,
              implementation: str, dtype: Any, precision: Any) -> jax.Array:
  """The static depthwise conv's output for its parameters."""
  x, kernel, bias = promote_dtype(x, kernel, bias, dtype=dtype)
  y = static_ops.depthwise_conv(
      x, kernel, strides=strides, padding=padding,
      input_dilation=input_dilation, kernel_dilation=kernel_dilation,
      implementation=implementation, precision=precision)
  return y if bias is None else y + bias


def depthwise_kernel_shape(kernel_size: int | Sequence[int],
                           features: int) -> tuple[int, int, int, int]:
  return (*kernel_size_pair(kernel_size), 1, features)


def check_input_features(x, in_features: int, who: str):
  """x is NHWC with the channels the layer was built for."""
  check_rank4(x, who)
  if x.shape[-1] != in_features:
    raise ValueError(f'{who}: x has {x.shape[-1]} channels, the layer was '
                     f'built for in_features={in_features}.')


def check_temperature(temperature):
  """Raises for a concrete temperature <= 0 (Python, NumPy or JAX scalar);
  a traced one, from a schedule inside jit, is not known until run time."""
  try:
    value = float(temperature)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return
  if not value > 0:
    raise ValueError(f'temperature must be > 0, got {temperature!r}.')


# Dynamic Convolution (Chen et al., CVPR 2020): the attention over its K
# kernels is GAP -> FC to C/reduction -> ReLU -> FC to K -> softmax(z / T).
# Parameters (both faces): attention/{fc1/{kernel [C, hidden], bias},
# fc2/{kernel [hidden, K], bias [K]}}.
DYCONV_REDUCTION = 4


def dynamic_hidden_features(in_features: int, reduction: int) -> int:
  if not isinstance(reduction, int) or reduction < 1:
    raise ValueError(f'reduction must be an int >= 1, got {reduction!r}.')
  return max(1, in_features // reduction)


def dynamic_attention(logits: jax.Array, temperature) -> jax.Array:
  check_temperature(temperature)
  return jax.nn.softmax(logits / temperature, axis=-1)


# ODConv (Li, Zhou, Yao, ICLR 2022): GAP -> 1x1 conv (no bias) to
# max(int(C * reduction), min_hidden) -> BatchNorm -> ReLU, then one 1x1
# conv with bias per attention, each divided by the temperature. Parameters
# (both faces): attention/{fc/kernel [C, hidden], bn/{scale, bias},
# channel_fc, filter_fc, spatial_fc, kernel_fc: {kernel, bias}}, the
# official module's names; batch statistics attention/bn/{mean, var}.
# The official initializer of the attention's 1x1 convs (kaiming_normal_,
# mode='fan_out', nonlinearity='relu'); their biases start at zero.
attention_kernel_init = jax.nn.initializers.variance_scaling(2.0, 'fan_out',
                                                             'normal')
ODCONV_REDUCTION = 0.0625
ODCONV_MIN_HIDDEN = 16


def odconv_hidden_features(in_features: int, reduction: float,
                           min_hidden: int) -> int:
  if not 0 < reduction <= 1:
    raise ValueError(f'reduction must be in (0, 1], got {reduction!r}.')
  return max(int(in_features * reduction), min_hidden)


def odconv_head_sizes(in_features: int, features: int, kernel_size,
                      groups: int, num_experts: int) -> dict[str, int]:
  """The attentions an ODConv has, with their sizes: the official code skips
  the filter attention for depthwise convs, the spatial one for 1x1 and the
  kernel one for K = 1."""
  kh, kw = kernel_size_pair(kernel_size)
  sizes = {'channel': in_features}
  if not (in_features == groups == features):
    sizes['filter'] = features
  if (kh, kw) != (1, 1):
    sizes['spatial'] = kh * kw
  if num_experts > 1:
    sizes['kernel'] = num_experts
  return sizes


def odconv_attentions(head_logits: dict[str, jax.Array], kernel_size,
                      temperature) -> dict[str, jax.Array]:
  """Head logits [B, n] -> attentions: sigmoid(z / T) for channel, filter
  and spatial ([B, kh, kw]), softmax(z / T) over the K kernels."""
  check_temperature(temperature)
  attentions = {}
  for name, logits in head_logits.items():
    z = logits / temperature
    if name == 'kernel':
      attentions[name] = jax.nn.softmax(z, axis=-1)
    elif name == 'spatial':
      attentions[name] = jax.nn.sigmoid(z).reshape(
          z.shape[0], *kernel_size_pair(kernel_size))
    else:
      attentions[name] = jax.nn.sigmoid(z)
  return attentions


def odconv(x: jax.Array, kernel: jax.Array, bias: jax.Array | None,
           attentions: dict[str, jax.Array], *, strides, padding,
           input_dilation, kernel_dilation, feature_group_count: int,
           strategy: str, dtype: Any, precision: Any) -> jax.Array:
  """The ODConv layer's output for its kernels, attentions and static bias."""
  cpu_setup.check_allocator()
  x, kernel, bias = promote_dtype(x, kernel, bias, dtype=dtype)
  y = ops.omni_dimensional_conv(
      x, kernel, attentions.get('kernel'), attentions.get('spatial'),
      attentions.get('channel'), attentions.get('filter'), strides=strides,
      padding=padding, input_dilation=input_dilation,
      kernel_dilation=kernel_dilation,
      feature_group_count=feature_group_count, strategy=strategy,
      precision=precision)
  return y if bias is None else y + bias
