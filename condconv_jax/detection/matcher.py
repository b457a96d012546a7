"""Argmax matching of anchors to ground truth, and the per-anchor training
targets, for ground truth padded to a fixed count with a mask.

Semantics of the TF Object Detection API's `matchers/argmax_matcher.py`
(configured by `samples/configs/ssd_mobilenet_v1_coco.config`: matched and
unmatched thresholds 0.5, negatives_lower_than_unmatched, force match),
IoU similarity (`core/region_similarity_calculator.py`), and the target
assigner (`core/target_assigner.py`): each anchor takes the ground-truth box
of highest IoU (the first on ties); IoU >= matched_threshold is a match,
IoU < unmatched_threshold a negative, in between ignored. Then every real
ground-truth box is forced onto its best anchor (the first anchor on ties);
where several boxes force the same anchor, the first box wins. Padded boxes
(mask False) take part in nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from condconv_jax.detection.box_coder import TF_SCALE_FACTORS, encode_boxes
from condconv_jax.detection.boxes import check_boxes, iou

UNMATCHED = -1
IGNORED = -2


def argmax_match(similarity, valid, matched_threshold: float = 0.5,
                 unmatched_threshold: float = 0.5, force_match: bool = True):
  """similarity: [G, A] (rows ground truth, columns anchors); valid: [G]
  bool. -> match [A] int32: the matched row, UNMATCHED (-1) or IGNORED (-2).
  """
  if unmatched_threshold > matched_threshold:
    raise ValueError(f'unmatched_threshold ({unmatched_threshold}) must be <= '
                     f'matched_threshold ({matched_threshold}).')
  if similarity.ndim != 2 or valid.shape != similarity.shape[:1]:
    raise ValueError(f'similarity must be [G, A] and valid [G], got '
                     f'{similarity.shape} and {valid.shape}.')
  num_gt, num_anchors = similarity.shape
  if num_gt == 0:
    return jnp.full((num_anchors,), UNMATCHED, jnp.int32)
  valid = jnp.asarray(valid, bool)
  # Padded rows sit below every IoU, so they never win a column; with no
  # real row at all every anchor falls below the thresholds (unmatched).
  sim = jnp.where(valid[:, None], similarity, -1.0)
  best_row = jnp.argmax(sim, axis=0).astype(jnp.int32)
  best = jnp.max(sim, axis=0)
  match = jnp.where(best >= matched_threshold, best_row,
                    jnp.where(best < unmatched_threshold, UNMATCHED, IGNORED))
  if not force_match:
    return match.astype(jnp.int32)
  best_col = jnp.argmax(sim, axis=1)  # [G]
  forces = valid[:, None] & (best_col[:, None] == jnp.arange(num_anchors))
  forced_row = jnp.argmax(forces, axis=0).astype(jnp.int32)  # first True
  return jnp.where(forces.any(axis=0), forced_row, match).astype(jnp.int32)


class Targets(NamedTuple):
  """Per-anchor training targets for a batch (A anchors).

  match: [B, A] int32, the matched ground-truth index, -1 unmatched, -2
    ignored. labels: [B, A] int32 class column (0 = background for every
    anchor that is not positive). box_targets: [B, A, 4] encoded boxes
    (zeros where not positive). positive, negative: [B, A] bool.
  """
  match: jax.Array
  labels: jax.Array
  box_targets: jax.Array
  positive: jax.Array
  negative: jax.Array


def check_ground_truth(anchors, gt_boxes, gt_labels, gt_mask):
  """Static shape checks shared by the target assigner and the loss."""
  check_boxes(anchors, 'anchors', rank=2)
  check_boxes(gt_boxes, 'gt_boxes', rank=3)
  if (gt_labels.shape != gt_boxes.shape[:2] or
      gt_mask.shape != gt_boxes.shape[:2]):
    raise ValueError(f'gt_labels and gt_mask must be [batch, max_boxes] = '
                     f'{gt_boxes.shape[:2]} like gt_boxes; got gt_labels '
                     f'{gt_labels.shape} and gt_mask {gt_mask.shape}.')
  if not jnp.issubdtype(gt_labels.dtype, jnp.integer):
    raise ValueError(f'gt_labels must be integers, got {gt_labels.dtype}.')


def assign_targets(anchors, gt_boxes, gt_labels, gt_mask, *,
                   matched_threshold: float = 0.5,
                   unmatched_threshold: float = 0.5, force_match: bool = True,
                   scale_factors=TF_SCALE_FACTORS) -> Targets:
  """anchors [A, 4]; gt_boxes [B, G, 4]; gt_labels [B, G] int (1 ..
  num_classes - 1); gt_mask [B, G] bool (False = padding) -> Targets."""
  gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
  gt_labels = jnp.asarray(gt_labels)
  gt_mask = jnp.asarray(gt_mask)
  anchors = jnp.asarray(anchors, jnp.float32)
  check_ground_truth(anchors, gt_boxes, gt_labels, gt_mask)

  def one_image(boxes, labels, mask):
    match = argmax_match(iou(boxes, anchors), mask.astype(bool),
                         matched_threshold, unmatched_threshold, force_match)
    positive = match >= 0
    index = jnp.maximum(match, 0)
    if boxes.shape[0]:
      matched_boxes = boxes[index]
      matched_labels = labels[index]
    else:  # no ground-truth slots at all: nothing can match
      matched_boxes = jnp.zeros_like(anchors)
      matched_labels = jnp.zeros(anchors.shape[:1], jnp.int32)
    codes = encode_boxes(matched_boxes, anchors, scale_factors)
    return Targets(match=match,
                   labels=jnp.where(positive, matched_labels, 0).astype(
                       jnp.int32),
                   box_targets=jnp.where(positive[:, None], codes, 0.0),
                   positive=positive, negative=match == UNMATCHED)

  return jax.vmap(one_image)(gt_boxes, gt_labels, gt_mask)
