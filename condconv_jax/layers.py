"""Flax Linen modules: CondConv, its routing function, a fast static depthwise conv.

`CondConv` takes `flax.linen.Conv`'s arguments (2D, NHWC) plus `num_experts`
and `strategy`, so a model that injects its conv type can swap one for the
other with `functools.partial`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from condconv_jax import ops, static_ops
from condconv_jax import strategy as strategy_lib
from condconv_jax.geometry import PaddingLike

Dtype = Any
Initializer = Callable[..., jax.Array]
default_kernel_init = nn.linear.default_kernel_init

ROUTING_ACTIVATIONS = ('sigmoid', 'softmax')


def per_expert(init: Initializer, num_experts: int) -> Initializer:
  """Initializes each expert on its own shape (so fan-in/out are the static
  conv's), the way the official CondConv code does: shape = [E, *expert]."""
  def init_fn(key, shape, dtype=jnp.float32):
    keys = jax.random.split(key, num_experts)
    return jnp.stack([init(k, tuple(shape[1:]), dtype) for k in keys])
  return init_fn


def _check_rank4(x, who: str):
  if x.ndim != 4:
    raise ValueError(f'{who}: x must be NHWC with rank 4 [batch, height, '
                     f'width, channels], got shape {x.shape}.')


def _kernel_size_pair(kernel_size) -> tuple[int, int]:
  if isinstance(kernel_size, int):
    return (kernel_size, kernel_size)
  kernel_size = tuple(kernel_size)
  if len(kernel_size) != 2:
    raise ValueError(f'kernel_size must be an int or a pair for a 2D conv, '
                     f'got {kernel_size!r}.')
  return kernel_size


class Routing(nn.Module):
  """Routing weights r(x) = act(GAP(x) R + b): [B, H, W, C] -> [B, E].

  activation='sigmoid' is the paper's; 'softmax' divides the logits by
  `temperature` first (Dynamic Convolution, Chen et al. 2020). Dropout, when
  `dropout_rate` > 0 and not deterministic, is applied to the weights.
  Computed in at least float32 whatever the input dtype; sown to
  'intermediates' as 'routing_weights'.
  """

  num_experts: int
  activation: str = 'sigmoid'
  temperature: float = 1.0
  dropout_rate: float = 0.0
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = default_kernel_init
  bias_init: Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    if self.num_experts < 1:
      raise ValueError(f'num_experts must be >= 1, got {self.num_experts}.')
    if self.activation not in ROUTING_ACTIVATIONS:
      raise ValueError(f'activation must be one of {ROUTING_ACTIVATIONS}, got '
                       f'{self.activation!r}.')
    _check_rank4(x, 'Routing')
    dtype = jnp.promote_types(x.dtype, jnp.float32)  # never below float32
    pooled = jnp.mean(x.astype(dtype), axis=(1, 2))
    logits = nn.Dense(self.num_experts, dtype=dtype,
                      param_dtype=self.param_dtype,
                      kernel_init=self.kernel_init, bias_init=self.bias_init,
                      name='dense')(pooled)
    if self.activation == 'sigmoid':
      weights = jax.nn.sigmoid(logits)
    else:
      weights = jax.nn.softmax(logits / self.temperature, axis=-1)
    if self.dropout_rate > 0:
      weights = nn.Dropout(self.dropout_rate)(weights,
                                              deterministic=deterministic)
    self.sow('intermediates', 'routing_weights', weights)
    return weights


class CondConv(nn.Module):
  """A conditionally parameterized 2D convolution (Yang et al., 2019).

  y = ((sum_e r_e(x) W_e) * x) + sum_e r_e(x) b_e, computed as ONE conv with a
  per-example kernel (or, with strategy='experts', as the equal mixture of
  experts). Arguments are `flax.linen.Conv`'s, plus:

    num_experts: E, the number of expert kernels.
    strategy: how to compute it: 'auto', 'direct', 'loop', 'vmap' or
      'experts' (see `condconv_jax.ops`), or one per conv kind such as
      'depthwise=vmap' (`condconv_jax.strategy.parse`); results agree to
      float rounding.
    routing: a module factory called with `num_experts=E` that maps x to [B, E]
      weights; default `Routing` (the paper's sigmoid routing).

  Parameters: 'kernel' [E, kh, kw, Cin/g, Cout], 'bias' [E, Cout], and the
  routing function's under 'routing' (absent when routing weights are passed
  in). `kernel_init`/`bias_init` are applied per expert on the expert's shape.

  Call: `__call__(x, routing_weights=None, *, deterministic=True)` with x
  [B, H, W, Cin]; pass routing_weights [B, E] to share one routing function
  between several convs (as the official EfficientNet-CondConv blocks do).
  """

  features: int
  kernel_size: int | Sequence[int]
  strides: int | Sequence[int] = 1
  padding: PaddingLike = 'SAME'
  input_dilation: int | Sequence[int] = 1
  kernel_dilation: int | Sequence[int] = 1
  feature_group_count: int = 1
  use_bias: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None
  kernel_init: Initializer = default_kernel_init
  bias_init: Initializer = nn.initializers.zeros_init()
  num_experts: int = 8
  strategy: str = 'auto'
  routing: Callable[..., nn.Module] = Routing

  @nn.compact
  def __call__(self, x: jax.Array, routing_weights: jax.Array | None = None,
               *, deterministic: bool = True) -> jax.Array:
    if not isinstance(self.num_experts, int) or self.num_experts < 1:
      raise ValueError(f'num_experts must be an int >= 1, got '
                       f'{self.num_experts!r}.')
    strategy_lib.parse(self.strategy)  # ValueError for a bad spec
    _check_rank4(x, 'CondConv')
    groups = self.feature_group_count
    in_features = x.shape[-1]
    if in_features % groups:
      raise ValueError(f'CondConv: input channels ({in_features}) must be '
                       f'divisible by feature_group_count ({groups}).')
    if self.features % groups:
      raise ValueError(f'CondConv: features ({self.features}) must be '
                       f'divisible by feature_group_count ({groups}).')
    num_experts = self.num_experts
    if routing_weights is None:
      routing_weights = self.routing(num_experts=num_experts, name='routing')(
          x, deterministic=deterministic)
    elif routing_weights.shape != (x.shape[0], num_experts):
      raise ValueError(f'routing_weights must be [batch, num_experts] = '
                       f'{(x.shape[0], num_experts)}, got shape '
                       f'{routing_weights.shape}.')
    kernel_shape = (num_experts, *_kernel_size_pair(self.kernel_size),
                    in_features // groups, self.features)
    kernel = self.param('kernel', per_expert(self.kernel_init, num_experts),
                        kernel_shape, self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param('bias', per_expert(self.bias_init, num_experts),
                        (num_experts, self.features), self.param_dtype)
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
    return ops.conditional_conv(
        x, kernel, routing_weights, bias, strides=self.strides,
        padding=self.padding, input_dilation=self.input_dilation,
        kernel_dilation=self.kernel_dilation, feature_group_count=groups,
        strategy=self.strategy, precision=self.precision)


class DepthwiseConv(nn.Module):
  """A static depthwise conv with `flax.linen.Conv`'s arguments and parameters.

  Same 'kernel' [kh, kw, 1, features] and 'bias' [features] as
  nn.Conv(feature_group_count=C), so weights move between the two; on CPU it
  runs the k*k shifted multiply-add form, many times faster than XLA's
  depthwise conv there (docs/speed.md; `implementation='xla'` forces
  lax.conv). `features` defaults to
  the input channels and must be a multiple of them (channel multiplier).
  """

  features: int | None = None
  kernel_size: int | Sequence[int] = 3
  strides: int | Sequence[int] = 1
  padding: PaddingLike = 'SAME'
  input_dilation: int | Sequence[int] = 1
  kernel_dilation: int | Sequence[int] = 1
  feature_group_count: int | None = None
  use_bias: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None
  kernel_init: Initializer = default_kernel_init
  bias_init: Initializer = nn.initializers.zeros_init()
  implementation: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _check_rank4(x, 'DepthwiseConv')
    channels = x.shape[-1]
    if self.feature_group_count not in (None, channels):
      raise ValueError(f'DepthwiseConv: feature_group_count must equal the '
                       f'input channels ({channels}) or be None, got '
                       f'{self.feature_group_count}.')
    features = self.features or channels
    if features % channels:
      raise ValueError(f'DepthwiseConv: features ({features}) must be a '
                       f'multiple of the input channels ({channels}).')
    kernel = self.param('kernel', self.kernel_init,
                        (*_kernel_size_pair(self.kernel_size), 1, features),
                        self.param_dtype)
    bias = (self.param('bias', self.bias_init, (features,), self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = static_ops.depthwise_conv(
        x, kernel, strides=self.strides, padding=self.padding,
        input_dilation=self.input_dilation,
        kernel_dilation=self.kernel_dilation,
        implementation=self.implementation, precision=self.precision)
    return y if bias is None else y + bias
