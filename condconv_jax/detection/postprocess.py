"""From the model's raw per-anchor outputs to detections, under jit.

TF Object Detection API `meta_architectures/ssd_meta_arch.py` `postprocess`
and `core/post_processing.py`, configured by
`samples/configs/ssd_mobilenet_v1_coco.config` (score converter SIGMOID,
score threshold 1e-8, IoU 0.6, 100 per class, 100 in total): decode the
boxes against the anchors, convert the logits to scores and drop the
background column 0, run per-class NMS on the unclipped boxes, keep the 100
best, clip them to the image. TF also drops, after NMS, boxes whose clipped
area is 0 (boxes wholly outside the image); here they are dropped before
NMS, so they suppress nothing: an SSD decodes such boxes only from absurd
offsets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from condconv_jax.detection.box_coder import TF_SCALE_FACTORS, decode_boxes
from condconv_jax.detection.boxes import area, check_boxes, clip_boxes
from condconv_jax.detection.nms import multiclass_non_max_suppression

SCORE_CONVERTERS = ('sigmoid', 'softmax')


def postprocess(outputs, anchors, *, score_threshold: float = 1e-8,
                iou_threshold: float = 0.6, max_detections: int = 100,
                score_converter: str = 'sigmoid',
                scale_factors=TF_SCALE_FACTORS):
  """outputs: the model's {'box_offsets': [B, A, 4], 'class_logits':
  [B, A, C]}; anchors: [A, 4].

  Returns a dict of fixed shapes, detections in decreasing score order:
  boxes [B, D, 4] normalized [ymin, xmin, ymax, xmax] clipped to [0, 1],
  scores [B, D] float32, classes [B, D] int32 (class columns 1 .. C - 1,
  the ground-truth label convention), count [B] int32; entries at and after
  count are zero boxes, score 0, class 0. D = max_detections.
  """
  if score_converter not in SCORE_CONVERTERS:
    raise ValueError(f'score_converter must be one of {SCORE_CONVERTERS}, got '
                     f'{score_converter!r}.')
  box_offsets = jnp.asarray(outputs['box_offsets'], jnp.float32)
  logits = jnp.asarray(outputs['class_logits'], jnp.float32)
  check_boxes(anchors, 'anchors', rank=2)
  if (logits.ndim != 3 or logits.shape[-1] < 2 or
      box_offsets.shape != (*logits.shape[:2], 4) or
      anchors.shape[0] != logits.shape[1]):
    raise ValueError(f'expected class_logits [B, A, C >= 2], box_offsets '
                     f'[B, A, 4] and anchors [A, 4]; got {logits.shape}, '
                     f'{box_offsets.shape} and {anchors.shape}.')
  boxes = decode_boxes(box_offsets, jnp.asarray(anchors, jnp.float32)[None],
                       scale_factors)
  if score_converter == 'sigmoid':
    scores = jax.nn.sigmoid(logits)
  else:
    scores = jax.nn.softmax(logits, axis=-1)
  scores = scores[..., 1:]
  inside = area(clip_boxes(boxes)) > 0
  scores = jnp.where(inside[..., None], scores, -jnp.inf)

  def one_image(image_boxes, image_scores):
    box_idx, cls_idx, det_scores, count = multiclass_non_max_suppression(
        image_boxes, image_scores, max_detections, iou_threshold,
        score_threshold)
    found = box_idx >= 0
    det_boxes = clip_boxes(image_boxes[jnp.maximum(box_idx, 0)])
    return {'boxes': jnp.where(found[:, None], det_boxes, 0.0),
            'scores': det_scores,
            'classes': jnp.where(found, cls_idx + 1, 0).astype(jnp.int32),
            'count': count}

  return jax.vmap(one_image)(boxes, scores)
