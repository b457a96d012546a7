"""The paper's ImageNet models, each with and without CondConv, by name.

    model = get_model('efficientnet_b0', num_experts=8)
    variables = model.init(key, images, train=False)

num_experts=0 is the static baseline; otherwise CondConv goes where the paper
puts it (each builder's docstring), overridable with the model's own placement
arguments (condconv_stages, condconv_layers, condconv_head, ...).

CondConv's successors have their own names: 'dy_*' (Dynamic Convolution, Chen
et al. 2020; K = 4 by default) and 'od_*' (ODConv, Li, Zhou, Yao 2022; K = 1
by default, the paper's "1x"), the width in the name ('od_mobilenetv2_075'
is width 0.75), initialized as their PyTorch code does (init_style='torch').
num_experts is K; 0 is their static twin. Their models take
the softmax temperature at call time: model.apply(v, x, temperature=t).

'ssd_mobilenet_v1' is the paper's COCO detector (condconv_jax.detection): it
returns per-anchor outputs, not logits, and num_classes counts its
background column (default 91).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn

from condconv_jax.models.mbconv import (EFFICIENTNET_B0, MNASNET_A1,
                                        MOBILENET_V2, MBConvNet)
from condconv_jax.models.mobilenet_v1 import MINI_LAYERS, MobileNetV1
from condconv_jax.models.resnet import STAGE_SIZES, ResNet
from condconv_jax.models.ssd import SSDMobileNetV1


def _mobilenet_v1(*, width, depth, **kwargs):
  """CondConv in separable layers 7-13 and the classifier (600M MADDs)."""
  _require_depth_one('mobilenet_v1', depth)
  return MobileNetV1(width=width, **kwargs)


def _mobilenet_v1_mini(*, width, depth, **kwargs):
  """A 6-separable-layer MobileNetV1 for 28x28 images (the embedded
  Fashion-MNIST experiment): CondConv in layers 4-6 and the classifier;
  DyConv/ODConv (conv_family) in every conv but the stem, the classifier
  static, as their papers place them."""
  _require_depth_one('mobilenet_v1_mini', depth)
  defaults = dict(separable_layers=MINI_LAYERS, stem_features=16,
                  stem_strides=2, condconv_layers=(4, 5, 6))
  if kwargs.get('conv_family', 'condconv') != 'condconv':
    defaults.update(condconv_layers=tuple(range(1, len(MINI_LAYERS) + 1)),
                    condconv_classifier=False)
  return MobileNetV1(width=width, **{**defaults, **kwargs})


def _mobilenet_v2(*, width, depth, **kwargs):
  """CondConv in the last four stages (64-320 features, the final 11 blocks),
  the head conv and the classifier: of the final-blocks placements this one
  matches the paper's 329M MADDs and 27.5M parameters (330.1M, 27.56M; the
  scan is in docs/models.md)."""
  defaults = dict(stages=MOBILENET_V2, activation='relu6', bn_momentum=0.9,
                  bn_epsilon=1e-5, padding='symmetric', dropout_rate=0.2,
                  condconv_stages=(4, 5, 6, 7), condconv_head=True,
                  condconv_classifier=True, shared_routing=False)
  return MBConvNet(width=width, depth=depth, **{**defaults, **kwargs})


def _mnasnet_a1(*, width, depth, **kwargs):
  """CondConv in the final block (320 features) and the classifier: of the
  final-blocks placements this one is closest to the paper's (unverified)
  325M MADDs (327.0M; the scan is in docs/models.md)."""
  defaults = dict(stages=MNASNET_A1, activation='relu', dropout_rate=0.2,
                  condconv_stages=(7,), condconv_head=False,
                  condconv_classifier=True, shared_routing=False,
                  scale_head_with_width=False)
  return MBConvNet(width=width, depth=depth, **{**defaults, **kwargs})


def _efficientnet(*, width, depth, **kwargs):
  """CondConv in every block of stages 5-7, one routing function per block
  shared by its three convs; stem, SE, head and classifier static (the
  official EfficientNet-CondConv code)."""
  defaults = dict(stages=EFFICIENTNET_B0, activation='swish', dropout_rate=0.2,
                  condconv_stages=(5, 6, 7), shared_routing=True)
  return MBConvNet(width=width, depth=depth, **{**defaults, **kwargs})


def _resnet(layers, *, width, depth, **kwargs):
  """CondConv in every conv of the last stage, shortcut included (+120M)."""
  _require_depth_one(f'resnet{layers}', depth)
  return ResNet(depth_layers=layers, width=width, **kwargs)


def _ssd_mobilenet_v1(*, width, depth, **kwargs):
  """MobileNetV1 SSD300 (TF ssd_mobilenet_v1_coco); CondConv in separable
  layers 7-13, the extra layers and the box predictors (kernel mixing
  +4.2% MADDs at 8 experts, the paper's +4%; the scan is in docs/detection.md)."""
  _require_depth_one('ssd_mobilenet_v1', depth)
  return SSDMobileNetV1(width=width, **kwargs)


def _dynamic_mobilenet_v2(family, width):
  """DY- and OD-MobileNetV2: every conv but the stem dynamic, the head 1x1
  to 1280 included; the classifier static (Chen et al. 2020, Sec. 4; the
  official models/od_mobilenetv2.py)."""
  defaults = dict(init_style='torch', conv_family=family,
                  condconv_stages=tuple(range(1, 8)), condconv_head=True,
                  condconv_classifier=False)
  return functools.partial(_fixed_width, _mobilenet_v2, width, defaults)


def _dy_resnet(layers):
  """DY-ResNet: every conv but the stem dynamic, the downsample 1x1
  included; the fc static (Chen et al. 2020, as its reimplementations)."""
  defaults = dict(init_style='torch', conv_family='dyconv',
                  condconv_stages=(1, 2, 3, 4), condconv_shortcut=True,
                  condconv_classifier=False)
  return functools.partial(_fixed_width, functools.partial(_resnet, layers),
                           1.0, defaults)


def _od_resnet(layers):
  """OD-ResNet: every conv inside the residual blocks an ODConv; the stem,
  the downsample 1x1 and the fc static; dropout 0.1 before the fc (the
  official OD_ResNet's default; models/od_resnet.py)."""
  defaults = dict(init_style='torch', conv_family='odconv',
                  condconv_stages=(1, 2, 3, 4), condconv_shortcut=False,
                  condconv_classifier=False, dropout_rate=0.1)
  return functools.partial(_fixed_width, functools.partial(_resnet, layers),
                           1.0, defaults)


def _fixed_width(builder, fixed_width, defaults, *, width, depth, **kwargs):
  if width != 1.0:
    raise ValueError(f'this model has its width in its name '
                     f'({fixed_width}); width must be 1.0, got {width}.')
  return builder(width=fixed_width, depth=depth, **{**defaults, **kwargs})


def _require_depth_one(name, depth):
  if depth != 1.0:
    raise ValueError(f'{name} has a fixed depth; depth must be 1.0, got '
                     f'{depth}. Pick another ResNet depth by name instead.')


MODELS = {
    'mobilenet_v1': (_mobilenet_v1, MobileNetV1),
    'mobilenet_v1_mini': (_mobilenet_v1_mini, MobileNetV1),
    'mobilenet_v2': (_mobilenet_v2, MBConvNet),
    'mnasnet_a1': (_mnasnet_a1, MBConvNet),
    'efficientnet_b0': (_efficientnet, MBConvNet),
    **{f'resnet{n}': (functools.partial(_resnet, n), ResNet)
       for n in STAGE_SIZES},
    'ssd_mobilenet_v1': (_ssd_mobilenet_v1, SSDMobileNetV1),
}
# The dynamic-convolution family: (builder, module class, default K).
DYNAMIC_MODELS = {
    'dy_mobilenetv2_050': (_dynamic_mobilenet_v2('dyconv', 0.5), MBConvNet, 4),
    'dy_mobilenetv2_100': (_dynamic_mobilenet_v2('dyconv', 1.0), MBConvNet, 4),
    'dy_resnet18': (_dy_resnet(18), ResNet, 4),
    'dy_resnet50': (_dy_resnet(50), ResNet, 4),
    'od_resnet18': (_od_resnet(18), ResNet, 1),
    'od_resnet50': (_od_resnet(50), ResNet, 1),
    'od_resnet101': (_od_resnet(101), ResNet, 1),
    'od_mobilenetv2_050': (_dynamic_mobilenet_v2('odconv', 0.5), MBConvNet,
                           1),
    'od_mobilenetv2_075': (_dynamic_mobilenet_v2('odconv', 0.75), MBConvNet,
                           1),
    'od_mobilenetv2_100': (_dynamic_mobilenet_v2('odconv', 1.0), MBConvNet,
                           1),
}


def _fields(module_cls) -> set[str]:
  return {f.name for f in dataclasses.fields(module_cls)} - {'parent', 'name'}


def get_model(name: str, *, num_experts: int | None = None,
              width: float = 1.0, depth: float = 1.0,
              num_classes: int | None = None, **kwargs) -> nn.Module:
  """A registered model. num_experts: None = the model's default (0, static,
  for the CondConv paper's names; 4 for 'dy_*', 1 for 'od_*'). num_classes:
  None = the model's default (1000 for the ImageNet classifiers, 91 for the
  detector). kwargs are the model's own fields (dropout_rate,
  drop_path_rate, bn_momentum, bn_epsilon, activation, padding, dtype,
  strategy, conv_family, placement, ...)."""
  if name in DYNAMIC_MODELS:
    builder, module_cls, default_experts = DYNAMIC_MODELS[name]
  elif name in MODELS:
    (builder, module_cls), default_experts = MODELS[name], 0
  else:
    raise ValueError(f'unknown model {name!r}; valid names: '
                     f'{", ".join(sorted({**MODELS, **DYNAMIC_MODELS}))}.')
  if num_experts is None:
    num_experts = default_experts
  reserved = {'stages', 'depth_layers', 'separable_layers', 'width', 'depth'}
  valid = _fields(module_cls) - reserved
  unknown = sorted(set(kwargs) - valid)
  if unknown:
    raise ValueError(f'unknown argument(s) {unknown} for model {name!r}; '
                     f'valid: {", ".join(sorted(valid))}.')
  if not isinstance(num_experts, int) or num_experts < 0:
    raise ValueError(f'num_experts must be an int >= 0 (0 = static), got '
                     f'{num_experts!r}.')
  if num_classes is not None:
    kwargs['num_classes'] = num_classes
  return builder(width=width, depth=depth, num_experts=num_experts, **kwargs)


__all__ = ['DYNAMIC_MODELS', 'MODELS', 'get_model', 'MBConvNet', 'MobileNetV1',
           'ResNet',
           'SSDMobileNetV1']
