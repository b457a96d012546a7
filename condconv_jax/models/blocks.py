"""What every model shares: the conv factory (static, CondConv, DyConv or
ODConv), BN, SE, stochastic depth and the classifier.

Models never construct a conv directly: they ask `ConvFactory` for one, with
`conditional=True` where the placement puts a conditional conv. So one
backbone serves the static model and every conditional variant, and padding
style, dtype, conv family and strategy are set in one place. The dynamic
families take a softmax temperature at call time: models pass theirs to every
conv through `apply_conv`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from condconv_jax import static_ops
from condconv_jax import strategy as strategy_lib
from condconv_jax.choices import check_choice
from condconv_jax.dynamic_layers import DynamicConv, ODConv
from condconv_jax.layers import CondConv, DepthwiseConv, Routing

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'relu': nn.relu,
    'relu6': nn.relu6,
    'swish': nn.swish,
    'silu': nn.swish,
}
PADDINGS = ('SAME', 'symmetric')
# What a conditional conv is: CondConv (Yang et al. 2019), Dynamic
# Convolution (Chen et al. 2020) or ODConv (Li, Zhou, Yao 2022).
CONV_FAMILIES = ('condconv', 'dyconv', 'odconv')
DYNAMIC_CONVS = (DynamicConv, ODConv)


def activation_fn(name: str):
  return ACTIVATIONS[check_choice('activation', name, tuple(ACTIVATIONS))]


def conv_padding(style: str, kernel_size: int):
  """'SAME' (TensorFlow: extra pixel at the end, what the official TF code and
  timm's tf_* ports use) or 'symmetric' (PyTorch: k//2 on both sides)."""
  if check_choice('padding', style, PADDINGS) == 'SAME':
    return 'SAME'
  return ((kernel_size // 2,) * 2,) * 2


# He-normal on fan-out, the initializer of the official TF MnasNet/EfficientNet
# and CondConv code (each expert separately; CondConv applies it per expert).
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def depthwise_kernel_init(multiplier: int = 1):
  """The same official initializer for a depthwise kernel: normal with std
  sqrt(2 / fan_out), fan_out = kh * kw * multiplier.

  The TF code computes fan_out = kh * kw * out_filters from the Keras kernel
  shape, which for a depthwise conv is (kh, kw, C, multiplier). Ours is HWIO
  (kh, kw, 1, C * multiplier), where variance_scaling would count
  kh * kw * C * multiplier: sqrt(C) too small (EfficientNet-B0's first
  depthwise conv: std 0.048 instead of 0.471). timm's `_init_weight_goog`
  agrees with TF (fan_out = kh * kw * out_channels // groups).
  """
  def init(key, shape, dtype=jnp.float32):
    kh, kw = shape[0], shape[1]
    std = math.sqrt(2.0 / (kh * kw * multiplier))
    return std * jax.random.normal(key, shape, dtype)
  return init
dense_kernel_init = nn.initializers.variance_scaling(1 / 3, 'fan_out',
                                                     'uniform')
# Where the initializers come from: 'tf' (the official TF CondConv, MnasNet
# and EfficientNet code, above; ResNets zero-init their last BN scale) or
# 'torch' (the PyTorch code of DyConv and ODConv: kaiming_normal_ on the
# fan-out for every conv, depthwise included (fan-out = kh * kw * C), BN
# scales 1, the classifier N(0, 0.01); official od_resnet.py and
# od_mobilenetv2.py).
INIT_STYLES = ('tf', 'torch')
torch_classifier_init = nn.initializers.normal(0.01)


@dataclasses.dataclass(frozen=True)
class ConvFactory:
  """Builds a model's convs: static, or of `family` where `conditional`.

  num_experts: 0 makes every conv static whatever `conditional` says.
  bn_momentum, bn_epsilon: the model's, for ODConv's attention BatchNorm.
  """

  num_experts: int = 0
  padding: str = 'SAME'
  dtype: Any = jnp.float32
  strategy: str = 'auto'
  routing_dropout: float = 0.0
  family: str = 'condconv'
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  init_style: str = 'tf'

  def _routing_factory(self):
    return functools.partial(Routing, dropout_rate=self.routing_dropout)

  def routing(self, name: str) -> nn.Module:
    """A routing function to share between the convs of one block."""
    if self.family != 'condconv':
      raise ValueError(f'shared routing is a CondConv placement; a '
                       f'{self.family} conv has its own attention: set '
                       f'shared_routing=False.')
    return self._routing_factory()(self.num_experts, name=name)

  def __call__(self, features: int, kernel_size: int, *, strides: int = 1,
               groups: int = 1, use_bias: bool = False,
               conditional: bool = False, kernel_init=None,
               name: str) -> nn.Module:
    """kernel_init: None = the init style's initializer for this conv (He
    normal on the fan-out; for depthwise convs TF's depthwise fan-out)."""
    depthwise = groups > 1 and groups == features
    if kernel_init is None:
      kernel_init = (depthwise_kernel_init()
                     if depthwise and self.init_style == 'tf'
                     else conv_kernel_init)
    common = dict(features=features, kernel_size=(kernel_size, kernel_size),
                  strides=strides,
                  padding=conv_padding(self.padding, kernel_size),
                  use_bias=use_bias, dtype=self.dtype,
                  kernel_init=kernel_init, name=name)
    if conditional and self.num_experts > 0:
      conditional_args = dict(feature_group_count=groups,
                              num_experts=self.num_experts,
                              strategy=self.strategy, **common)
      if self.family == 'dyconv':
        return DynamicConv(**conditional_args)
      if self.family == 'odconv':
        return ODConv(bn_momentum=self.bn_momentum,
                      bn_epsilon=self.bn_epsilon, **conditional_args)
      return CondConv(routing=self._routing_factory(), **conditional_args)
    if depthwise:
      return DepthwiseConv(**common)
    # nn.Conv's module and parameters, computed in the fastest form for the
    # backend (on CPU a 1x1 conv is a matmul: static_ops.conv_general_dilated).
    return nn.Conv(feature_group_count=groups,
                   conv_general_dilated=static_ops.conv_general_dilated,
                   **common)


@dataclasses.dataclass(frozen=True)
class NormFactory:
  momentum: float = 0.99
  epsilon: float = 1e-3
  dtype: Any = jnp.float32
  init_style: str = 'tf'

  def __call__(self, train: bool, name: str, zero_init: bool = False):
    """zero_init: a zero scale (a residual branch's last BN, 'tf' only)."""
    zero_init = zero_init and self.init_style == 'tf'

    return nn.BatchNorm(use_running_average=not train, momentum=self.momentum,
                        epsilon=self.epsilon, dtype=self.dtype,
                        scale_init=(nn.initializers.zeros_init() if zero_init
                                    else nn.initializers.ones_init()),
                        name=name)


def apply_conv(conv: nn.Module, x, routing_weights=None, *, train=False,
               temperature=1.0):
  """Calls a conv made by ConvFactory: CondConvs take routing weights, the
  dynamic families the softmax temperature."""
  if isinstance(conv, CondConv):
    return conv(x, routing_weights, deterministic=not train)
  if isinstance(conv, DYNAMIC_CONVS):
    return conv(x, temperature=temperature, train=train)
  return conv(x)


class SqueezeExcite(nn.Module):
  """x * sigmoid(W2 act(W1 GAP(x))): reduce to `reduced` channels and back."""

  reduced: int
  convs: ConvFactory
  activation: str

  @nn.compact
  def __call__(self, x):
    pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = self.convs(self.reduced, 1, use_bias=True, name='conv_reduce')(pooled)
    s = activation_fn(self.activation)(s)
    s = self.convs(x.shape[-1], 1, use_bias=True, name='conv_expand')(s)
    return x * nn.sigmoid(s)


def drop_path(x, rate: float, module: nn.Module, train: bool):
  """Stochastic depth on a residual branch: drop whole examples, rescale."""
  if not train or rate == 0.0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(module.make_rng('dropout'), keep,
                              (x.shape[0], 1, 1, 1))
  return jnp.where(mask, x / keep, 0).astype(x.dtype)


class Classifier(nn.Module):
  """Global-average-pooled features -> logits. Conditional: a 1x1 CondConv
  over the pooled features (its own routing sees the same pooled input)."""

  num_classes: int
  convs: ConvFactory
  conditional: bool = False
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, *, train: bool, temperature=1.0):
    x = jnp.mean(x, axis=(1, 2), keepdims=True)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    if self.conditional and self.convs.num_experts > 0:
      conv = self.convs(self.num_classes, 1, use_bias=True, conditional=True,
                        kernel_init=dense_kernel_init, name='fc')
      logits = apply_conv(conv, x, train=train, temperature=temperature)
    else:
      init = (torch_classifier_init if self.convs.init_style == 'torch'
              else dense_kernel_init)
      logits = nn.Dense(self.num_classes, dtype=self.convs.dtype,
                        kernel_init=init, name='fc')(x)
    return jnp.asarray(logits[:, 0, 0, :], jnp.float32)


class ConvNet(nn.Module):
  """Fields every model shares, and the factories built from them.

  Subclasses redeclare a field only to change its default.
  """

  num_classes: int = 1000
  width: float = 1.0
  num_experts: int = 0
  activation: str = 'relu'
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-3
  padding: str = 'SAME'
  dtype: Any = jnp.float32
  strategy: str = 'auto'
  routing_dropout: float = 0.0
  conv_family: str = 'condconv'
  init_style: str = 'tf'

  def factories(self) -> tuple[ConvFactory, NormFactory]:
    # Checked here, where every model reads them: a static model never
    # builds a CondConv, so a misspelled strategy would pass unnoticed.
    activation_fn(self.activation)
    check_choice('padding', self.padding, PADDINGS)
    check_choice('conv_family', self.conv_family, CONV_FAMILIES)
    check_choice('init_style', self.init_style, INIT_STYLES)
    strategy_lib.parse(self.strategy)
    return (ConvFactory(self.num_experts, self.padding, self.dtype,
                        self.strategy, self.routing_dropout, self.conv_family,
                        self.bn_momentum, self.bn_epsilon, self.init_style),
            NormFactory(self.bn_momentum, self.bn_epsilon, self.dtype,
                        self.init_style))
