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

from condconv_jax import layer_math
from condconv_jax.geometry import PaddingLike

Dtype = Any
Initializer = Callable[..., jax.Array]
default_kernel_init = nn.linear.default_kernel_init


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
    layer_math.check_routing(self.num_experts, self.activation,
                             self.temperature)
    pooled = layer_math.routing_pool(x)
    logits = nn.Dense(self.num_experts, dtype=pooled.dtype,
                      param_dtype=self.param_dtype,
                      kernel_init=self.kernel_init, bias_init=self.bias_init,
                      name='dense')(pooled)
    weights = layer_math.routing_activation(logits, self.activation,
                                            self.temperature)
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
    layer_math.check_rank4(x, 'CondConv')
    kernel_shape = layer_math.condconv_kernel_shape(
        self.kernel_size, x.shape[-1], self.features,
        self.feature_group_count, self.num_experts, self.strategy)
    num_experts = self.num_experts
    if routing_weights is None:
      routing_weights = self.routing(num_experts=num_experts, name='routing')(
          x, deterministic=deterministic)
    kernel = self.param(
        'kernel', layer_math.per_expert(self.kernel_init, num_experts),
        kernel_shape, self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param(
          'bias', layer_math.per_expert(self.bias_init, num_experts),
          (num_experts, self.features), self.param_dtype)
    return layer_math.condconv(
        x, kernel, bias, routing_weights, strides=self.strides,
        padding=self.padding, input_dilation=self.input_dilation,
        kernel_dilation=self.kernel_dilation,
        feature_group_count=self.feature_group_count, strategy=self.strategy,
        dtype=self.dtype, precision=self.precision)


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
    layer_math.check_rank4(x, 'DepthwiseConv')
    features = layer_math.depthwise_features(x.shape[-1], self.features,
                                             self.feature_group_count)
    kernel = self.param(
        'kernel', self.kernel_init,
        layer_math.depthwise_kernel_shape(self.kernel_size, features),
        self.param_dtype)
    bias = (self.param('bias', self.bias_init, (features,), self.param_dtype)
            if self.use_bias else None)
    return layer_math.depthwise(
        x, kernel, bias, strides=self.strides, padding=self.padding,
        input_dilation=self.input_dilation,
        kernel_dilation=self.kernel_dilation,
        implementation=self.implementation, dtype=self.dtype,
        precision=self.precision)
