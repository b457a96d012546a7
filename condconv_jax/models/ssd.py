"""MobileNetV1 SSD (the CondConv paper's COCO detector), static or CondConv;
its anchors, losses and post-processing are in condconv_jax.detection.

The TF Object Detection API's ssd_mobilenet_v1_coco:
- `models/ssd_mobilenet_v1_feature_extractor.py`: features
  Conv2d_11_pointwise and Conv2d_13_pointwise of MobileNetV1 (separable
  layers 11 and 13: 19x19x512 and 10x10x1024 at 300x300), then
  `models/feature_map_generators.py` `multi_resolution_feature_maps` with
  layer depths 512, 256, 256, 128, insert_1x1_conv and use_depthwise=False:
  each extra feature map is a 1x1 conv to depth/2 and a plain 3x3 stride-2
  'SAME' conv to depth, each followed by batch norm and ReLU6 (5x5, 3x3,
  2x2, 1x1). Depths are max(int(depth x width), min_depth = 16), backbone
  included (TF's depth_multiplier and min_depth).
- `predictors/convolutional_box_predictor.py` and `predictors/heads/`
  (`box_head.py`, `class_head.py`), `samples/configs/
  ssd_mobilenet_v1_coco.config` (kernel_size 1, no layers before the
  predictor, no dropout): per feature map, one conv to anchors x 4 box
  codes and one to anchors x (90 + 1) class logits, with bias and without
  batch norm or activation; a kernel larger than the feature map shrinks to
  it. Kernels: truncated normal, stddev 0.03 (the config's
  conv_hyperparams); batch norm decay 0.9997, epsilon 1e-3; ReLU6.
  L2 4e-5 on the kernels is the trainer's weight decay, not part of the
  model.

Outputs, raw per anchor (anchors in `ssd_anchors` order): 'box_offsets'
[B, A, 4], the encoded [ty, tx, th, tw] (`box_coder`), and 'class_logits'
[B, A, num_classes], where num_classes counts the background: column 0 is
background, columns 1 .. num_classes - 1 the classes (TF's
class_predictions_with_background; 91 for COCO's 90 category ids, which
are then the column numbers). Both float32 whatever the compute dtype.
Inputs are preprocessed images, 2/255 x - 1 in TF (the data pipeline's
normalization, as for the classifiers).

CondConv (`num_experts` > 0) goes into backbone separable layers
`condconv_layers`, the extra layers (`condconv_extra`) and the box
predictors (`condconv_predictors`), each conv with its own routing function,
through the same ConvFactory as the classifiers. The default, all three
(layers 7-13), is the placement whose cost is the paper's "+4%": at 8
experts its kernel mixing adds 4.2% to the static SSD300's 1237M MADDs
(4.5% with the routing functions), where backbone + extra layers add 3.3%
and backbone + predictors 2.8% (the scan is in docs/detection.md; `python -m
condconv_jax.models --detector`). A predictor's bias stays static (one per output,
not per expert): CondConv mixes kernels, and per-expert biases mixed by
sigmoid routing weights would scale a class bias prior (the focal config's
-4.6) by the sum of the weights, about E/2 at initialization.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from condconv_jax.detection.anchors import (TF_ASPECT_RATIOS,
                                            anchor_box_specs, image_hw,
                                            ssd_anchors)
from condconv_jax.models.blocks import ConvFactory, ConvNet, activation_fn
from condconv_jax.models.blocks import apply_conv
from condconv_jax.models.mobilenet_v1 import SEPARABLE_LAYERS, MobileNetV1


def tf_truncated_normal(stddev: float):
  """TF1's truncated_normal_initializer: normal(0, stddev) redrawn beyond 2
  stddev (JAX's `truncated_normal` rescales to the truncated std instead)."""
  def init(key, shape, dtype=jnp.float32):
    return stddev * jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype)
  return init


# ssd_mobilenet_v1_coco.config: conv_hyperparams initializer.
_KERNEL_INIT = tf_truncated_normal(0.03)


def predictor_kernel_init(stddev: float, truncated: bool):
  """The box predictor's initializer: truncated normal 0.03 in
  ssd_mobilenet_v1_coco.config, random normal 0.01 in
  ssd_mobilenet_v1_300x300_coco14_sync.config."""
  if truncated:
    return tf_truncated_normal(stddev)
  return nn.initializers.normal(stddev)


class BoxPredictor(nn.Module):
  """One feature map's box and class convs -> ([B, h*w*n, 4],
  [B, h*w*n, num_classes]) float32, in (y, x, anchor) order."""

  num_anchors: int
  num_classes: int
  convs: ConvFactory
  conditional: bool = False
  kernel_size: int = 1
  class_bias_init: float = 0.0
  dropout_rate: float = 0.0
  kernel_init: Any = _KERNEL_INIT

  @nn.compact
  def __call__(self, x, *, train: bool):
    batch, height, width, _ = x.shape
    kernel_size = min(self.kernel_size, height, width)
    n = self.num_anchors

    def predict(inputs, features, bias_init, name):
      conv = self.convs(features, kernel_size, conditional=self.conditional,
                        kernel_init=self.kernel_init, name=name)
      y = apply_conv(conv, inputs, train=train).astype(jnp.float32)
      return y + self.param(f'{name}_bias', bias_init, (features,))

    boxes = predict(x, n * 4, nn.initializers.zeros_init(), 'box')
    # TF's use_dropout applies to the class head only (class_head.py).
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    logits = predict(x, n * self.num_classes,
                     nn.initializers.constant(self.class_bias_init), 'class')
    return (boxes.reshape(batch, -1, 4),
            logits.reshape(batch, -1, self.num_classes))


class SSDMobileNetV1(ConvNet):
  """MobileNetV1 SSD; see the module docstring. __call__(images [B, H, W, 3],
  *, train) -> {'box_offsets': [B, A, 4], 'class_logits': [B, A,
  num_classes]}; `anchors(image_size)` gives the matching [A, 4] anchors."""

  num_classes: int = 91  # class columns, background (column 0) included
  activation: str = 'relu6'
  bn_momentum: float = 0.9997
  # dropout_rate: before the class convs (TF's use_dropout; 0 in the
  # config). drop_path_rate: unused (no residual blocks).
  min_depth: int = 16
  # Backbone separable layers whose outputs are the first feature maps.
  source_layers: tuple[int, ...] = (11, 13)
  # One extra feature map per entry (1x1 to depth/2, 3x3 stride 2 to depth).
  extra_depths: tuple[int, ...] = (512, 256, 256, 128)
  condconv_layers: tuple[int, ...] = (7, 8, 9, 10, 11, 12, 13)
  condconv_extra: bool = True
  condconv_predictors: bool = True
  predictor_kernel_size: int = 1
  class_bias_init: float = 0.0  # -4.6 in the focal (TPU) config
  predictor_init_stddev: float = 0.03  # 0.01 in the TPU config
  predictor_init_truncated: bool = True  # False (normal) in the TPU config
  # Anchors (create_ssd_anchors; ssd_mobilenet_v1_coco.config defaults).
  min_scale: float = 0.2
  max_scale: float = 0.95
  anchor_scales: tuple[float, ...] | None = None
  aspect_ratios: tuple[float, ...] = TF_ASPECT_RATIOS
  interpolated_scale_aspect_ratio: float = 1.0
  reduce_boxes_in_lowest_layer: bool = True

  def _anchor_kwargs(self) -> dict:
    return dict(min_scale=self.min_scale, max_scale=self.max_scale,
                scales=self.anchor_scales, aspect_ratios=self.aspect_ratios,
                interpolated_scale_aspect_ratio=(
                    self.interpolated_scale_aspect_ratio),
                reduce_boxes_in_lowest_layer=self.reduce_boxes_in_lowest_layer)

  def num_anchors_per_location(self) -> tuple[int, ...]:
    num_layers = len(self.source_layers) + len(self.extra_depths)
    return tuple(len(s) for s in anchor_box_specs(num_layers,
                                                  **self._anchor_kwargs()))

  def feature_strides(self) -> tuple[int, ...]:
    """Output stride of each feature map (16, 32, 64, ... by default)."""
    def stride(layer):
      return 2 * math.prod(s for _, s in SEPARABLE_LAYERS[:layer])
    strides = [stride(layer) for layer in self.source_layers]
    for _ in self.extra_depths:
      strides.append(strides[-1] * 2)
    return tuple(strides)

  def feature_map_sizes(self, image_size) -> tuple[tuple[int, int], ...]:
    """(height, width) of each feature map for an int or (H, W) input:
    ceil(size / stride), what 'SAME' convs give."""
    height, width = image_hw(image_size)
    return tuple((-(-height // s), -(-width // s))
                 for s in self.feature_strides())

  def anchors(self, image_size):
    """The anchors [A, 4] (float32 NumPy) matching this model's outputs on
    `image_size` (int or (height, width)); 1917 at 300."""
    return ssd_anchors(image_size, self.feature_map_sizes(image_size),
                       **self._anchor_kwargs())

  def _depth(self, depth: float) -> int:
    return max(int(depth * self.width), self.min_depth)

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    if self.num_classes < 2:
      raise ValueError(f'num_classes counts the background column and must '
                       f'be >= 2, got {self.num_classes}.')
    if x.ndim != 4:
      raise ValueError(f'images must be [batch, height, width, channels], '
                       f'got shape {x.shape}.')
    if self.conv_family != 'condconv':
      raise ValueError(f'the SSD detector takes CondConv only; conv_family '
                       f'{self.conv_family!r} is for the classifiers '
                       f'(dy_*/od_* models, mobilenet_v1_mini).')
    if not self.source_layers or list(self.source_layers) != sorted(
        set(self.source_layers)):
      raise ValueError(f'source_layers must be increasing separable layer '
                       f'numbers, got {self.source_layers}.')
    convs, norms = self.factories()
    act = activation_fn(self.activation)
    backbone = MobileNetV1(
        width=self.width, num_experts=self.num_experts,
        activation=self.activation, bn_momentum=self.bn_momentum,
        bn_epsilon=self.bn_epsilon, padding=self.padding, dtype=self.dtype,
        strategy=self.strategy, routing_dropout=self.routing_dropout,
        condconv_layers=self.condconv_layers, condconv_classifier=False,
        min_depth=self.min_depth, feature_layers=self.source_layers,
        name='backbone')
    by_layer = backbone(x, train=train)
    feature_maps = [by_layer[layer] for layer in self.source_layers]
    y = feature_maps[-1]
    for i, depth in enumerate(self.extra_depths, 1):
      for suffix, features, kernel, stride in (
          ('1x1', self._depth(depth / 2), 1, 1),
          ('3x3', self._depth(depth), 3, 2)):
        conv = convs(features, kernel, strides=stride,
                     conditional=self.condconv_extra,
                     kernel_init=_KERNEL_INIT, name=f'extra{i}_{suffix}')
        y = apply_conv(conv, y, train=train)
        y = act(norms(train, f'extra{i}_{suffix}_bn')(y))
      feature_maps.append(y)
    self.sow('intermediates', 'feature_maps', tuple(feature_maps))

    boxes, logits = [], []
    for i, (fmap, n) in enumerate(zip(feature_maps,
                                      self.num_anchors_per_location())):
      b, c = BoxPredictor(n, self.num_classes, convs,
                          self.condconv_predictors, self.predictor_kernel_size,
                          self.class_bias_init, self.dropout_rate,
                          predictor_kernel_init(
                              self.predictor_init_stddev,
                              self.predictor_init_truncated),
                          name=f'box_predictor_{i}')(fmap, train=train)
      boxes.append(b)
      logits.append(c)
    return {'box_offsets': jnp.concatenate(boxes, axis=1),
            'class_logits': jnp.concatenate(logits, axis=1)}
