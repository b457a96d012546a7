"""Flax Linen modules for CondConv's successors: DynamicConv and ODConv.

`DynamicConv` (Chen et al., CVPR 2020) mixes K kernels with a softmax
attention from a small two-layer network; `ODConv` (Li, Zhou, Yao, ICLR
2022) adds attentions over the input channels, output channels and kernel
taps. Both take `flax.linen.Conv`'s arguments (2D, NHWC) plus
`num_experts` (K) and `strategy`, mix their kernels with CondConv's
machinery (`condconv_jax.ops`), and take the softmax temperature at call
time, so a schedule can anneal it without recompiling:

    y = DynamicConv(64, (3, 3), num_experts=4).apply(
        variables, x, temperature=t)

The math is `layer_math`'s, shared with the NNX faces (`condconv_jax.nnx`).
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


class DynamicAttention(nn.Module):
  """DyConv's kernel attention: softmax(FC2(ReLU(FC1(GAP(x)))) / T) -> [B, K].

  Computed in at least float32; sown to 'intermediates' as 'routing_weights'.
  """

  num_experts: int
  reduction: int = layer_math.DYCONV_REDUCTION
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, temperature=1.0) -> jax.Array:
    layer_math.check_num_experts(self.num_experts)
    pooled = layer_math.routing_pool(x)
    hidden = layer_math.dynamic_hidden_features(x.shape[-1], self.reduction)
    dense = lambda n, name: nn.Dense(n, dtype=pooled.dtype,
                                     param_dtype=self.param_dtype, name=name)
    logits = dense(self.num_experts, 'fc2')(nn.relu(dense(hidden,
                                                          'fc1')(pooled)))
    weights = layer_math.dynamic_attention(logits, temperature)
    self.sow('intermediates', 'routing_weights', weights)
    return weights


class DynamicConv(nn.Module):
  """Dynamic Convolution (Chen et al., CVPR 2020): K kernels (and biases)
  mixed per example by `DynamicAttention`, applied as ONE conv.

  Arguments are `flax.linen.Conv`'s plus num_experts (K, the paper's 4),
  reduction (the attention's hidden size is C_in / reduction) and strategy
  (`condconv_jax.ops`). Parameters: 'kernel' [K, kh, kw, Cin/g, Cout],
  'bias' [K, Cout], attention/{fc1, fc2}.

  Call: `__call__(x, *, temperature=1.0, train=False)`; `train` is unused
  (the attention has no BatchNorm or dropout) and accepted so every dynamic
  layer is called alike.
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
  num_experts: int = 4
  reduction: int = layer_math.DYCONV_REDUCTION
  strategy: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, *, temperature=1.0,
               train: bool = False) -> jax.Array:
    del train
    layer_math.check_rank4(x, 'DynamicConv')
    kernel_shape = layer_math.condconv_kernel_shape(
        self.kernel_size, x.shape[-1], self.features,
        self.feature_group_count, self.num_experts, self.strategy,
        'DynamicConv')
    weights = DynamicAttention(self.num_experts, self.reduction,
                               self.param_dtype, name='attention')(
                                   x, temperature=temperature)
    kernel = self.param(
        'kernel', layer_math.per_expert(self.kernel_init, self.num_experts),
        kernel_shape, self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param(
          'bias', layer_math.per_expert(self.bias_init, self.num_experts),
          (self.num_experts, self.features), self.param_dtype)
    return layer_math.condconv(
        x, kernel, bias, weights, strides=self.strides, padding=self.padding,
        input_dilation=self.input_dilation,
        kernel_dilation=self.kernel_dilation,
        feature_group_count=self.feature_group_count, strategy=self.strategy,
        dtype=self.dtype, precision=self.precision)


class ODAttention(nn.Module):
  """ODConv's four attentions from one shared squeeze:
  GAP -> fc (1x1, no bias) -> BatchNorm -> ReLU -> {channel, filter,
  spatial, kernel}_fc, each divided by the temperature (sigmoid; softmax
  over the K kernels). Returns {name: attention} for the heads this conv
  has (`layer_math.odconv_head_sizes`); spatial is [B, kh, kw]."""

  head_sizes: dict[str, int]
  kernel_size: tuple[int, int]
  reduction: float = layer_math.ODCONV_REDUCTION
  min_hidden: int = layer_math.ODCONV_MIN_HIDDEN
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, temperature=1.0,
               train: bool = False) -> dict[str, jax.Array]:
    pooled = layer_math.routing_pool(x)
    hidden = layer_math.odconv_hidden_features(x.shape[-1], self.reduction,
                                               self.min_hidden)
    h = nn.Dense(hidden, use_bias=False, dtype=pooled.dtype,
                 param_dtype=self.param_dtype,
                 kernel_init=layer_math.attention_kernel_init,
                 name='fc')(pooled)
    h = nn.BatchNorm(use_running_average=not train,
                     momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                     dtype=pooled.dtype, param_dtype=self.param_dtype,
                     name='bn')(h)
    h = nn.relu(h)
    logits = {name: nn.Dense(size, dtype=pooled.dtype,
                             param_dtype=self.param_dtype,
                             kernel_init=layer_math.attention_kernel_init,
                             name=f'{name}_fc')(h)
              for name, size in self.head_sizes.items()}
    attentions = layer_math.odconv_attentions(logits, self.kernel_size,
                                              temperature)
    if 'kernel' in attentions:
      self.sow('intermediates', 'routing_weights', attentions['kernel'])
    return attentions


class ODConv(nn.Module):
  """Omni-dimensional dynamic convolution (Li, Zhou, Yao, ICLR 2022).

  y = ((x * a_c) conv sum_k a_w,k (a_s . W_k)) * a_f (+ bias), with the
  attentions of `ODAttention`; ONE per-example conv
  (`ops.omni_dimensional_conv`). Arguments are `flax.linen.Conv`'s plus
  num_experts (K; the paper's "1x" and "4x" are K = 1 and 4), the
  attention's reduction and min_hidden, its BatchNorm's momentum and
  epsilon, and strategy. The official layer has no bias: use_bias adds a
  static one after the filter attention.

  Parameters: 'kernel' [K, kh, kw, Cin/g, Cout], 'bias' [Cout] (if
  use_bias), attention/{fc, bn, channel_fc, filter_fc, spatial_fc,
  kernel_fc}; batch_stats attention/bn/{mean, var}.

  Call: `__call__(x, *, temperature=1.0, train=False)`; `train` puts the
  attention's BatchNorm in training mode (mutable=['batch_stats']).
  """

  features: int
  kernel_size: int | Sequence[int]
  strides: int | Sequence[int] = 1
  padding: PaddingLike = 'SAME'
  input_dilation: int | Sequence[int] = 1
  kernel_dilation: int | Sequence[int] = 1
  feature_group_count: int = 1
  use_bias: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None
  kernel_init: Initializer = default_kernel_init
  bias_init: Initializer = nn.initializers.zeros_init()
  num_experts: int = 1
  reduction: float = layer_math.ODCONV_REDUCTION
  min_hidden: int = layer_math.ODCONV_MIN_HIDDEN
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  strategy: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, *, temperature=1.0,
               train: bool = False) -> jax.Array:
    layer_math.check_rank4(x, 'ODConv')
    kernel_shape = layer_math.condconv_kernel_shape(
        self.kernel_size, x.shape[-1], self.features,
        self.feature_group_count, self.num_experts, self.strategy, 'ODConv')
    attentions = ODAttention(
        layer_math.odconv_head_sizes(x.shape[-1], self.features,
                                     kernel_shape[1:3],
                                     self.feature_group_count,
                                     self.num_experts),
        kernel_shape[1:3], self.reduction, self.min_hidden, self.bn_momentum,
        self.bn_epsilon, self.param_dtype, name='attention')(
            x, temperature=temperature, train=train)
    kernel = self.param(
        'kernel', layer_math.per_expert(self.kernel_init, self.num_experts),
        kernel_shape, self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,),
                       self.param_dtype) if self.use_bias else None)
    return layer_math.odconv(
        x, kernel, bias, attentions, strides=self.strides,
        padding=self.padding, input_dilation=self.input_dilation,
        kernel_dilation=self.kernel_dilation,
        feature_group_count=self.feature_group_count, strategy=self.strategy,
        dtype=self.dtype, precision=self.precision)
