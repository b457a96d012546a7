"""Flax NNX faces of DynamicConv and ODConv (re-exported by condconv_jax.nnx).

The Linen modules of `condconv_jax.dynamic_layers` with NNX's construction:
the same `layer_math` code and the same parameter tree
(`nnx.state(layer, nnx.Param)`, and ODConv's attention BatchNorm statistics
under nnx.BatchStat), so checkpoints move between the two APIs as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from condconv_jax import layer_math
from condconv_jax.geometry import PaddingLike

Dtype = Any
Initializer = Callable[..., jax.Array]
default_kernel_init = nnx.initializers.lecun_normal()
zeros_init = nnx.initializers.zeros_init()


class _ConvFields(nnx.Module):
  """What both layers keep: the conv arguments, kernel [K, kh, kw, Cin/g,
  Cout]."""

  def _init_conv(self, in_features, out_features, kernel_size, strides,
                 padding, input_dilation, kernel_dilation,
                 feature_group_count, dtype, param_dtype, precision,
                 kernel_init, num_experts, strategy, rngs):
    kernel_shape = layer_math.condconv_kernel_shape(
        kernel_size, in_features, out_features, feature_group_count,
        num_experts, strategy, type(self).__name__)
    self.in_features, self.out_features = in_features, out_features
    self.kernel_size = kernel_shape[1:3]
    self.strides, self.padding = strides, padding
    self.input_dilation, self.kernel_dilation = input_dilation, kernel_dilation
    self.feature_group_count = feature_group_count
    self.dtype, self.param_dtype = dtype, param_dtype
    self.precision = precision
    self.num_experts, self.strategy = num_experts, strategy
    self.kernel = nnx.Param(layer_math.per_expert(kernel_init, num_experts)(
        rngs.params(), kernel_shape, param_dtype))

  def _conv_args(self):
    return dict(strides=self.strides, padding=self.padding,
                input_dilation=self.input_dilation,
                kernel_dilation=self.kernel_dilation,
                feature_group_count=self.feature_group_count,
                strategy=self.strategy, dtype=self.dtype,
                precision=self.precision)


class DynamicAttention(nnx.Module):
  """softmax(FC2(ReLU(FC1(GAP(x)))) / T) -> [B, K]; sown as
  nnx.Intermediate 'routing_weights'."""

  def __init__(self, in_features: int, num_experts: int, *,
               reduction: int = layer_math.DYCONV_REDUCTION,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    layer_math.check_num_experts(num_experts)
    hidden = layer_math.dynamic_hidden_features(in_features, reduction)
    self.fc1 = nnx.Linear(in_features, hidden, param_dtype=param_dtype,
                          rngs=rngs)
    self.fc2 = nnx.Linear(hidden, num_experts, param_dtype=param_dtype,
                          rngs=rngs)

  def __call__(self, x: jax.Array, *, temperature=1.0) -> jax.Array:
    pooled = layer_math.routing_pool(x)
    weights = layer_math.dynamic_attention(
        self.fc2(nnx.relu(self.fc1(pooled))), temperature)
    self.sow(nnx.Intermediate, 'routing_weights', weights)
    return weights


class DynamicConv(_ConvFields):
  """Dynamic Convolution (Chen et al., CVPR 2020): `flax.nnx.Conv`'s
  arguments plus num_experts (K), reduction and strategy; the Linen
  `condconv_jax.DynamicConv`'s parameter tree. An int kernel_size is
  square. Call: `__call__(x, *, temperature=1.0, train=None)`; `train` is
  unused (no BatchNorm or dropout), accepted so every dynamic layer is
  called alike."""

  def __init__(self, in_features: int, out_features: int,
               kernel_size: int | Sequence[int],
               strides: int | Sequence[int] = 1,
               padding: PaddingLike = 'SAME',
               input_dilation: int | Sequence[int] = 1,
               kernel_dilation: int | Sequence[int] = 1,
               feature_group_count: int = 1, use_bias: bool = True,
               dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
               precision: Any = None,
               kernel_init: Initializer = default_kernel_init,
               bias_init: Initializer = zeros_init, *, num_experts: int = 4,
               reduction: int = layer_math.DYCONV_REDUCTION,
               strategy: str = 'auto', rngs: nnx.Rngs):
    self._init_conv(in_features, out_features, kernel_size, strides, padding,
                    input_dilation, kernel_dilation, feature_group_count,
                    dtype, param_dtype, precision, kernel_init, num_experts,
                    strategy, rngs)
    self.bias = (nnx.Param(layer_math.per_expert(bias_init, num_experts)(
        rngs.params(), (num_experts, out_features), param_dtype))
                 if use_bias else None)
    self.attention = DynamicAttention(in_features, num_experts,
                                      reduction=reduction,
                                      param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, temperature=1.0,
               train: bool | None = None) -> jax.Array:
    del train
    layer_math.check_input_features(x, self.in_features, 'DynamicConv')
    weights = self.attention(x, temperature=temperature)
    return layer_math.condconv(
        x, self.kernel[...], None if self.bias is None else self.bias[...],
        weights, **self._conv_args())


class ODAttention(nnx.Module):
  """ODConv's attentions (see the Linen `ODAttention`): {name: [B, n]},
  spatial [B, kh, kw]."""

  def __init__(self, in_features: int, head_sizes: dict[str, int],
               kernel_size: tuple[int, int], *,
               reduction: float = layer_math.ODCONV_REDUCTION,
               min_hidden: int = layer_math.ODCONV_MIN_HIDDEN,
               bn_momentum: float = 0.9, bn_epsilon: float = 1e-5,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    hidden = layer_math.odconv_hidden_features(in_features, reduction,
                                               min_hidden)
    self.kernel_size = kernel_size
    self.fc = nnx.Linear(in_features, hidden, use_bias=False,
                         kernel_init=layer_math.attention_kernel_init,
                         param_dtype=param_dtype, rngs=rngs)
    self.bn = nnx.BatchNorm(hidden, momentum=bn_momentum, epsilon=bn_epsilon,
                            param_dtype=param_dtype, rngs=rngs)
    self.head_names = tuple(head_sizes)
    for name, size in head_sizes.items():
      setattr(self, f'{name}_fc',
              nnx.Linear(hidden, size,
                         kernel_init=layer_math.attention_kernel_init,
                         param_dtype=param_dtype, rngs=rngs))

  def __call__(self, x: jax.Array, *, temperature=1.0,
               train: bool | None = None) -> dict[str, jax.Array]:
    pooled = layer_math.routing_pool(x)
    h = self.bn(self.fc(pooled), use_running_average=(
        None if train is None else not train))
    h = nnx.relu(h)
    logits = {name: getattr(self, f'{name}_fc')(h)
              for name in self.head_names}
    attentions = layer_math.odconv_attentions(logits, self.kernel_size,
                                              temperature)
    if 'kernel' in attentions:
      self.sow(nnx.Intermediate, 'routing_weights', attentions['kernel'])
    return attentions


class ODConv(_ConvFields):
  """Omni-dimensional dynamic convolution (Li, Zhou, Yao, ICLR 2022):
  `flax.nnx.Conv`'s arguments plus num_experts (K), the attention's
  reduction, min_hidden and BatchNorm settings, and strategy; the Linen
  `condconv_jax.ODConv`'s parameter tree. Call:
  `__call__(x, *, temperature=1.0, train=None)`; train None follows the
  module's mode (`model.train()` / `model.eval()`) for the attention's
  BatchNorm."""

  def __init__(self, in_features: int, out_features: int,
               kernel_size: int | Sequence[int],
               strides: int | Sequence[int] = 1,
               padding: PaddingLike = 'SAME',
               input_dilation: int | Sequence[int] = 1,
               kernel_dilation: int | Sequence[int] = 1,
               feature_group_count: int = 1, use_bias: bool = False,
               dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
               precision: Any = None,
               kernel_init: Initializer = default_kernel_init,
               bias_init: Initializer = zeros_init, *, num_experts: int = 1,
               reduction: float = layer_math.ODCONV_REDUCTION,
               min_hidden: int = layer_math.ODCONV_MIN_HIDDEN,
               bn_momentum: float = 0.9, bn_epsilon: float = 1e-5,
               strategy: str = 'auto', rngs: nnx.Rngs):
    self._init_conv(in_features, out_features, kernel_size, strides, padding,
                    input_dilation, kernel_dilation, feature_group_count,
                    dtype, param_dtype, precision, kernel_init, num_experts,
                    strategy, rngs)
    self.bias = (nnx.Param(bias_init(rngs.params(), (out_features,),
                                     param_dtype)) if use_bias else None)
    self.attention = ODAttention(
        in_features,
        layer_math.odconv_head_sizes(in_features, out_features,
                                     self.kernel_size, feature_group_count,
                                     num_experts),
        self.kernel_size, reduction=reduction, min_hidden=min_hidden,
        bn_momentum=bn_momentum, bn_epsilon=bn_epsilon,
        param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, temperature=1.0,
               train: bool | None = None) -> jax.Array:
    layer_math.check_input_features(x, self.in_features, 'ODConv')
    attentions = self.attention(x, temperature=temperature, train=train)
    return layer_math.odconv(
        x, self.kernel[...], None if self.bias is None else self.bias[...],
        attentions, **self._conv_args())
