"""COCO box metrics with pycocotools, the maintained reference
implementation (cocodataset/cocoapi), on the host.

`CocoEvaluator` collects fetched global batches of detections and padded
ground truth, converts them to COCO's JSON layout (boxes [x, y, width,
height] in pixels of each image's original size, since COCO's metrics and
its small/medium/large split, by annotation area, are in pixels) and runs
`COCOeval(..., 'bbox')`. `evaluate` is the JSON-level function it uses.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence

import numpy as np
from absl import logging

# COCOeval.stats, in its order: AP over IoU .50:.05:.95, at .50, at .75, for
# small / medium / large objects; AR given 1, 10, 100 detections per image,
# and for small / medium / large objects (100 detections).
METRICS = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10',
              'AR100', 'ARs', 'ARm', 'ARl')
GT_KEYS = ('gt_boxes', 'gt_labels', 'gt_mask', 'gt_area', 'gt_crowd')
DETECTION_KEYS = ('boxes', 'scores', 'classes', 'count')
IMAGE_KEYS = ('mask', 'image_id', 'image_size')


def evaluate(ground_truth: dict, detections: Sequence[dict]) -> dict:
  """COCO box metrics of detections against ground truth, both in COCO's
  JSON layout.

  ground_truth: {'images': [{'id', 'height', 'width'}], 'annotations':
    [{'id' (> 0: COCOeval treats id 0 as unmatched), 'image_id',
    'category_id', 'bbox' [x, y, w, h] pixels, 'area', 'iscrowd'}],
    'categories': [{'id'}]}. Every listed image is evaluated, with or
    without annotations.
  detections: [{'image_id', 'category_id', 'bbox' [x, y, w, h], 'score'}].
  Returns {name: float} for METRICS, in [0, 1] or -1 where COCOeval has
  no ground truth to score (e.g. no small objects), and 'count' (images).
  """
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
  from pycocotools.cocoeval import COCOeval  # pylint: disable=g-import-not-at-top
  printed = io.StringIO()
  # pycocotools reports progress with print(); the summary table is logged.
  with contextlib.redirect_stdout(printed):
    gt = COCO()
    gt.dataset = copy.deepcopy(dict(ground_truth))
    gt.createIndex()
    if detections:
      # loadRes writes ids, areas and segmentations into the dicts it gets.
      dt = gt.loadRes(copy.deepcopy(list(detections)))
    else:
      # loadRes cannot take an empty list; no detections is a valid result
      # (AP 0 wherever there is ground truth), so build it directly.
      dt = COCO()
      dt.dataset = {'images': list(gt.dataset['images']),
                    'categories': list(gt.dataset['categories']),
                    'annotations': []}
      dt.createIndex()
    coco_eval = COCOeval(gt, dt, 'bbox')
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
  logging.info('COCOeval:\n%s', printed.getvalue())
  stats = {name: float(v) for name, v in zip(METRICS, coco_eval.stats)}
  stats['count'] = len(gt.dataset['images'])
  return stats


def _pixel_boxes(boxes, height, width):
  """Normalized [K, 4] [ymin, xmin, ymax, xmax] -> COCO [K, 4] [x, y, w, h]
  pixels of a height x width image."""
  boxes = np.asarray(boxes, np.float64)
  return np.stack([boxes[:, 1] * width, boxes[:, 0] * height,
                   (boxes[:, 3] - boxes[:, 1]) * width,
                   (boxes[:, 2] - boxes[:, 0]) * height], axis=1)


class CocoEvaluator:
  """Accumulates evaluation batches and scores them with pycocotools.

  category_ids: the categories COCOeval averages over (COCO: the 80 ids,
    `coco.COCO_CATEGORY_IDS`); None takes those seen in ground truth or
    detections, which gives the same numbers (a category without ground
    truth scores -1 and is left out of the means; detections of a category
    not listed are not scored).
  """

  def __init__(self, category_ids: Sequence[int] | None = None):
    self.category_ids = (None if category_ids is None else
                         sorted(int(c) for c in category_ids))
    self._images = {}  # image_id -> (height, width)
    self._gt = []  # [K, 8]: image_id, x, y, w, h, area, iscrowd, category
    self._dt = []  # [K, 7]: image_id, x, y, w, h, score, category

  def add(self, outputs: dict):
    """outputs: NumPy arrays of one global batch of B images, D detections
    and G ground-truth slots: detections 'boxes' [B, D, 4] normalized
    [ymin, xmin, ymax, xmax], 'scores' [B, D], 'classes' [B, D] (category
    ids), 'count' [B] (valid detections, first in each row); images 'mask'
    [B] (False = padding, skipped), 'image_id' [B], 'image_size' [B, 2]
    (original height, width in pixels); ground truth 'gt_boxes' [B, G, 4]
    normalized, 'gt_labels' [B, G], 'gt_mask' [B, G], 'gt_area' [B, G]
    (COCO annotation area, pixels), 'gt_crowd' [B, G]."""
    missing = [k for k in (*DETECTION_KEYS, *IMAGE_KEYS, *GT_KEYS)
               if k not in outputs]
    if missing:
      raise KeyError(f'CocoEvaluator.add needs {missing} (has '
                     f'{sorted(outputs)}).')
    out = {k: np.asarray(v) for k, v in outputs.items()}
    for b in np.flatnonzero(out['mask'].astype(bool)):
      image_id = int(out['image_id'][b])
      if image_id in self._images:
        raise ValueError(f'image_id {image_id} was added twice: the '
                         'evaluation batches repeat an image (shards or '
                         'padding overlap), which would count it twice.')
      height, width = (float(v) for v in out['image_size'][b])
      self._images[image_id] = (height, width)
      real = out['gt_mask'][b].astype(bool)
      self._gt.append(np.column_stack([
          np.full(real.sum(), image_id),
          _pixel_boxes(out['gt_boxes'][b][real], height, width),
          out['gt_area'][b][real], out['gt_crowd'][b][real],
          out['gt_labels'][b][real]]).astype(np.float64))
      count = int(out['count'][b])
      self._dt.append(np.column_stack([
          np.full(count, image_id),
          _pixel_boxes(out['boxes'][b][:count], height, width),
          out['scores'][b][:count],
          out['classes'][b][:count]]).astype(np.float64))

  def coco_json(self):
    """(ground_truth dict, detections list) in COCO's JSON layout, for
    `evaluate` or for writing files."""
    gt = np.concatenate(self._gt) if self._gt else np.zeros((0, 8))
    dt = np.concatenate(self._dt) if self._dt else np.zeros((0, 7))
    if self.category_ids is None:
      categories = sorted({int(c) for c in gt[:, 7]} |
                          {int(c) for c in dt[:, 6]})
    else:
      categories = self.category_ids
      unknown = sorted({int(c) for c in gt[:, 7]} - set(categories))
      if unknown:
        raise ValueError(f'ground-truth labels {unknown} are not among the '
                         f'category_ids {categories}: COCOeval would ignore '
                         'them.')
    ground_truth = {
        'images': [{'id': i, 'height': h, 'width': w}
                   for i, (h, w) in self._images.items()],
        'annotations': [
            {'id': n + 1, 'image_id': int(row[0]), 'bbox': row[1:5].tolist(),
             'area': float(row[5]), 'iscrowd': int(row[6]),
             'category_id': int(row[7])} for n, row in enumerate(gt)],
        'categories': [{'id': c} for c in categories]}
    detections = [{'image_id': int(row[0]), 'bbox': row[1:5].tolist(),
                   'score': float(row[5]), 'category_id': int(row[6])}
                  for row in dt]
    return ground_truth, detections

  def result(self) -> dict:
    """METRICS -> float (-1 where COCOeval has nothing to score), and
    'count', the number of images evaluated."""
    if not self._images:
      raise ValueError('CocoEvaluator.result: no images were added (every '
                       'row of every batch was masked out).')
    return evaluate(*self.coco_json())
