"""The seam between the one training loop and what is being learned.

A task says, for its model's outputs on a batch:
  loss(outputs, batch) -> (scalar loss, {metric: scalar})   inside jit
  eval_outputs(outputs, batch) -> pytree of arrays          inside jit
  evaluator() -> an object with add(fetched eval_outputs) and result() ->
      {metric: float}, run on the host over the whole evaluation split.
The loop (mesh sharding, EMA, checkpoints, preemption, logging) never forks
on the task. Batches carry 'mask' at evaluation (False = padding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from condconv_jax.detection import box_match, postprocess, tiles
from condconv_jax.training.coco_eval import GT_KEYS, METRICS, CocoEvaluator


class Classification:
  """Softmax cross-entropy (optionally label-smoothed) and top-1 accuracy."""

  def __init__(self, num_classes: int, label_smoothing: float = 0.0):
    self.num_classes = num_classes
    self.label_smoothing = label_smoothing

  def _cross_entropy(self, logits, labels, smoothing):
    targets = jax.nn.one_hot(labels, self.num_classes)
    if smoothing:
      targets = optax.smooth_labels(targets, smoothing)
    return optax.softmax_cross_entropy(logits, targets)

  def loss(self, logits, batch):
    labels = batch['label']
    loss = self._cross_entropy(logits, labels, self.label_smoothing).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, {'accuracy': accuracy}

  def eval_outputs(self, logits, batch):
    """Sums over the real (unmasked) examples: the loss without smoothing."""
    mask = batch['mask'].astype(jnp.float32)
    loss = self._cross_entropy(logits, batch['label'], 0.0)
    correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
    return {'loss': jnp.sum(loss * mask), 'correct': jnp.sum(correct * mask),
            'count': jnp.sum(mask)}

  def evaluator(self):
    return _SumEvaluator()


class _SumEvaluator:

  def __init__(self):
    self.totals = {'loss': 0.0, 'correct': 0.0, 'count': 0.0}

  def add(self, sums):
    for k in self.totals:
      self.totals[k] += float(np.asarray(sums[k]))

  def result(self) -> dict:
    count = max(self.totals['count'], 1.0)
    return {'accuracy': self.totals['correct'] / count,
            'loss': self.totals['loss'] / count,
            'count': self.totals['count']}


class Detection:
  """SSD: the SSD loss against anchors, and COCO metrics (pycocotools) with
  deepforest's box precision and recall over the post-processed detections
  of the whole evaluation split.

  Batches carry ground truth padded to G boxes: 'boxes' [b, G, 4]
  normalized, 'labels' [b, G] (the model's class columns, 1 ..
  num_classes - 1), 'box_mask' [b, G]; evaluation batches also 'image_id',
  'image_size' (pixels: COCO's area ranges are in pixels), 'gt_area' and
  'gt_crowd'. A dataset that detects on tiles of larger images adds
  'window' and 'core' [b, 4] (`condconv_jax.detection.tiles`): each row is
  a tile, its ground truth that of the whole image, and the evaluator
  stitches the tiles of an image together before scoring it.

  score_threshold: the score over which a detection counts for box
  precision and recall (None: the split's best-F1 threshold, reported as
  such).
  """

  def __init__(self, anchors, loss, postprocess_kwargs=None,
               score_threshold: float | None = None):
    self.anchors = jnp.asarray(anchors, jnp.float32)
    self.ssd_loss = loss
    self.postprocess_kwargs = dict(postprocess_kwargs or {})
    self.score_threshold = score_threshold

  def loss(self, outputs, batch):
    return self.ssd_loss(outputs, self.anchors, batch['boxes'],
                         batch['labels'], batch['box_mask'])

  def detections(self, outputs):
    return postprocess(outputs, self.anchors, **self.postprocess_kwargs)

  def eval_outputs(self, outputs, batch):
    """The detections and the ground truth of every image of the batch (a
    few kB each), gathered to every process; the host keeps them."""
    tiles = {k: batch[k] for k in TILE_KEYS if k in batch}
    return {**self.detections(outputs), **tiles,
            'gt_boxes': batch['boxes'], 'gt_labels': batch['labels'],
            'gt_mask': batch['box_mask'], 'gt_area': batch['gt_area'],
            'gt_crowd': batch['gt_crowd'], 'mask': batch['mask'],
            'image_id': batch['image_id'], 'image_size': batch['image_size']}

  def evaluator(self):
    return DetectionEvaluator(self.score_threshold)


TILE_KEYS = ('window', 'core')


class DetectionEvaluator:
  """Collects the detections of every image (stitching tiles) on process
  0, and scores them there: pycocotools' COCO metrics, and deepforest's box
  precision and recall at IoU 0.4 (`condconv_jax.detection.box_match`).
  The numbers are then broadcast, so every process returns the same.

  After `result()`, process 0 also holds `images` ({image_id: dict of
  'boxes' [D, 4] normalized, 'scores', 'classes', 'gt_boxes' [G, 4]
  normalized, ...}) and `curve` (box precision and recall over score
  thresholds) for pictures; ground truth stays padded (G rows, 'gt_mask').
  """

  def __init__(self, score_threshold: float | None = None):
    self.score_threshold = score_threshold
    self._rows = {} if jax.process_index() == 0 else None
    self.images, self.curve = {}, None

  def add(self, outputs):
    if self._rows is None:
      return
    out = {k: np.asarray(v) for k, v in outputs.items()}
    tiled = all(k in out for k in TILE_KEYS)
    for b in np.flatnonzero(out['mask'].astype(bool)):
      image_id = int(out['image_id'][b])
      count = int(out['count'][b])
      detections = (out['boxes'][b][:count], out['scores'][b][:count],
                    out['classes'][b][:count])
      window, core = ((out['window'][b], out['core'][b]) if tiled else
                      (np.array([0., 0., 1., 1.]),
                       np.array([0., 0., np.inf, np.inf])))
      if image_id not in self._rows:
        self._rows[image_id] = {
            'image_size': out['image_size'][b],
            **{k: out[k][b] for k in GT_KEYS}, 'tiles': []}
      elif not tiled:
        raise ValueError(f'image_id {image_id} was added twice: the '
                         'evaluation batches repeat an image (shards or '
                         'padding overlap), which would count it twice.')
      self._rows[image_id]['tiles'].append((*detections, window, core))

  def _stitched(self):
    images = {}
    for image_id, row in self._rows.items():
      boxes, scores, classes = tiles.stitch(row['tiles'])
      images[image_id] = {
          'boxes': boxes, 'scores': scores, 'classes': classes,
          'image_size': row['image_size'], **{k: row[k] for k in GT_KEYS}}
    return images

  def _scores(self) -> dict:
    self.images = self._stitched()
    coco = CocoEvaluator()
    for image_id, image in self.images.items():
      count = len(image['scores'])
      coco.add({
          'boxes': image['boxes'][None], 'scores': image['scores'][None],
          'classes': image['classes'][None], 'count': np.array([count]),
          'mask': np.array([True]), 'image_id': np.array([image_id]),
          'image_size': image['image_size'][None],
          **{k: image[k][None] for k in GT_KEYS}})
    metrics = coco.result()
    pixel_images = [in_pixels(image) for image in self.images.values()]
    self.curve = box_match.curve(pixel_images)
    best = box_match.best_f1_threshold(self.curve)
    threshold = best if self.score_threshold is None else self.score_threshold
    precision, recall = box_match.precision_recall(pixel_images, threshold)
    return {**metrics, 'box_precision': precision, 'box_recall': recall,
            'score_threshold': threshold, 'best_f1_threshold': best}

  def result(self) -> dict:
    names = (*METRICS, 'count', *BOX_METRICS)
    values = np.zeros(len(names), np.float64)
    if self._rows is not None:
      if not self._rows:
        raise ValueError('DetectionEvaluator.result: no images were added '
                         '(every row of every batch was masked out).')
      result = self._scores()
      values = np.array([result[name] for name in names], np.float64)
    if jax.process_count() > 1:
      values = np.asarray(multihost_utils.broadcast_one_to_all(values))
    return {name: float(v) for name, v in zip(names, values)}


def in_pixels(image):
  """One of `DetectionEvaluator.images` as box_match takes it: (real
  ground-truth boxes [G, 4], detections [D, 4], scores [D]), in pixels."""
  scale = np.tile(np.asarray(image['image_size'], np.float64), 2)
  real = image['gt_mask'].astype(bool)
  return image['gt_boxes'][real] * scale, image['boxes'] * scale, image[
      'scores']


BOX_METRICS = ('box_precision', 'box_recall', 'score_threshold',
               'best_f1_threshold')
