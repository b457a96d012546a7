"""Greedy non-maximum suppression with fixed output shapes, jittable.

Greedy NMS keeps the highest-scoring box, removes every box whose IoU with
it exceeds the threshold, and repeats (TF's `tf.image.non_max_suppression`,
torchvision's `nms`: suppression is IoU > threshold, strictly; equal scores
go to the lower index). Here each of `max_outputs` steps is an argmax over
the remaining scores and one row of IoUs, so the work is max_outputs x N
(no N x N IoU matrix) and the shapes never depend on the data.

The multi-class form runs the per-class NMS of TF's
`core/post_processing.py` `multiclass_non_max_suppression` for all classes
at once: a box suppresses only boxes of its own class, and the greedy order
across classes is by score, so its first D outputs are exactly the D
best-scoring survivors of the per-class NMS (TF's per-class cap of
max_detections_per_class = max_total_detections changes nothing then).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from condconv_jax.detection.boxes import area, check_boxes


def _iou_one_to_many(box, boxes):
  """box [4], boxes [N, 4] -> [N] (0 where the intersection is 0)."""
  height = jnp.maximum(jnp.minimum(box[2], boxes[:, 2]) -
                       jnp.maximum(box[0], boxes[:, 0]), 0.0)
  width = jnp.maximum(jnp.minimum(box[3], boxes[:, 3]) -
                      jnp.maximum(box[1], boxes[:, 1]), 0.0)
  intersection = height * width
  union = area(box) + area(boxes) - intersection
  return jnp.where(intersection > 0,
                   intersection / jnp.where(intersection > 0, union, 1.0), 0.0)


def multiclass_non_max_suppression(boxes, scores, max_outputs: int,
                                   iou_threshold: float,
                                   score_threshold: float = -jnp.inf):
  """Per-class greedy NMS over class-agnostic boxes.

  boxes: [N, 4]; scores: [N, K]; a (box, class) pair is a candidate when
  its score > score_threshold (NaN never is). Returns, in decreasing score
  order, box_indices [max_outputs] int32, class_indices [max_outputs] int32,
  scores [max_outputs] float32, and count (int32 scalar): entries at and
  after `count` are -1, -1 and 0.
  """
  check_boxes(boxes, 'boxes', rank=2)
  if scores.ndim != 2 or scores.shape[0] != boxes.shape[0]:
    raise ValueError(f'scores must be [N, num_classes] with N = '
                     f'{boxes.shape[0]} boxes, got shape {scores.shape}.')
  if not isinstance(max_outputs, int) or max_outputs < 0:
    raise ValueError(f'max_outputs must be a static int >= 0, got '
                     f'{max_outputs!r}.')
  num_boxes, num_classes = scores.shape
  empty = (jnp.full((max_outputs,), -1, jnp.int32),
           jnp.full((max_outputs,), -1, jnp.int32),
           jnp.zeros((max_outputs,), jnp.float32), jnp.int32(0))
  if num_boxes == 0 or num_classes == 0:
    return empty
  boxes = jnp.asarray(boxes, jnp.float32)
  scores = jnp.asarray(scores, jnp.float32)
  remaining = jnp.where(scores > score_threshold, scores, -jnp.inf)

  def step(i, state):
    remaining, box_idx, cls_idx, out_scores, count = state
    flat = jnp.argmax(remaining)
    b, c = flat // num_classes, flat % num_classes
    best = remaining[b, c]
    found = best > -jnp.inf
    column = jax.lax.dynamic_index_in_dim(remaining, c, axis=1,
                                          keepdims=False)
    overlaps = _iou_one_to_many(boxes[b], boxes)
    column = jnp.where(overlaps > iou_threshold, -jnp.inf, column)
    column = column.at[b].set(-jnp.inf)
    # Once nothing is found, remaining is all -inf and stays so.
    remaining = jax.lax.dynamic_update_index_in_dim(remaining, column, c,
                                                    axis=1)
    box_idx = box_idx.at[i].set(jnp.where(found, b, -1))
    cls_idx = cls_idx.at[i].set(jnp.where(found, c, -1))
    out_scores = out_scores.at[i].set(jnp.where(found, best, 0.0))
    return remaining, box_idx, cls_idx, out_scores, count + found

  _, box_idx, cls_idx, out_scores, count = jax.lax.fori_loop(
      0, max_outputs, step, (remaining, *empty))
  return box_idx, cls_idx, out_scores, count


def non_max_suppression(boxes, scores, max_outputs: int,
                        iou_threshold: float,
                        score_threshold: float = -jnp.inf):
  """Single-class greedy NMS. boxes [N, 4], scores [N] -> (indices
  [max_outputs] int32 in decreasing score order, -1 after `count`; count,
  int32 scalar). Boxes with score <= score_threshold are never kept."""
  if jnp.ndim(scores) != 1:
    raise ValueError(f'scores must be [N], got shape {jnp.shape(scores)}.')
  indices, _, _, count = multiclass_non_max_suppression(
      boxes, jnp.asarray(scores)[:, None], max_outputs, iou_threshold,
      score_threshold)
  return indices, count
