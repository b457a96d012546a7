"""The paper's routing analysis: mean routing weights per layer, per class
(classifiers) or over all images (the detector).

Routing weights are sown by every `Routing` module to 'intermediates', so this
needs no change to any model: run the evaluation split, average each layer's
[E] weights over the examples of each class, or of the whole split.
"""

from __future__ import annotations

import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from condconv_jax import paths


def _group_sums(variables, batch, *, model, normalize, num_classes):
  """Per group: the sums of each layer's routing weights and the example
  count; groups are the classes, or (num_classes=None) all examples."""
  _, state = model.apply(variables, normalize(batch['image']), train=False,
                         mutable=['intermediates'])
  mask = batch['mask'].astype(jnp.float32)[:, None]
  groups = (jax.nn.one_hot(batch['label'], num_classes) * mask
            if num_classes else mask)
  sums = {}
  for path, value in traverse_util.flatten_dict(
      state.get('intermediates', {})).items():
    if path[-1] == 'routing_weights':
      (weights,) = value
      sums['/'.join(path[:-2])] = groups.T @ weights
  return sums, groups.sum(0)


def _mean_routing(trainer, variables, num_classes) -> dict[str, np.ndarray]:
  step = jax.jit(functools.partial(_group_sums, model=trainer.model,
                                   normalize=trainer.normalize,
                                   num_classes=num_classes))
  totals, counts = None, None
  for batch in trainer.dataset.eval_batches(trainer.eval_split):
    sums, count = jax.device_get(step(variables, trainer.to_global(batch)))
    if totals is None:
      totals, counts = sums, count
    else:
      totals = {k: totals[k] + sums[k] for k in totals}
      counts = counts + count
  if not totals:
    raise ValueError('the model has no CondConv routing functions '
                     '(num_experts=0?): nothing to analyse.')
  return {k: v / np.maximum(counts[:, None], 1) for k, v in totals.items()}


def routing_by_class(trainer, variables) -> dict[str, np.ndarray]:
  """{path of the CondConv (or block) owning a routing function:
  [num_classes, E] mean routing weights}."""
  return _mean_routing(trainer, variables, trainer.num_classes)


def routing_by_layer(trainer, variables) -> dict[str, np.ndarray]:
  """{path of the CondConv owning a routing function: [E] mean routing
  weights over every image of the evaluation split}."""
  return {k: v[0] for k, v in _mean_routing(trainer, variables,
                                            None).items()}


def class_specificity(mean_weights: np.ndarray) -> float:
  """Std over classes of the mean routing weights, averaged over experts:
  near 0 when routing ignores the class."""
  return float(np.mean(np.std(mean_weights, axis=0)))


def plot(by_class: dict[str, np.ndarray], path: str, title: str = ''):
  """One heatmap (classes x experts) per CondConv layer; the classifier last."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  layers = sorted(by_class, key=lambda name: (name.startswith('classifier'),
                                              name))
  cols = min(4, len(layers))
  rows = -(-len(layers) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows),
                           squeeze=False)
  for ax, name in zip(axes.flat, layers):
    image = ax.imshow(by_class[name], aspect='auto', cmap='viridis')
    ax.set_title(f'{name}\nclass spread {class_specificity(by_class[name]):.3f}',
                 fontsize=8)
    ax.set_xlabel('expert', fontsize=7)
    ax.set_ylabel('class', fontsize=7)
    fig.colorbar(image, ax=ax, fraction=0.046)
  for ax in list(axes.flat)[len(layers):]:
    ax.axis('off')
  fig.suptitle(title or 'mean routing weight per class')
  fig.tight_layout()
  save_figure(fig, path)
  plt.close(fig)


def plot_layers(by_layer: dict[str, np.ndarray], path: str, title: str = ''):
  """One heatmap: a row per CondConv layer (in model order), a column per
  expert, each cell the layer's mean routing weight over the images."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  layers = list(by_layer)
  weights = np.stack([by_layer[name] for name in layers])
  fig, ax = plt.subplots(figsize=(2 + 0.5 * weights.shape[1],
                                  1 + 0.22 * len(layers)))
  image = ax.imshow(weights, aspect='auto', cmap='viridis')
  ax.set_yticks(range(len(layers)), layers, fontsize=6)
  ax.set_xlabel('expert')
  fig.colorbar(image, ax=ax, fraction=0.046)
  ax.set_title(title or 'mean routing weight per layer', fontsize=9)
  fig.tight_layout()
  save_figure(fig, path)
  plt.close(fig)


def save_figure(fig, path):
  """Saves a matplotlib figure as PNG to a local path or a gs:// URI."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=110)
  path = paths.as_path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(buffer.getvalue())
