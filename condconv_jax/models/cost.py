"""Exact parameter and multiply-add counts, traced from the model itself.

The model is initialized abstractly (jax.eval_shape: no arithmetic, no
memory) at batch 1 while every layer call is intercepted, so the counts follow
whatever the model really builds. Multiply-adds are counted the way the
CondConv paper counts MADDs:

- conv: output pixels x kh x kw x Cin/g x Cout; dense: in x out;
- CondConv and DynamicConv: their conv, plus the kernel mixing,
  E x (kh x kw x Cin/g x Cout);
- ODConv: its conv, the kernel mixing for K > 1, the spatial attention's
  multiply into the kernel (kh x kw x Cin/g x Cout, k > 1), and the channel
  and filter attentions' multiplies (one per input / output element);
- routing and attention functions: their global average pool (one add per
  input element) and dense layers (Cin x E; DyConv's and ODConv's hidden
  and head layers), once per function;
- squeeze-excite: its pool and its gate (one multiply per element) besides
  its two convs; the classifier's global pool. With these, EfficientNet-B0
  comes to the 390M its paper reports (385.8M from convs and dense alone);
  for MobileNetV1/V2 and ResNet they add under 0.1%;
- batch norm, activations and residual additions: not counted (they fold
  into the convs at inference), as in MobileNetV1's 569M.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from condconv_jax import layer_math
from condconv_jax.dynamic_layers import (DynamicAttention, DynamicConv,
                                         ODAttention, ODConv)
from condconv_jax.layers import CondConv, DepthwiseConv, Routing
from condconv_jax.models.blocks import Classifier, SqueezeExcite


@dataclasses.dataclass(frozen=True)
class LayerCost:
  path: str
  kind: str
  params: int
  macs: int
  output_shape: tuple[int, ...]
  depthwise: bool = False  # a conv with one input channel per group


@dataclasses.dataclass(frozen=True)
class Cost:
  params: int
  macs: int
  layers: tuple[LayerCost, ...]

  def table(self) -> str:
    lines = [f'{"layer":<44} {"kind":<14} {"params":>11} {"MACs":>13}  output']
    for layer in self.layers:
      lines.append(f'{layer.path:<44} {layer.kind:<14} {layer.params:>11,} '
                   f'{layer.macs:>13,}  {layer.output_shape}')
    lines.append(f'{"total":<44} {"":<14} {self.params:>11,} '
                 f'{self.macs:>13,}')
    return '\n'.join(lines)


def _kernel_area(module) -> int:
  kernel_size = module.kernel_size
  if isinstance(kernel_size, int):
    kernel_size = (kernel_size, kernel_size)
  return math.prod(kernel_size)


def _conv_macs(module, out_shape) -> int:
  return math.prod(out_shape[1:]) * _kernel_area(module)


def _layer_macs(module, in_shape, out_shape) -> int:
  if isinstance(module, (CondConv, DynamicConv, ODConv)):
    cin_g = in_shape[-1] // module.feature_group_count
    kernel = _kernel_area(module) * cin_g * module.features
    conv = _conv_macs(module, out_shape) * cin_g
    if not isinstance(module, ODConv):
      return conv + module.num_experts * kernel
    heads = layer_math.odconv_head_sizes(
        in_shape[-1], module.features, module.kernel_size,
        module.feature_group_count, module.num_experts)
    return (conv + ('kernel' in heads) * module.num_experts * kernel +
            ('spatial' in heads) * kernel + math.prod(in_shape[1:]) +
            ('filter' in heads) * math.prod(out_shape[1:]))
  if isinstance(module, DepthwiseConv):
    return _conv_macs(module, out_shape)
  if isinstance(module, nn.Conv):
    return _conv_macs(module, out_shape) * (in_shape[-1] //
                                            module.feature_group_count)
  if isinstance(module, nn.Dense):
    return math.prod(out_shape[1:]) * in_shape[-1]
  if isinstance(module, (Routing, DynamicAttention, ODAttention,
                         Classifier)):
    return math.prod(in_shape[1:])  # the global average pool
  if isinstance(module, SqueezeExcite):
    return 2 * math.prod(in_shape[1:])  # pool + gate
  return 0


def _is_depthwise(module, in_shape) -> bool:
  if isinstance(module, DepthwiseConv):
    return True
  groups = getattr(module, 'feature_group_count', 1)
  return (isinstance(module, (CondConv, DynamicConv, ODConv, nn.Conv)) and
          groups > 1 and groups == in_shape[-1])


_COUNTED = (CondConv, DynamicConv, ODConv, DepthwiseConv, nn.Conv, nn.Dense,
            nn.BatchNorm, Routing, DynamicAttention, ODAttention,
            SqueezeExcite, Classifier)


def count(model: nn.Module, input_shape: Sequence[int], **call_kwargs) -> Cost:
  """Counts `model` on one example of `input_shape` ([1, H, W, C] or [H, W, C]).

  call_kwargs go to model.init (default train=False).
  """
  input_shape = tuple(input_shape)
  if len(input_shape) == 3:
    input_shape = (1, *input_shape)
  if input_shape[0] != 1:
    raise ValueError(f'costs are per example: input_shape must have batch 1, '
                     f'got {input_shape}.')
  call_kwargs.setdefault('train', False)
  calls = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and isinstance(context.module,
                                                        _COUNTED):
      # ODAttention returns a dict of attentions; its cost is its input's.
      out_shape = out.shape if hasattr(out, 'shape') else ()
      calls.append((context.module, args[0].shape, out_shape))
    return out

  def init():
    with nn.intercept_methods(record):
      return model.init(jax.random.key(0), jnp.zeros(input_shape),
                        **call_kwargs)

  variables = jax.eval_shape(init)
  params = traverse_util.flatten_dict(variables.get('params', {}))
  params_under = {}
  for path, leaf in params.items():
    owner = '/'.join(path[:-1])
    params_under[owner] = params_under.get(owner, 0) + math.prod(leaf.shape)
  layers = []
  for module, in_shape, out_shape in calls:
    path = '/'.join(module.path)
    layers.append(LayerCost(path, type(module).__name__,
                            params_under.get(path, 0),
                            _layer_macs(module, in_shape, out_shape),
                            tuple(out_shape), _is_depthwise(module, in_shape)))
  total_params = sum(math.prod(leaf.shape) for leaf in params.values())
  return Cost(total_params, sum(layer.macs for layer in layers), tuple(layers))
