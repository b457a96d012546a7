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
