"""SSD anchors, as the TF Object Detection API's `create_ssd_anchors` makes
them (`anchor_generators/multiple_grid_anchor_generator.py`, tiled by
`anchor_generators/grid_anchor_generator.py` `tile_anchors`).

Per feature map i of L (finest first), scale s_i = min_scale + (max_scale -
min_scale) * i / (L - 1), and s_L = 1.0. Layer 0 (with
reduce_boxes_in_lowest_layer) gets the three boxes (0.1, 1.0), (s_0, 2.0),
(s_0, 0.5); every other layer gets (s_i, a) for each aspect ratio a, then
(sqrt(s_i s_{i+1}), interpolated_scale_aspect_ratio) unless that ratio is 0.
A box (s, a) has height s / sqrt(a) * base_h and width s * sqrt(a) * base_w,
where the base size [1, 1] is rescaled by min(H, W) / H and min(H, W) / W so
that aspect 1 stays square on non-square images. Centers are
((y + 0.5) / grid_h, (x + 0.5) / grid_w); the order is (y, x, box) with the
box fastest, feature maps concatenated finest first. Anchors are not
clipped: `create_ssd_anchors` passes no clip window.

The aspect ratios default to `samples/configs/ssd_mobilenet_v1_coco.config`'s
(1.0, 2.0, 0.5, 3.0, 0.3333): the config writes 0.3333, not 1/3, and that is
what the TF model was trained with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# ssd_mobilenet_v1_coco.config, ssd_anchor_generator.aspect_ratios.
TF_ASPECT_RATIOS = (1.0, 2.0, 0.5, 3.0, 0.3333)
# Output strides of the MobileNetV1 SSD feature maps: Conv2d_11_pointwise
# (16), Conv2d_13_pointwise (32), then four stride-2 extra layers
# (models/ssd_mobilenet_v1_feature_extractor.py).
SSD_MOBILENET_V1_STRIDES = (16, 32, 64, 128, 256, 512)


def image_hw(image_size) -> tuple[int, int]:
  """An int or an (height, width) pair -> (height, width)."""
  if isinstance(image_size, (int, np.integer)):
    image_size = (image_size, image_size)
  image_size = tuple(int(s) for s in image_size)
  if len(image_size) != 2 or min(image_size) < 1:
    raise ValueError(f'image_size must be a positive int or a (height, width) '
                     f'pair, got {image_size!r}.')
  return image_size


def anchor_box_specs(num_layers: int = 6, min_scale: float = 0.2,
                     max_scale: float = 0.95,
                     scales: Sequence[float] | None = None,
                     aspect_ratios: Sequence[float] = TF_ASPECT_RATIOS,
                     interpolated_scale_aspect_ratio: float = 1.0,
                     reduce_boxes_in_lowest_layer: bool = True):
  """The (scale, aspect ratio) pairs of each layer, `create_ssd_anchors`'s
  `box_specs_list`.

  scales: explicit per-layer scales (then min_scale/max_scale are unused and
  num_layers must equal len(scales)). Returns a tuple (one per layer) of
  tuples of (scale, aspect_ratio).
  """
  if scales:
    scales = [float(s) for s in scales]
    if len(scales) != num_layers:
      raise ValueError(f'scales has {len(scales)} entries but num_layers is '
                       f'{num_layers}; give one scale per feature map.')
  else:
    if num_layers < 2:
      raise ValueError(f'num_layers must be >= 2 to interpolate scales from '
                       f'min_scale to max_scale, got {num_layers}; pass '
                       f'`scales` for a single layer.')
    if not 0 < min_scale <= max_scale:
      raise ValueError(f'need 0 < min_scale <= max_scale, got {min_scale}, '
                       f'{max_scale}.')
    scales = [min_scale + (max_scale - min_scale) * i / (num_layers - 1)
              for i in range(num_layers)]
  if min(scales) <= 0:
    raise ValueError(f'anchor scales must be positive, got {scales}.')
  if not aspect_ratios or min(aspect_ratios) <= 0:
    raise ValueError(f'aspect_ratios must be positive, got {aspect_ratios}.')
  scales = scales + [1.0]  # only ever used as the last layer's s_next
  specs = []
  for layer, (scale, scale_next) in enumerate(zip(scales[:-1], scales[1:])):
    if layer == 0 and reduce_boxes_in_lowest_layer:
      layer_specs = [(0.1, 1.0), (scale, 2.0), (scale, 0.5)]
    else:
      layer_specs = [(scale, float(a)) for a in aspect_ratios]
      if interpolated_scale_aspect_ratio > 0:
        layer_specs.append((math.sqrt(scale * scale_next),
                            float(interpolated_scale_aspect_ratio)))
    specs.append(tuple(layer_specs))
  return tuple(specs)


def num_anchors_per_location(**spec_kwargs) -> tuple[int, ...]:
  """Boxes per feature-map cell, per layer (same arguments as
  anchor_box_specs)."""
  return tuple(len(s) for s in anchor_box_specs(**spec_kwargs))


def feature_map_sizes(image_size, strides=SSD_MOBILENET_V1_STRIDES):
  """(height, width) of each feature map: ceil(size / stride), what a chain
  of stride-2 'SAME' convs gives. image_size: int or (height, width)."""
  height, width = image_hw(image_size)
  return tuple((-(-height // s), -(-width // s)) for s in strides)


def ssd_anchors(image_size, sizes=None, *, min_scale: float = 0.2,
                max_scale: float = 0.95,
                scales: Sequence[float] | None = None,
                aspect_ratios: Sequence[float] = TF_ASPECT_RATIOS,
                interpolated_scale_aspect_ratio: float = 1.0,
                reduce_boxes_in_lowest_layer: bool = True) -> np.ndarray:
  """All anchors of an SSD on `image_size`: [A, 4] float32 normalized
  [ymin, xmin, ymax, xmax]. 1917 at 300x300 with the defaults.

  image_size: int or (height, width). sizes: the feature maps' (height,
  width), finest first; default the MobileNetV1 SSD's (strides 16 .. 512,
  `feature_map_sizes`). The number of layers is len(sizes). Computed in
  float64 on the host and rounded once (TF computes in float32).
  """
  height, width = image_hw(image_size)
  if sizes is None:
    sizes = feature_map_sizes((height, width))
  sizes = [tuple(int(v) for v in s) for s in sizes]
  if any(len(s) != 2 or min(s) < 1 for s in sizes):
    raise ValueError(f'feature map sizes must be positive (height, width) '
                     f'pairs, got {sizes}.')
  specs = anchor_box_specs(
      num_layers=len(sizes), min_scale=min_scale, max_scale=max_scale,
      scales=scales, aspect_ratios=aspect_ratios,
      interpolated_scale_aspect_ratio=interpolated_scale_aspect_ratio,
      reduce_boxes_in_lowest_layer=reduce_boxes_in_lowest_layer)
  short = min(height, width)
  base_h, base_w = short / height, short / width
  layers = []
  for (grid_h, grid_w), layer_specs in zip(sizes, specs):
    box_scales, ratios = np.asarray(layer_specs, np.float64).T
    box_h = box_scales / np.sqrt(ratios) * base_h  # [n]
    box_w = box_scales * np.sqrt(ratios) * base_w
    cy = (np.arange(grid_h) + 0.5) / grid_h
    cx = (np.arange(grid_w) + 0.5) / grid_w
    cy, cx, bh = np.broadcast_arrays(cy[:, None, None], cx[None, :, None],
                                     box_h[None, None, :])
    bw = np.broadcast_to(box_w[None, None, :], bh.shape)
    layers.append(np.stack([cy - bh / 2, cx - bw / 2, cy + bh / 2,
                            cx + bw / 2], axis=-1).reshape(-1, 4))
  return np.concatenate(layers).astype(np.float32)
