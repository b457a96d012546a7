"""Networks of inverted-residual (MBConv) blocks: MobileNetV2, MnasNet-A1,
EfficientNet, with CondConv in chosen stages, the head and the classifier.

Block and parameter names follow timm's EfficientNet family (conv_pw, bn1,
conv_dw, bn2, se, conv_pwl, bn3; conv_stem/bn1, conv_head/bn2, classifier), so
checkpoints map one-to-one.
"""

from __future__ import annotations

import dataclasses
import math
import flax.linen as nn
import jax.numpy as jnp

from condconv_jax.models.blocks import (Classifier, ConvFactory, ConvNet,
                                        NormFactory, SqueezeExcite,
                                        activation_fn, apply_conv, drop_path)


@dataclasses.dataclass(frozen=True)
class Stage:
  """`repeats` blocks; the first one has `stride`, the rest stride 1."""
  kernel: int
  stride: int
  expand: int
  features: int
  repeats: int
  se_ratio: float = 0.0
  skip: bool = True


def round_channels(channels: float, divisor: int = 8) -> int:
  """TF/timm channel rounding: nearest multiple of divisor, at most -10%."""
  rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * channels:
    rounded += divisor
  return rounded


def stage_repeats(stages, depth: float) -> list[int]:
  """Blocks per stage at a depth multiplier (TF/timm: ceil(repeats * d))."""
  return [int(math.ceil(stage.repeats * depth)) for stage in stages]


class MBConvBlock(nn.Module):
  in_features: int
  out_features: int
  stage: Stage
  strides: int
  conditional: bool
  shared_routing: bool
  convs: ConvFactory
  norms: NormFactory
  activation: str
  drop_path_rate: float = 0.0

  @nn.compact
  def __call__(self, x, *, train: bool, temperature=1.0):
    stage, convs, act = self.stage, self.convs, activation_fn(self.activation)
    cond = self.conditional and convs.num_experts > 0
    routing = None
    if cond and self.shared_routing:
      # One routing function per block, from the block input, shared by its
      # expand, depthwise and project convs (official EfficientNet-CondConv).
      routing = convs.routing('routing')(x, deterministic=not train)
    conv = lambda *a, **k: convs(*a, conditional=self.conditional, **k)
    call = lambda c, h: apply_conv(c, h, routing, train=train,
                                   temperature=temperature)
    mid = self.in_features * stage.expand
    h = x
    if stage.expand != 1:
      h = call(conv(mid, 1, name='conv_pw'), h)
      h = act(self.norms(train, 'bn1')(h))
    dw_bn, pw_name, pw_bn = (('bn2', 'conv_pwl', 'bn3') if stage.expand != 1
                             else ('bn1', 'conv_pw', 'bn2'))
    h = call(conv(mid, stage.kernel, strides=self.strides, groups=mid,
                  name='conv_dw'), h)
    h = act(self.norms(train, dw_bn)(h))
    if stage.se_ratio:
      reduced = max(1, int(round(self.in_features * stage.se_ratio)))
      h = SqueezeExcite(reduced, convs, self.activation, name='se')(h)
    h = call(conv(self.out_features, 1, name=pw_name), h)
    h = self.norms(train, pw_bn)(h)
    if (stage.skip and self.strides == 1 and
        self.in_features == self.out_features):
      h = drop_path(h, self.drop_path_rate, self, train) + x
    return h


class MBConvNet(ConvNet):
  """A stem, stages of MBConv blocks, a 1x1 head conv and a classifier.

  condconv_stages: 1-based stage numbers whose blocks are CondConv.
  condconv_head / condconv_classifier: the head conv / classifier too.
  shared_routing: one routing function per block (else one per conv).
  """

  stages: tuple[Stage, ...] = ()
  stem_features: int = 32
  head_features: int = 1280
  depth: float = 1.0
  condconv_stages: tuple[int, ...] = ()
  condconv_head: bool = False
  condconv_classifier: bool = False
  shared_routing: bool = True
  scale_head_with_width: bool = True
  activation: str = 'swish'
  dropout_rate: float = 0.2
  bn_momentum: float = 0.99

  @nn.compact
  def __call__(self, x, *, train: bool = False, temperature=1.0):
    """temperature: the softmax temperature of DyConv/ODConv convs."""
    convs, norms = self.factories()
    act = activation_fn(self.activation)
    x = jnp.asarray(x, self.dtype)
    features = round_channels(self.stem_features * self.width)
    x = convs(features, 3, strides=2, name='conv_stem')(x)
    x = act(norms(train, 'bn1')(x))
    repeats = stage_repeats(self.stages, self.depth)
    total, index = sum(repeats), 0
    for stage_number, (stage, n) in enumerate(zip(self.stages, repeats), 1):
      out = round_channels(stage.features * self.width)
      for i in range(n):
        x = MBConvBlock(
            features, out, stage, stage.stride if i == 0 else 1,
            conditional=stage_number in self.condconv_stages,
            shared_routing=self.shared_routing, convs=convs, norms=norms,
            activation=self.activation,
            drop_path_rate=self.drop_path_rate * index / total,
            name=f'blocks_{stage_number - 1}_{i}')(x, train=train,
                                                   temperature=temperature)
        features, index = out, index + 1
    head = self.head_features
    if self.scale_head_with_width:
      head = round_channels(head * max(1.0, self.width))
    x = apply_conv(convs(head, 1, conditional=self.condconv_head,
                         name='conv_head'), x, train=train,
                   temperature=temperature)
    x = act(norms(train, 'bn2')(x))
    return Classifier(self.num_classes, convs, self.condconv_classifier,
                      self.dropout_rate, name='classifier')(
                          x, train=train, temperature=temperature)


EFFICIENTNET_B0 = (
    Stage(3, 1, 1, 16, 1, 0.25),
    Stage(3, 2, 6, 24, 2, 0.25),
    Stage(5, 2, 6, 40, 2, 0.25),
    Stage(3, 2, 6, 80, 3, 0.25),
    Stage(5, 1, 6, 112, 3, 0.25),
    Stage(5, 2, 6, 192, 4, 0.25),
    Stage(3, 1, 6, 320, 1, 0.25),
)

MOBILENET_V2 = (
    Stage(3, 1, 1, 16, 1),
    Stage(3, 2, 6, 24, 2),
    Stage(3, 2, 6, 32, 3),
    Stage(3, 2, 6, 64, 4),
    Stage(3, 1, 6, 96, 3),
    Stage(3, 2, 6, 160, 3),
    Stage(3, 1, 6, 320, 1),
)

MNASNET_A1 = (
    Stage(3, 1, 1, 16, 1, skip=False),
    Stage(3, 2, 6, 24, 2),
    Stage(5, 2, 3, 40, 3, 0.25),
    Stage(3, 2, 6, 80, 4),
    Stage(3, 1, 6, 112, 2, 0.25),
    Stage(5, 2, 6, 160, 3, 0.25),
    Stage(3, 1, 6, 320, 1),
)
