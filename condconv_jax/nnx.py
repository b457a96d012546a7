"""Flax NNX modules: CondConv, Routing, DepthwiseConv, and `condconvify`.

    from flax import nnx
    from condconv_jax import nnx as ccnnx

    conv = ccnnx.CondConv(64, 128, (3, 3), strides=2, num_experts=8,
                          rngs=nnx.Rngs(0))     # nnx.Conv's arguments
    y = conv(x)                                 # x: [B, H, W, 64]

    model = ccnnx.condconvify(model, num_experts=8, rngs=nnx.Rngs(0))

`DynamicConv` and `ODConv` (CondConv's successors, from `nnx_dynamic.py`)
are here too. The layers are the Linen modules of `condconv_jax.layers`
and `dynamic_layers` with NNX's construction: the math is the same code
(`layer_math`), and
`nnx.state(layer, nnx.Param)` holds exactly the Linen module's parameter
tree (same names and shapes), so a checkpoint moves between the two APIs
as it is. Routing weights are sown as `nnx.Intermediate` 'routing_weights':
`nnx.capture(model, nnx.Intermediate)(x)` returns them.

`condconvify` replaces the `nnx.Conv`s of an existing model in place by
CondConvs upcycled from them (sparse upcycling, Komatsuzaki et al. 2022,
made exact for CondConv): zero routing kernel and bias make every sigmoid
routing weight 1/2, and experts W_e = (2/E) W + d_e with sum_e d_e = 0 mix
to W, so the model computes the same function at step 0 (to float
rounding) while the noise d_e breaks the experts' symmetry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from condconv_jax import layer_math
from condconv_jax.nnx_dynamic import (DynamicAttention, DynamicConv,
                                      ODAttention, ODConv)
from condconv_jax.upcycling import upcycled_experts
from condconv_jax.geometry import PaddingLike

Dtype = Any
Initializer = Callable[..., jax.Array]
default_kernel_init = nnx.initializers.lecun_normal()
zeros_init = nnx.initializers.zeros_init()


class Routing(nnx.Module):
  """Routing weights r(x) = act(GAP(x) R + b): [B, H, W, C] -> [B, E].

  activation='sigmoid' is the paper's; 'softmax' divides the logits by
  `temperature` first. Dropout (`dropout_rate` > 0) follows NNX's
  train/eval mode (`model.train()`, `model.eval()`) unless `deterministic`
  is given at the call. Parameters: dense/{kernel [C, E], bias [E]}.
  """

  def __init__(self, in_features: int, num_experts: int, *,
               activation: str = 'sigmoid', temperature: float = 1.0,
               dropout_rate: float = 0.0, param_dtype: Dtype = jnp.float32,
               kernel_init: Initializer = default_kernel_init,
               bias_init: Initializer = zeros_init, rngs: nnx.Rngs):
    layer_math.check_routing(num_experts, activation, temperature)
    self.num_experts = num_experts
    self.activation = activation
    self.temperature = temperature
    # dtype None: the dense layer computes in the pooled input's dtype, at
    # least float32 (`layer_math.routing_pool`), as the Linen face does.
    self.dense = nnx.Linear(in_features, num_experts,
                            param_dtype=param_dtype, kernel_init=kernel_init,
                            bias_init=bias_init, rngs=rngs)
    self.dropout = (nnx.Dropout(dropout_rate, rngs=rngs) if dropout_rate > 0
                    else None)

  def __call__(self, x: jax.Array, *,
               deterministic: bool | None = None) -> jax.Array:
    pooled = layer_math.routing_pool(x)
    weights = layer_math.routing_activation(self.dense(pooled),
                                            self.activation, self.temperature)
    if self.dropout is not None:
      weights = self.dropout(weights, deterministic=deterministic)
    self.sow(nnx.Intermediate, 'routing_weights', weights)
    return weights


class CondConv(nnx.Module):
  """A conditionally parameterized 2D convolution (Yang et al., 2019).

  `flax.nnx.Conv`'s arguments (2D, NHWC) plus:

    num_experts: E, the number of expert kernels.
    strategy: 'auto', 'direct', 'loop', 'vmap', 'experts', or one per conv
      kind such as 'depthwise=vmap' (`condconv_jax.strategy.parse`).
    routing: None for the paper's sigmoid `Routing`; a factory
      `routing(in_features, num_experts, rngs=rngs)` returning a module
      called as `routing(x, deterministic=...)` that maps x to [B, E]
      weights; or False for none of its own (the caller passes
      `routing_weights`, to share one routing function between convs as
      the official EfficientNet-CondConv blocks do).

  An int kernel_size is square (k, k): CondConv is 2-D only, where
  nnx.Conv would read an int as a 1-D kernel.

  Parameters: 'kernel' [E, kh, kw, Cin/g, Cout], 'bias' [E, Cout] and the
  routing function's under 'routing', each expert initialized on its own
  shape: the Linen `condconv_jax.CondConv`'s tree.
  """

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
               bias_init: Initializer = zeros_init, *, num_experts: int,
               strategy: str = 'auto', routing=None, rngs: nnx.Rngs):
    kernel_shape = layer_math.condconv_kernel_shape(
        kernel_size, in_features, out_features, feature_group_count,
        num_experts, strategy)
    self.in_features, self.out_features = in_features, out_features
    self.kernel_size = kernel_shape[1:3]
    self.strides, self.padding = strides, padding
    self.input_dilation, self.kernel_dilation = input_dilation, kernel_dilation
    self.feature_group_count = feature_group_count
    self.use_bias = use_bias
    self.dtype, self.param_dtype, self.precision = dtype, param_dtype, precision
    self.num_experts, self.strategy = num_experts, strategy
    self.kernel = nnx.Param(layer_math.per_expert(kernel_init, num_experts)(
        rngs.params(), kernel_shape, param_dtype))
    self.bias = (nnx.Param(layer_math.per_expert(bias_init, num_experts)(
        rngs.params(), (num_experts, out_features), param_dtype))
                 if use_bias else None)
    if routing is False:
      self.routing = None
    else:
      factory = Routing if routing is None else routing
      self.routing = factory(in_features, num_experts, rngs=rngs)

  def __call__(self, x: jax.Array, routing_weights: jax.Array | None = None,
               *, deterministic: bool | None = None) -> jax.Array:
    layer_math.check_input_features(x, self.in_features, 'CondConv')
    if routing_weights is None:
      if self.routing is None:
        raise ValueError('CondConv(routing=False) has no routing function of '
                         'its own: pass routing_weights [batch, num_experts].')
      routing_weights = self.routing(x, deterministic=deterministic)
    return layer_math.condconv(
        x, self.kernel[...], None if self.bias is None else self.bias[...],
        routing_weights, strides=self.strides, padding=self.padding,
        input_dilation=self.input_dilation,
        kernel_dilation=self.kernel_dilation,
        feature_group_count=self.feature_group_count, strategy=self.strategy,
        dtype=self.dtype, precision=self.precision)


class DepthwiseConv(nnx.Module):
  """A static depthwise conv with nnx.Conv's parameters, in the fast CPU
  form (`condconv_jax.DepthwiseConv`'s NNX face): 'kernel' [kh, kw, 1,
  out_features], 'bias' [out_features]; out_features defaults to
  in_features and must be a multiple of it (channel multiplier)."""

  def __init__(self, in_features: int, out_features: int | None = None,
               kernel_size: int | Sequence[int] = 3,
               strides: int | Sequence[int] = 1,
               padding: PaddingLike = 'SAME',
               input_dilation: int | Sequence[int] = 1,
               kernel_dilation: int | Sequence[int] = 1,
               use_bias: bool = True, dtype: Dtype | None = None,
               param_dtype: Dtype = jnp.float32, precision: Any = None,
               kernel_init: Initializer = default_kernel_init,
               bias_init: Initializer = zeros_init, *,
               implementation: str = 'auto', rngs: nnx.Rngs):
    features = layer_math.depthwise_features(in_features, out_features, None)
    self.in_features, self.out_features = in_features, features
    self.strides, self.padding = strides, padding
    self.input_dilation, self.kernel_dilation = input_dilation, kernel_dilation
    self.dtype, self.precision = dtype, precision
    self.implementation = implementation
    self.kernel = nnx.Param(kernel_init(
        rngs.params(), layer_math.depthwise_kernel_shape(kernel_size,
                                                         features),
        param_dtype))
    self.bias = (nnx.Param(bias_init(rngs.params(), (features,), param_dtype))
                 if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    layer_math.check_input_features(x, self.in_features, 'DepthwiseConv')
    return layer_math.depthwise(
        x, self.kernel[...], None if self.bias is None else self.bias[...],
        strides=self.strides, padding=self.padding,
        input_dilation=self.input_dilation,
        kernel_dilation=self.kernel_dilation,
        implementation=self.implementation, dtype=self.dtype,
        precision=self.precision)


# ---------------------------------------------------------------- condconvify


def _path_name(path) -> str:
  return '/'.join(str(part) for part in path) or '(the model itself)'


def _check_convertible(path, conv: nnx.Conv):
  """Raises ValueError naming the conv when CondConv cannot replace it."""
  where = f'nnx.Conv at {_path_name(path)}'
  if len(conv.kernel_size) != 2:
    raise ValueError(f'{where} is {len(conv.kernel_size)}-D (kernel_size '
                     f'{conv.kernel_size}): condconvify converts 2-D NHWC '
                     'convs only; leave it out with `where`.')
  if conv.mask is not None:
    raise ValueError(f'{where} has a kernel mask, which CondConv does not '
                     'apply; leave it out with `where`.')
  if isinstance(conv.padding, str) and conv.padding not in ('SAME', 'VALID'):
    raise ValueError(f'{where} has padding {conv.padding!r}; CondConv takes '
                     "'SAME', 'VALID', an int or explicit pairs.")
  if conv.preferred_element_type is not None:
    raise ValueError(f'{where} sets preferred_element_type, which CondConv '
                     'does not take; leave it out with `where`.')


def upcycle_conv(conv: nnx.Conv, *, num_experts: int, rngs: nnx.Rngs,
                 noise_scale: float = 0.01, strategy: str = 'auto'
                 ) -> CondConv:
  """A CondConv computing what `conv` computes, while its routing weights
  are all 1/2 (zero routing kernel and bias, as built here)."""
  layer = CondConv(
      conv.in_features, conv.out_features, conv.kernel_size,
      strides=1 if conv.strides is None else conv.strides,
      padding=conv.padding,
      input_dilation=1 if conv.input_dilation is None else conv.input_dilation,
      kernel_dilation=(1 if conv.kernel_dilation is None
                       else conv.kernel_dilation),
      feature_group_count=conv.feature_group_count, use_bias=conv.use_bias,
      dtype=conv.dtype, param_dtype=conv.param_dtype,
      precision=conv.precision, num_experts=num_experts, strategy=strategy,
      routing=lambda cin, e, rngs: Routing(
          cin, e, param_dtype=conv.param_dtype, kernel_init=zeros_init,
          rngs=rngs),
      rngs=rngs)
  # The routing built here is sigmoid with zero parameters: weights of 1/2.
  layer.kernel[...] = upcycled_experts(conv.kernel[...], num_experts,
                                       rngs.params(), noise_scale, 0.5)
  if conv.use_bias:
    layer.bias[...] = upcycled_experts(conv.bias[...], num_experts,
                                       rngs.params(), noise_scale, 0.5)
  return layer


def _child(parent, key):
  if isinstance(key, int) or not isinstance(parent, nnx.Module):
    return parent[key]
  return getattr(parent, key)


def _setter(model, path):
  """A function that puts a new module at `path` of `model`; raises
  ValueError, changing nothing, where the container cannot take one."""
  parent = model
  for key in path[:-1]:
    parent = _child(parent, key)
  key = path[-1]
  if isinstance(parent, nnx.Module) and isinstance(key, str) and hasattr(
      parent, key):
    return lambda layer: setattr(parent, key, layer)
  if hasattr(parent, '__setitem__'):
    return lambda layer: parent.__setitem__(key, layer)
  raise ValueError(f'nnx.Conv at {_path_name(path)} sits in a '
                   f'{type(parent).__name__}, which cannot be changed in '
                   'place: hold it in an nnx.Module attribute, nnx.List or '
                   'nnx.Dict, or leave it out with `where`.')


def condconvify(model: nnx.Module, *, num_experts: int, rngs: nnx.Rngs,
                where: Callable[[tuple, nnx.Conv], bool] | None = None,
                noise_scale: float = 0.01, strategy: str = 'auto'):
  """Replaces, in place, every `nnx.Conv` of `model` (or those that
  `where(path, conv)` selects) with a CondConv upcycled from it
  (`upcycle_conv`); returns the model.

  At step 0 the model computes the same function, to float rounding; the
  experts differ by zero-mean noise of `noise_scale` times each kernel's
  standard deviation, and the routing functions get gradients from the
  first step. Every selected conv is checked and converted before any is
  replaced: on an error nothing has changed.
  """
  layer_math.check_num_experts(num_experts)
  found = [(path, node) for path, node in nnx.iter_graph(model)
           if isinstance(node, nnx.Conv)]
  if not found:
    raise ValueError(f'{type(model).__name__} holds no nnx.Conv to convert.')
  selected = [(path, conv) for path, conv in found
              if where is None or where(path, conv)]
  if not selected:
    raise ValueError(
        f'`where` selected none of the {len(found)} nnx.Convs of '
        f'{type(model).__name__} (paths: '
        f'{", ".join(_path_name(path) for path, _ in found)}).')
  if any(not path for path, _ in selected):
    raise ValueError('condconvify changes a model in place: call '
                     'upcycle_conv on a bare nnx.Conv instead.')
  for path, conv in selected:
    _check_convertible(path, conv)
  setters = [_setter(model, path) for path, _ in selected]
  replacements = [upcycle_conv(conv, num_experts=num_experts, rngs=rngs,
                               noise_scale=noise_scale, strategy=strategy)
                  for _, conv in selected]
  for put, layer in zip(setters, replacements):
    put(layer)
  # A conv held at two places is visited once: if one is left, undo.
  left = [path for path, node in nnx.iter_graph(model)
          if any(node is conv for _, conv in selected)]
  if left:
    for (path, conv), put in zip(selected, setters):
      put(conv)
    raise ValueError(
        f'nnx.Conv at {_path_name(left[0])} is also held elsewhere (shared '
        'weights): condconvify replaces a module at one place only. Untie '
        'it, or leave it out with `where`; the model is unchanged.')
  return model


__all__ = ['CondConv', 'DepthwiseConv', 'DynamicAttention', 'DynamicConv',
           'ODAttention', 'ODConv', 'Routing', 'condconvify', 'upcycle_conv']
