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

from condconv_jax.detection import postprocess
from condconv_jax.training.coco_eval import METRICS, CocoEvaluator


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
  """SSD: the SSD loss against anchors, and COCO metrics (pycocotools) over
  the post-processed detections of the whole evaluation split.

  Batches carry ground truth padded to G boxes: 'boxes' [b, G, 4]
  normalized, 'labels' [b, G] (the model's class columns, 1 ..
  num_classes - 1), 'box_mask' [b, G]; evaluation batches also 'image_id',
  'image_size' (pixels: COCO's area ranges are in pixels), 'gt_area' and
  'gt_crowd'.
  """

  def __init__(self, anchors, loss, postprocess_kwargs=None):
    self.anchors = jnp.asarray(anchors, jnp.float32)
    self.ssd_loss = loss
    self.postprocess_kwargs = dict(postprocess_kwargs or {})

  def loss(self, outputs, batch):
    return self.ssd_loss(outputs, self.anchors, batch['boxes'],
                         batch['labels'], batch['box_mask'])

  def detections(self, outputs):
    return postprocess(outputs, self.anchors, **self.postprocess_kwargs)

  def eval_outputs(self, outputs, batch):
    """The detections and the ground truth of every image of the batch (a
    few kB each), gathered to every process; the host keeps them."""
    return {**self.detections(outputs),
            'gt_boxes': batch['boxes'], 'gt_labels': batch['labels'],
            'gt_mask': batch['box_mask'], 'gt_area': batch['gt_area'],
            'gt_crowd': batch['gt_crowd'], 'mask': batch['mask'],
            'image_id': batch['image_id'], 'image_size': batch['image_size']}

  def evaluator(self):
    return _CocoOnProcessZero()


class _CocoOnProcessZero:
  """pycocotools runs on process 0 over the detections of every process;
  the numbers are then broadcast, so every process returns the same."""

  def __init__(self):
    self.coco = CocoEvaluator() if jax.process_index() == 0 else None

  def add(self, outputs):
    if self.coco is not None:
      self.coco.add(outputs)

  def result(self) -> dict:
    names = (*METRICS, 'count')
    values = np.zeros(len(names), np.float64)
    if self.coco is not None:
      result = self.coco.result()
      values = np.array([result[name] for name in names], np.float64)
    if jax.process_count() > 1:
      values = np.asarray(multihost_utils.broadcast_one_to_all(values))
    return {name: float(v) for name, v in zip(names, values)}
