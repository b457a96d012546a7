"""ResNet v1.5 (stride on the 3x3 conv, as torchvision and the Flax examples),
with conditional convs in chosen stages: every conv of a chosen stage, each
with its own routing function, the shortcut included unless
condconv_shortcut=False (ODConv keeps it static).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from condconv_jax import pooling
from condconv_jax.models.blocks import (Classifier, ConvFactory, ConvNet,
                                        NormFactory, activation_fn, apply_conv,
                                        drop_path)

STAGE_SIZES = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}


class ResNetBlock(nn.Module):
  """Basic (two 3x3) or bottleneck (1x1, 3x3, 1x1 x4) residual block."""

  features: int
  strides: int
  bottleneck: bool
  conditional: bool
  convs: ConvFactory
  norms: NormFactory
  activation: str
  drop_path_rate: float = 0.0
  conditional_shortcut: bool = True

  @nn.compact
  def __call__(self, x, *, train: bool, temperature=1.0):
    act = activation_fn(self.activation)
    conv = lambda *a, **k: self.convs(*a, conditional=self.conditional, **k)
    call = lambda c, h: apply_conv(c, h, train=train, temperature=temperature)
    if self.bottleneck:
      out_features = 4 * self.features
      h = act(self.norms(train, 'bn1')(call(conv(self.features, 1,
                                                 name='conv1'), x)))
      h = act(self.norms(train, 'bn2')(call(
          conv(self.features, 3, strides=self.strides, name='conv2'), h)))
      h = self.norms(train, 'bn3', zero_init=True)(call(
          conv(out_features, 1, name='conv3'), h))
    else:
      out_features = self.features
      h = act(self.norms(train, 'bn1')(call(
          conv(self.features, 3, strides=self.strides, name='conv1'), x)))
      h = self.norms(train, 'bn2', zero_init=True)(call(
          conv(self.features, 3, name='conv2'), h))
    shortcut = x
    if self.strides != 1 or x.shape[-1] != out_features:
      downsample = self.convs(
          out_features, 1, strides=self.strides, name='downsample',
          conditional=self.conditional and self.conditional_shortcut)
      shortcut = self.norms(train, 'downsample_bn')(call(downsample, x))
    return act(drop_path(h, self.drop_path_rate, self, train) + shortcut)


class ResNet(ConvNet):
  depth_layers: int = 50
  condconv_stages: tuple[int, ...] = (4,)
  condconv_classifier: bool = False
  condconv_shortcut: bool = True
  bn_epsilon: float = 1e-5
  padding: str = 'symmetric'

  @nn.compact
  def __call__(self, x, *, train: bool = False, temperature=1.0):
    """temperature: the softmax temperature of DyConv/ODConv convs."""
    if self.depth_layers not in STAGE_SIZES:
      raise ValueError(f'ResNet depth must be one of {sorted(STAGE_SIZES)}, '
                       f'got {self.depth_layers}.')
    convs, norms = self.factories()
    x = jnp.asarray(x, self.dtype)
    x = convs(int(64 * self.width), 7, strides=2, name='conv1')(x)
    x = activation_fn(self.activation)(norms(train, 'bn1')(x))
    x = pooling.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    sizes = STAGE_SIZES[self.depth_layers]
    total, index = sum(sizes), 0
    for stage, size in enumerate(sizes, 1):
      for i in range(size):
        x = ResNetBlock(
            int(64 * self.width * 2 ** (stage - 1)),
            strides=2 if i == 0 and stage > 1 else 1,
            bottleneck=self.depth_layers >= 50,
            conditional=stage in self.condconv_stages, convs=convs,
            norms=norms, activation=self.activation,
            drop_path_rate=self.drop_path_rate * index / total,
            conditional_shortcut=self.condconv_shortcut,
            name=f'layer{stage}_{i}')(x, train=train, temperature=temperature)
        index += 1
    return Classifier(self.num_classes, convs, self.condconv_classifier,
                      self.dropout_rate, name='classifier')(
                          x, train=train, temperature=temperature)
