"""The paper's routing analysis: mean routing weight per class, per layer.

Routing weights are sown by every `Routing` module to 'intermediates', so this
needs no change to any model: run the evaluation split, average each layer's
[E] weights over the examples of each class.
"""

from __future__ import annotations

import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from condconv_jax.training import workdir as workdir_lib


def _per_class_sums(variables, batch, *, model, normalize, num_classes):
  _, state = model.apply(variables, normalize(batch['image']), train=False,
                         mutable=['intermediates'])
  onehot = (jax.nn.one_hot(batch['label'], num_classes) *
            batch['mask'][:, None].astype(jnp.float32))
  sums = {}
  for path, value in traverse_util.flatten_dict(
      state.get('intermediates', {})).items():
    if path[-1] == 'routing_weights':
      (weights,) = value
      sums['/'.join(path[:-2])] = onehot.T @ weights
  return sums, onehot.sum(0)


def routing_by_class(trainer, variables) -> dict[str, np.ndarray]:
  """{path of the CondConv (or block) owning a routing function:
  [num_classes, E] mean routing weights}."""
  step = jax.jit(functools.partial(_per_class_sums, model=trainer.model,
                                   normalize=trainer.normalize,
                                   num_classes=trainer.num_classes))
  totals, counts = None, None
  for batch in trainer.dataset.eval_batches():
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


def save_figure(fig, path):
  """Saves a matplotlib figure as PNG to a local path or a gs:// URI."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=110)
  path = workdir_lib.as_path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(buffer.getvalue())
