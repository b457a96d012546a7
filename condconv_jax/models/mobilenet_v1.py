"""MobileNetV1 (Howard et al. 2017): a stem and 13 depthwise-separable layers.

CondConv placement is by separable layer number (1-based, as the CondConv
paper counts them); both the depthwise and the pointwise conv of a chosen
layer become CondConv, each with its own routing function.

With `feature_layers` the same module is a feature extractor (the SSD
detector's backbone): it returns the outputs of those separable layers,
stops after the last of them and builds no classifier, so its parameters
are the classifier's minus 'classifier' and an ImageNet checkpoint loads
as is.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from condconv_jax.models.blocks import (Classifier, ConvNet, activation_fn,
                                        apply_conv)

# (output features, stride) of the 13 separable layers at width 1.0.
SEPARABLE_LAYERS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
                    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1),
                    (1024, 2), (1024, 1))


# A 6-layer variant for 28x28 inputs (Fashion-MNIST): 14x14 after the stem.
MINI_LAYERS = ((32, 1), (64, 2), (64, 1), (128, 2), (128, 1), (128, 1))


class MobileNetV1(ConvNet):
  separable_layers: tuple[tuple[int, int], ...] = SEPARABLE_LAYERS
  stem_features: int = 32
  stem_strides: int = 2
  condconv_layers: tuple[int, ...] = (7, 8, 9, 10, 11, 12, 13)
  condconv_classifier: bool = True
  # Features no narrower than this (TF's mobilenet_v1 min_depth; 0 = none).
  min_depth: int = 0
  # () = classifier; else __call__ returns {layer number: output} of these
  # separable layers (1-based), e.g. (11, 13) = TF's Conv2d_11_pointwise
  # and Conv2d_13_pointwise.
  feature_layers: tuple[int, ...] = ()

  def _depth(self, features: int) -> int:
    return max(int(features * self.width), self.min_depth)

  @nn.compact
  def __call__(self, x, *, train: bool = False, temperature=1.0):
    """x: [B, H, W, C] -> logits [B, num_classes] float32, or with
    feature_layers {layer number: [B, h, w, c]} in the compute dtype.
    temperature: the softmax temperature of DyConv/ODConv convs."""
    num_layers = len(self.separable_layers)
    if any(not 1 <= n <= num_layers for n in self.feature_layers):
      raise ValueError(f'feature_layers must be separable layer numbers in '
                       f'1 .. {num_layers}, got {self.feature_layers}.')
    last = max(self.feature_layers, default=num_layers)
    convs, norms = self.factories()
    act = activation_fn(self.activation)
    x = jnp.asarray(x, self.dtype)
    features = self._depth(self.stem_features)
    x = convs(features, 3, strides=self.stem_strides, name='conv_stem')(x)
    x = act(norms(train, 'bn_stem')(x))
    outputs = {}
    for number, (out, stride) in enumerate(self.separable_layers[:last], 1):
      cond = number in self.condconv_layers
      dw = convs(features, 3, strides=stride, groups=features,
                 conditional=cond, name=f'sep{number}_dw')
      call = lambda conv, h: apply_conv(conv, h, train=train,
                                        temperature=temperature)
      x = act(norms(train, f'sep{number}_dw_bn')(call(dw, x)))
      features = self._depth(out)
      pw = convs(features, 1, conditional=cond, name=f'sep{number}_pw')
      x = act(norms(train, f'sep{number}_pw_bn')(call(pw, x)))
      if number in self.feature_layers:
        outputs[number] = x
    if self.feature_layers:
      return outputs
    return Classifier(self.num_classes, convs, self.condconv_classifier,
                      self.dropout_rate, name='classifier')(
                          x, train=train, temperature=temperature)
