"""Box precision and recall as deepforest reports them (NumPy, host).

deepforest 2.1.0 `evaluate.evaluate_boxes` with `IoU.match_polygons`: per
image, the predictions over a score threshold are matched one-to-one to the
ground truth by a linear sum assignment that maximizes the total
intersection area; a matched pair is a true positive when its IoU exceeds
the IoU threshold (0.4, strictly). Recall is true positives / ground truth,
precision true positives / predictions, each per image and then averaged
over the images with ground truth; an image without predictions has recall
0 and no precision (left out of the precision mean).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

IOU_THRESHOLD = 0.4  # deepforest's default (evaluate_boxes, config.yaml)
# Score thresholds of the precision-recall curve.
THRESHOLDS = np.round(np.arange(0.02, 1.0, 0.02), 2)


def _intersection_union(a, b):
  """[N, 4] x [M, 4] boxes (any consistent units) -> intersection [N, M]
  and union [N, M] areas."""
  a = np.asarray(a, np.float64)[:, None]
  b = np.asarray(b, np.float64)[None]
  height = np.clip(np.minimum(a[..., 2], b[..., 2]) -
                   np.maximum(a[..., 0], b[..., 0]), 0, None)
  width = np.clip(np.minimum(a[..., 3], b[..., 3]) -
                  np.maximum(a[..., 1], b[..., 1]), 0, None)
  inter = height * width
  area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
  area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
  return inter, area_a + area_b - inter


def true_positives(gt_boxes, boxes, iou_threshold: float = IOU_THRESHOLD):
  """Matched pairs of one image whose IoU exceeds iou_threshold: the count
  of true positives. Boxes [N, 4] and [M, 4] [ymin, xmin, ymax, xmax]."""
  if len(gt_boxes) == 0 or len(boxes) == 0:
    return 0
  inter, union = _intersection_union(gt_boxes, boxes)
  rows, cols = linear_sum_assignment(inter, maximize=True)
  iou = np.divide(inter[rows, cols], union[rows, cols],
                  out=np.zeros(len(rows)), where=union[rows, cols] > 0)
  return int(np.sum(iou > iou_threshold))


def precision_recall(images, score_threshold: float,
                     iou_threshold: float = IOU_THRESHOLD):
  """(box precision, box recall) over images [(gt_boxes [G, 4], boxes
  [D, 4], scores [D])] for the detections with score >= score_threshold;
  precision is NaN when no image has a prediction."""
  precisions, recalls = [], []
  for gt_boxes, boxes, scores in images:
    if len(gt_boxes) == 0:
      continue  # deepforest iterates over the ground truth's images
    kept = np.asarray(boxes)[np.asarray(scores) >= score_threshold]
    if len(kept) == 0:
      recalls.append(0.0)
      continue
    hits = true_positives(gt_boxes, kept, iou_threshold)
    recalls.append(hits / len(gt_boxes))
    precisions.append(hits / len(kept))
  precision = float(np.mean(precisions)) if precisions else float('nan')
  recall = float(np.mean(recalls)) if recalls else float('nan')
  return precision, recall


def curve(images, thresholds=THRESHOLDS, iou_threshold: float = IOU_THRESHOLD):
  """{'threshold', 'precision', 'recall', 'f1'}: arrays over the score
  thresholds (precision NaN where nothing is kept, F1 0 there)."""
  pairs = np.array([precision_recall(images, t, iou_threshold)
                    for t in thresholds]).reshape(-1, 2)
  precision, recall = pairs[:, 0], pairs[:, 1]
  total = precision + recall
  f1 = np.where(np.isfinite(precision) & (total > 0),
                2 * precision * recall / np.where(total > 0, total, 1), 0.0)
  return {'threshold': np.asarray(thresholds, np.float64),
          'precision': precision, 'recall': recall, 'f1': f1}


def best_f1_threshold(pr_curve) -> float:
  """The score threshold of the curve's highest F1 (the lowest such)."""
  return float(pr_curve['threshold'][int(np.argmax(pr_curve['f1']))])
