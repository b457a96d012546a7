"""The Faster R-CNN box coder SSD uses (TF Object Detection API
`box_coders/faster_rcnn_box_coder.py`, scales from
`samples/configs/ssd_mobilenet_v1_coco.config`).

With (yc, xc, h, w) a box's center and size and (ya, xa, ha, wa) its
anchor's:
  ty = 10 (yc - ya) / ha,  tx = 10 (xc - xa) / wa,
  th = 5 log(h / ha),      tw = 5 log(w / wa).
Encoding adds 1e-8 to every height and width first (TF's EPSILON), so a
degenerate box encodes to a finite code. Decoding bounds th and tw (after
unscaling) at log(1000 / 16), Detectron's and torchvision's bound, a box 62x
its anchor: upstream TF has no bound, and exp() of an unbounded code
overflows float32 areas in NMS; no useful box comes near the bound.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from condconv_jax.detection.boxes import check_boxes

# ssd_mobilenet_v1_coco.config: faster_rcnn_box_coder y, x, height, width.
TF_SCALE_FACTORS = (10.0, 10.0, 5.0, 5.0)
_EPSILON = 1e-8  # faster_rcnn_box_coder.py EPSILON
_MAX_LOG_SIZE = math.log(1000.0 / 16)


def _center_size(boxes):
  height = boxes[..., 2] - boxes[..., 0]
  width = boxes[..., 3] - boxes[..., 1]
  return (boxes[..., 0] + height / 2, boxes[..., 1] + width / 2, height,
          width)


def encode_boxes(boxes, anchors, scale_factors=TF_SCALE_FACTORS):
  """boxes, anchors: [..., 4] (broadcasting) -> codes [..., 4] =
  [ty, tx, th, tw], float32."""
  check_boxes(boxes, 'boxes')
  check_boxes(anchors, 'anchors')
  boxes = jnp.asarray(boxes, jnp.float32)
  anchors = jnp.asarray(anchors, jnp.float32)
  yc, xc, h, w = _center_size(boxes)
  ya, xa, ha, wa = _center_size(anchors)
  ha, wa, h, w = ha + _EPSILON, wa + _EPSILON, h + _EPSILON, w + _EPSILON
  sy, sx, sh, sw = scale_factors
  return jnp.stack([sy * (yc - ya) / ha, sx * (xc - xa) / wa,
                    sh * jnp.log(h / ha), sw * jnp.log(w / wa)], axis=-1)


def decode_boxes(codes, anchors, scale_factors=TF_SCALE_FACTORS):
  """codes [..., 4] = [ty, tx, th, tw], anchors [..., 4] (broadcasting) ->
  boxes [..., 4] [ymin, xmin, ymax, xmax], float32, not clipped."""
  check_boxes(codes, 'codes')
  check_boxes(anchors, 'anchors')
  codes = jnp.asarray(codes, jnp.float32)
  anchors = jnp.asarray(anchors, jnp.float32)
  ya, xa, ha, wa = _center_size(anchors)
  sy, sx, sh, sw = scale_factors
  yc = codes[..., 0] / sy * ha + ya
  xc = codes[..., 1] / sx * wa + xa
  h = jnp.exp(jnp.minimum(codes[..., 2] / sh, _MAX_LOG_SIZE)) * ha
  w = jnp.exp(jnp.minimum(codes[..., 3] / sw, _MAX_LOG_SIZE)) * wa
  return jnp.stack([yc - h / 2, xc - w / 2, yc + h / 2, xc + w / 2], axis=-1)
