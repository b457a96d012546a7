"""A picture of a detector at work: evaluation images with their ground-truth
boxes (green) and the detections above a score (red, score written)."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from condconv_jax.training import routing_analysis


def first_images(trainer, variables, count: int, split: str | None = None):
  """The first `count` real images of an evaluation split with their ground
  truth and detections: a list of dicts of NumPy arrays ('image' uint8
  [H, W, 3], 'boxes' [D, 4], 'scores' [D], 'count', 'gt_boxes' [G, 4],
  'gt_mask' [G]; boxes normalized)."""
  found = []
  for batch in trainer.dataset.eval_batches(split or trainer.eval_split):
    outputs = jax.device_get(trainer.eval_step(variables,
                                               trainer.to_global(batch)))
    # Process-local images; outputs cover the global batch, this process's
    # rows first on process 0 (the only one that draws).
    for i in np.flatnonzero(batch['mask'])[:count - len(found)]:
      found.append({'image': batch['image'][i],
                    **{k: outputs[k][i] for k in ('boxes', 'scores', 'count',
                                                  'gt_boxes', 'gt_mask')}})
    # eval_step is collective: every process stops after the same batch,
    # the one where process 0 (which draws) has its images.
    done = np.asarray(len(found) == count)
    if jax.process_count() > 1:
      done = multihost_utils.broadcast_one_to_all(done)
    if done:
      break
  return found


def run_title(config) -> str:
  """What a run's pictures are of: model, experts, dataset and split."""
  return (f'{config.model}, {config.num_experts} experts, '
          f'{config.dataset} {config.eval_split}'.strip())


def write(trainer, variables, path, count: int = 4, min_score: float = 0.3,
          title: str = ''):
  """Draws the first `count` evaluation images to `path` on process 0.
  Every process calls it: the evaluation steps are collective."""
  examples = first_images(trainer, variables, count)
  if jax.process_index() == 0:
    plot(examples, path, min_score, title)


def plot(examples, path: str, min_score: float = 0.3, title: str = ''):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.patches as patches  # pylint: disable=g-import-not-at-top
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(examples), squeeze=False,
                           figsize=(4.2 * len(examples), 4.6))
  for ax, ex in zip(axes[0], examples):
    height, width = ex['image'].shape[:2]
    ax.imshow(ex['image'].squeeze())

    def draw(box, color, label=None):
      ymin, xmin, ymax, xmax = box * [height, width, height, width]
      ax.add_patch(patches.Rectangle((xmin, ymin), xmax - xmin, ymax - ymin,
                                     fill=False, color=color, linewidth=0.9))
      if label:
        ax.text(xmin, ymin, label, color=color, fontsize=5)

    for box in ex['gt_boxes'][ex['gt_mask']]:
      draw(box, 'lime')
    keep = [j for j in range(int(ex['count'])) if ex['scores'][j] >= min_score]
    for j in keep:
      draw(ex['boxes'][j], 'red', f'{ex["scores"][j]:.2f}')
    ax.set_title(f'{int(ex["gt_mask"].sum())} true (green), {len(keep)} '
                 f'detected >= {min_score} (red)', fontsize=8)
    ax.axis('off')
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  routing_analysis.save_figure(fig, path)
  plt.close(fig)
